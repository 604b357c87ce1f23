"""Checkpoints: one self-contained `.pt` file of tensors and plain Python values.

A checkpoint carries the model config, the weights, the tokenizer (serialized SentencePiece model)
and, for training checkpoints, everything exact resume needs. It is written to a temp file and renamed,
so a crash mid-write never leaves a file that looks complete, and it is read with
`torch.load(weights_only=True)`, so loading a checkpoint never runs code.

Training keeps `last.pt` (rewritten at every evaluation and at the end) and the best k by validation
loss as `best-<step>.pt`, listed with their losses in a readable `best.json` beside them. A training
checkpoint is a `LoopState` (what the loop carries from step to step) plus the weights, the
optimizer, the tokenizer and the config; `save_training` and `load_training` write and read it.
"""

import errno
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from nanokor.atomic import atomic_write
from nanokor.errors import CheckpointError
from nanokor.model import ModelConfig, Transformer
from nanokor.rundir import RunDir

FORMAT = "nanokor-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(state: dict, path) -> None:
    """Atomically write `state` (plus the format tag) to `path`. A failed write (a full disk) leaves the
    previous file at `path` as it was and is a CheckpointError that says so."""
    try:
        atomic_write(path, lambda f: torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **state}, f))
    except (OSError, RuntimeError) as e:  # torch reports a failed write as RuntimeError, the OSError as context
        cause = next((x for x in _chain(e) if isinstance(x, OSError)), e)
        full = getattr(cause, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        what = "the disk is full" if full else f"{type(cause).__name__}: {cause}"
        fix = ("Free some space, or point --out_dir at a disk with room" if full else "Fix the cause")
        raise CheckpointError(f"Could not write {path}: {what}. Nothing is lost: the previous {Path(path).name} "
                              f"(if any) is intact and the partial file was removed. {fix}, then continue with "
                              "--init_from=resume.") from None


def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """Read and validate a checkpoint; every failure is a CheckpointError with a one-paragraph fix.
    mmap=True maps the tensors instead of reading them: cheap when only the metadata is wanted."""
    path = Path(path)
    if not path.is_file():
        inside = f" It is a directory; the checkpoint in it is {path / 'last.pt'}." if (path / "last.pt").is_file() \
            else ""
        raise CheckpointError(f"No checkpoint at {path}.{inside} Train one with `python train.py config/tiny.py` "
                              "(it writes out/last.pt) or pass the right path with --ckpt.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for truncated or foreign files
        # torch's own first sentence only: the rest is advice to load unsafely (weights_only=False)
        reason = str(e).strip().split("\n")[0].split(". ")[0].rstrip(".")
        raise CheckpointError(f"Could not read {path} as a checkpoint ({type(e).__name__}: {reason}). The file is "
                              "corrupt, truncated (a copy cut short?), or not a nanokor checkpoint; use another "
                              "checkpoint such as a best-*.pt beside it (to resume from one, copy it over "
                              "last.pt).") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a nanokor checkpoint (no '{FORMAT}' tag). Pass a file written by "
                              "nanokor's train.py.")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {ckpt.get('format_version')}, but this "
                              f"nanokor reads version {FORMAT_VERSION}. Use the nanokor release that wrote it.")
    return ckpt


def check_architecture(saved: dict, config: ModelConfig, where) -> None:
    """Refuse to resume into a model whose architecture differs from the checkpoint's."""
    current = config.architecture()
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, config {v!r}" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"Cannot resume from {where}: its architecture differs from the config "
                              f"({'; '.join(diffs)}). Resume with the config (and data directory) the run was "
                              "started with, or start a new run in another --out_dir.")


def load_pretrained(model: Transformer, path, tokenizer) -> None:
    """Load a checkpoint's weights alone into `model` (built from the same architecture): a new run, such
    as SFT, starts from them with a fresh optimizer and schedule. The checkpoint's tokenizer must be
    the one the run's data was tokenized with, or its token ids would mean other text."""
    ckpt = load_checkpoint(path)
    saved = build_tokenizer(ckpt)
    if saved.sha256 != tokenizer.sha256:
        raise CheckpointError(f"{path} was trained with tokenizer {saved.sha256[:12]}…, but the run's data is tokenized "
                              f"with {tokenizer.sha256[:12]}…: the same ids would mean other text. Prepare the data "
                              f"with that model's tokenizer (prepare.py --chat ... --tokenizer {path}) and point "
                              "data_dir at it.")
    check_architecture(ckpt["model_config"] | {"max_seq_len": model.config.max_seq_len}, model.config, path)
    model.load_state_dict(ckpt["model"])


def build_model(ckpt: dict) -> Transformer:
    """The model a checkpoint describes, with its weights loaded (on CPU, in eval mode). It runs with the
    default runtime settings (best attention backend here, no dropout): how a model was trained to run
    (e.g. with flash-attn) is not part of what it learned."""
    model = Transformer(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def build_tokenizer(ckpt: dict):
    """The SentencePiece tokenizer stored in a checkpoint."""
    from nanokor.tokenizer import Tokenizer

    return Tokenizer(ckpt["tokenizer"])


@dataclass
class LoopState:
    """What the training loop carries from step to step and a resume restores, besides the weights and
    the optimizer: saved flat into the checkpoint, one key per field."""

    step: int = 0
    tokens_seen: int = 0
    best: list[dict] = field(default_factory=list)  # BestCheckpoints.entries, best first
    val: dict | None = None  # the last evaluation, with its step
    nonfinite_total: int = 0
    loader: dict | None = None  # TrainLoader.state_dict()
    rng: list = field(default_factory=list)  # every rank's rng_state(), in rank order

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "LoopState":
        return cls(**{f.name: ckpt[f.name] for f in fields(cls)})


def save_training(path, state: LoopState, config: ModelConfig, weights: dict, optimizer: dict | None,
                  extras: dict) -> None:
    """A training checkpoint: the loop state, the architecture, the full weights, the optimizer state
    (None where the engine keeps its own) and `extras` (tokenizer bytes, the train config)."""
    save_checkpoint({**asdict(state), "model_config": config.architecture(), "model": weights,
                     "optimizer": optimizer, **extras}, path)


def load_training(path, model_config: ModelConfig, mmap: bool = False) -> tuple[dict, LoopState]:
    """A training checkpoint for resuming `model_config`: (the whole checkpoint, its loop state).
    mmap=True maps the weights instead of reading them, for an engine that restores them elsewhere."""
    ckpt = load_checkpoint(path, mmap=mmap)
    if "loader" not in ckpt:
        raise CheckpointError(f"{path} holds weights only, not a training run, so it cannot be resumed. Start "
                              "fresh with --init_from=scratch or another --out_dir.")
    check_architecture(ckpt["model_config"], model_config, path)
    return ckpt, LoopState.from_checkpoint(ckpt)


class BestCheckpoints:
    """The k checkpoints with the lowest validation loss, as hard links to (or copies of) last.pt.

    A hard link costs no disk and no write time, and stays valid when last.pt is later replaced,
    because the atomic rename gives last.pt a new inode. `entries` (best first) goes into every
    training checkpoint, so a resumed run keeps pruning the same files.
    """

    def __init__(self, run: RunDir, k: int, entries: list[dict] | None = None):
        self.run, self.k = run, k
        self.entries = [e for e in entries or [] if (run.path / e["file"]).is_file()]

    def is_better(self, val_loss: float) -> bool:
        return self.k > 0 and (len(self.entries) < self.k or val_loss < self.entries[-1]["val_loss"])

    def with_candidate(self, step: int, val_loss: float) -> list[dict]:
        """The entries as they will be once this step's checkpoint is kept (to save inside it)."""
        return self._ranked(step, val_loss)[1] if self.is_better(val_loss) else self.entries

    def keep(self, step: int, val_loss: float) -> None:
        """Keep the just-written last.pt as a best checkpoint if it ranks, and drop what fell out."""
        if not self.is_better(val_loss):
            return
        entry, entries = self._ranked(step, val_loss)
        _link_or_copy(self.run.last, self.run.path / entry["file"])
        kept = {e["file"] for e in entries}
        for old in self.entries:
            if old["file"] not in kept:
                (self.run.path / old["file"]).unlink(missing_ok=True)
        self.entries = entries
        atomic_write(self.run.best_json, (json.dumps(entries, indent=2) + "\n").encode())

    def _ranked(self, step: int, val_loss: float) -> tuple[dict, list[dict]]:
        entry = {"step": step, "val_loss": val_loss, "file": self.run.best(step).name}
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
