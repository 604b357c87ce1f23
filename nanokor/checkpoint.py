"""Checkpoints: one self-contained `.pt` file of tensors and plain Python values.

A checkpoint carries the model config, the weights, the tokenizer (serialized SentencePiece model)
and, for training checkpoints, everything exact resume needs. It is written to a temp file and renamed,
so a crash mid-write never leaves a file that looks complete, and it is read with
`torch.load(weights_only=True)`, so loading a checkpoint never runs code.

Training keeps `last.pt` (rewritten at every evaluation and at the end) and the best k by validation
loss as `best-<step>.pt`, listed with their losses in a readable `best.json` beside them.
"""

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from nanokor.atomic import atomic_write
from nanokor.model import ModelConfig, Transformer, flash_attn_func

FORMAT = "nanokor-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or from an incompatible format."""


def save_checkpoint(state: dict, path) -> None:
    """Atomically write `state` (plus the format tag) to `path`."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **state}, f))


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """Read and validate a checkpoint; every failure is a CheckpointError with a one-paragraph fix.
    mmap=True maps the tensors instead of reading them: cheap when only the metadata is wanted."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {path}. Train one with `python train.py config/tiny.py` "
                              "(it writes out/last.pt) or pass the right path with --ckpt.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
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


# Keys that change the weights' shapes or meaning; dropout, attention backend and checkpointing may change.
ARCHITECTURE_KEYS = ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "max_seq_len", "rope_theta",
                     "norm_eps", "tie_embeddings", "position")


def check_architecture(saved: dict, config: ModelConfig, where) -> None:
    """Refuse to resume into a model whose architecture differs from the checkpoint's."""
    current = config.to_dict()
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, config {current[k]!r}" for k in ARCHITECTURE_KEYS
             if saved.get(k) != current[k]]
    if diffs:
        raise CheckpointError(f"Cannot resume from {where}: its architecture differs from the config "
                              f"({'; '.join(diffs)}). Resume with the config (and data directory) the run was "
                              "started with, or start a new run in another --out_dir.")


def build_model(ckpt: dict) -> Transformer:
    """The model a checkpoint describes, with its weights loaded (on CPU, in eval mode)."""
    saved = dict(ckpt["model_config"])
    if saved.get("attention") == "flash" and flash_attn_func is None:
        # The backend is how attention is computed, not what was learned: a model trained with
        # flash-attn runs unchanged through SDPA on a machine without it.
        saved["attention"] = "auto"
    model = Transformer(ModelConfig.from_dict(saved))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def build_tokenizer(ckpt: dict):
    """The SentencePiece tokenizer stored in a checkpoint."""
    from nanokor.tokenizer import Tokenizer

    return Tokenizer(ckpt["tokenizer"])


class BestCheckpoints:
    """The k checkpoints with the lowest validation loss, as hard links to (or copies of) last.pt.

    A hard link costs no disk and no write time, and stays valid when last.pt is later replaced,
    because the atomic rename gives last.pt a new inode. `entries` (best first) goes into every
    training checkpoint, so a resumed run keeps pruning the same files.
    """

    def __init__(self, out_dir, k: int, entries: list[dict] | None = None):
        self.out_dir, self.k = Path(out_dir), k
        self.entries = [e for e in entries or [] if (self.out_dir / e["file"]).is_file()]

    def is_better(self, val_loss: float) -> bool:
        return self.k > 0 and (len(self.entries) < self.k or val_loss < self.entries[-1]["val_loss"])

    def with_candidate(self, step: int, val_loss: float) -> list[dict]:
        """The entries as they will be once this step's checkpoint is kept (to save inside it)."""
        return self._ranked(step, val_loss)[1] if self.is_better(val_loss) else self.entries

    def keep(self, last_path, step: int, val_loss: float) -> None:
        """Keep the just-written last.pt as a best checkpoint if it ranks, and drop what fell out."""
        if not self.is_better(val_loss):
            return
        entry, entries = self._ranked(step, val_loss)
        _link_or_copy(Path(last_path), self.out_dir / entry["file"])
        kept = {e["file"] for e in entries}
        for old in self.entries:
            if old["file"] not in kept:
                (self.out_dir / old["file"]).unlink(missing_ok=True)
        self.entries = entries
        atomic_write(self.out_dir / "best.json", (json.dumps(entries, indent=2) + "\n").encode())

    def _ranked(self, step: int, val_loss: float) -> tuple[dict, list[dict]]:
        entry = {"step": step, "val_loss": val_loss, "file": f"best-{step:07d}.pt"}
        return entry, sorted(self.entries + [entry], key=lambda e: e["val_loss"])[:self.k]


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # filesystems without hard links
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def rng_state() -> dict:
    """Every random-number generator a step can draw from (dropout, loaders, sampling helpers)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])
