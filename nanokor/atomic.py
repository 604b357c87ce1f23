"""Files that are either complete or absent.

Everything nanokor writes that a later run reads (checkpoints, meta.json, config.json, best.json,
a rewritten metrics.jsonl) goes through `atomic_write`: the bytes go to a temporary file beside the
target, are fsynced, and the temporary file is renamed over the target. A crash or kill -9 at any
moment leaves either the old file or the new one, never half of one.
"""

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Write `data` (bytes, or a function that writes to the open binary file) to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
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
