"""Shared fixtures. Tests never touch the network: the hub is forced offline before anything imports it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory, tokenizer) -> Path:
    """A tiny model marked as a chat model, as SFT marks its checkpoints (`"chat": True`), with room for
    a few turns (a 256-token context)."""
    return make_checkpoint(tmp_path_factory.mktemp("chat") / "last.pt", tokenizer, chat=True, max_seq_len=256)


@pytest.fixture
def compile_spy(monkeypatch):
    """torch.compile replaced by a recorder that returns the function as it is: what runs is exactly the
    code the real compile traces (fullgraph=True: nothing falls back to eager), for seconds, not a
    compile per test. bench/sample_speed.py runs the real one and checks its tokens against eager's."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    return calls


@pytest.fixture(scope="session")
def sample_chat_dir(sample_data_dir, tmp_path_factory) -> Path:
    """`python prepare.py --chat --dataset sample --tokenizer <the sample's tokenizer.model>`, once per
    session: the embedded conversation sample as chat shards (data/sample-chat)."""
    out = tmp_path_factory.mktemp("data") / "sample-chat"
    proc = subprocess.run([sys.executable, str(REPO / "prepare.py"), "--chat", "--dataset", "sample", "--tokenizer",
                           str(sample_data_dir / "tokenizer.model"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out
