"""nanokor: a compact, fast, pure-PyTorch trainer for Korean decoder-only language models."""

__version__ = "0.1.0"
