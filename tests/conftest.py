"""Shared fixtures. Tests never touch the network: the hub is forced offline before anything imports it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanokor.tokenizer import Tokenizer
from tiny_checkpoint import make_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def sample_data_dir(tmp_path_factory) -> Path:
    """`python prepare.py --dataset sample`, run once per session: the prepared data directory
    (tokenizer.model, token_bytes.npy, train_/val_ shards, meta.json) of the embedded Korean sample."""
    out = tmp_path_factory.mktemp("data") / "sample"
    proc = subprocess.run([sys.executable, str(REPO / "prepare.py"), "--dataset", "sample", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="module")
def tokenizer(sample_data_dir) -> Tokenizer:
    """The tokenizer prepare.py trained on the embedded sample."""
    return Tokenizer.load(sample_data_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer) -> Path:
    """A tiny random-weight checkpoint for that tokenizer (tests/tiny_checkpoint.py), one per test module."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "last.pt", tokenizer)
