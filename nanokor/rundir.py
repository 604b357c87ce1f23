"""A run directory (`out_dir`): the one place that names its files, and the lock that gives it one owner.

    config.json        the resolved config               metrics.jsonl   one JSON object per step / eval
    last.pt            the latest checkpoint             best-<step>.pt  the best k, as hard links
    best.json          the best k and their losses       wandb_run_id    the wandb run a resume continues
    deepspeed/         DeepSpeed's own checkpoints       .lock           held by the live train.py
    fsdp/step_<step>/  the FSDP2 engine's sharded checkpoint (torch.distributed.checkpoint), last.pt's step

The lock is an flock on `.lock`, held for the whole run: a second train.py on the same directory is
refused at once with the owner's pid, host and start time, which the owner writes into the file. The
kernel releases an flock when its process dies, however it dies, so a killed run never leaves a lock
that blocks the next one; the stale owner line is simply overwritten. The new owner also removes the
temporary files (`.last.pt.tmp-<pid>`, a checkpoint's size) that a run killed mid-write left behind:
no live process can be writing them, since train.py writes these files only while holding the lock.
"""

import fcntl
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

from nanokor.errors import TrainingError


class RunDir:
    def __init__(self, path):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.metrics = self.path / "metrics.jsonl"
        self.last = self.path / "last.pt"
        self.best_json = self.path / "best.json"
        self.wandb_id = self.path / "wandb_run_id"
        self.deepspeed = self.path / "deepspeed"
        self.fsdp = self.path / "fsdp"
        self.lock_file = self.path / ".lock"
        self._lock_fd: int | None = None

    def __str__(self) -> str:
        return str(self.path)

    def best(self, step: int) -> Path:
        return self.path / f"best-{step:07d}.pt"

    def fsdp_checkpoint(self, step: int) -> Path:
        """The FSDP2 engine's checkpoint (a directory of shards) of `step`."""
        return self.fsdp / f"step_{step:07d}"

    def lock(self) -> None:
        """Take the directory for this process, or raise TrainingError naming the process that holds it."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise TrainingError(f"Cannot use {self.path} as the run directory ({e.strerror}). Pick a writable "
                                "--out_dir.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise TrainingError(f"{self.path} is in use by another train.py ({_describe(owner)}); two runs in one "
                                "directory would overwrite each other's checkpoints and metrics. Wait for it to "
                                "finish or stop it (Ctrl-C saves last.pt), or train into another --out_dir.") from None
        owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner.encode() + b"\n", 0)
        self._lock_fd = fd
        self._remove_partial_writes()

    def _remove_partial_writes(self) -> None:
        """Delete what an atomic write of one of the run's files left when its process was killed."""
        own = {p.name for p in (self.config, self.metrics, self.last, self.best_json, self.wandb_id)}
        for tmp in self.path.glob(".*.tmp-*"):
            target = tmp.name[1:].rsplit(".tmp-", 1)[0]
            if tmp.is_file() and (target in own or re.fullmatch(r"best-\d+\.pt", target)):
                size = tmp.stat().st_size
                tmp.unlink(missing_ok=True)
                print(f"note: removed {tmp.name} ({size / 1e6:.1f} MB), a write of {target} cut short by a "
                      "killed run", file=sys.stderr)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None


def _describe(owner: str) -> str:
    try:
        o = json.loads(owner)
        return f"pid {o['pid']} on {o['host']}, started {o['started']}"
    except (ValueError, KeyError, TypeError):
        return "its owner did not say who it is"
