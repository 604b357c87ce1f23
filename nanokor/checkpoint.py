"""Checkpoints: one self-contained `.pt` file of tensors and plain Python values.

A checkpoint carries the model config, the weights, the tokenizer (serialized SentencePiece model)
and, for training checkpoints, everything exact resume needs. It is written to a temp file and renamed,
so a crash mid-write never leaves a file that looks complete, and it is read with
`torch.load(weights_only=True)`, so loading a checkpoint never runs code.
"""

import os
from pathlib import Path

import torch

from nanokor.model import ModelConfig, Transformer

FORMAT = "nanokor-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or from an incompatible format."""


def save_checkpoint(state: dict, path) -> None:
    """Atomically write `state` (plus the format tag) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read and validate a checkpoint; every failure is a CheckpointError with a one-paragraph fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {path}. Train one with `python train.py config/tiny.py` "
                              "(it writes out/last.pt) or pass the right path with --ckpt.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"Could not read {path} as a checkpoint ({type(e).__name__}: {e}). The file is "
                              "corrupt, truncated, or not a nanokor checkpoint; use another checkpoint such as "
                              "a best-*.pt beside it.") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a nanokor checkpoint (no '{FORMAT}' tag). Pass a file written by "
                              "nanokor's train.py.")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {ckpt.get('format_version')}, but this "
                              f"nanokor reads version {FORMAT_VERSION}. Use the nanokor release that wrote it.")
    return ckpt


def build_model(ckpt: dict) -> Transformer:
    """The model a checkpoint describes, with its weights loaded (on CPU, in eval mode)."""
    model = Transformer(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def build_tokenizer(ckpt: dict):
    """The SentencePiece tokenizer stored in a checkpoint."""
    from nanokor.tokenizer import Tokenizer

    return Tokenizer.from_bytes(ckpt["tokenizer"])
