"""Files that are either complete or absent.

Everything nanokor writes that a later run reads (checkpoints, shards, meta.json, config.json,
best.json, a rewritten metrics.jsonl) goes through `AtomicFile`: the bytes go to a temporary file
beside the target, are fsynced, and the temporary file is renamed over the target. A crash or kill -9
at any moment leaves either the old file or the new one, never half of one; a failed write (a full
disk) removes the temporary file and leaves the old target as it was. A target whose directory cannot
be made (a path under a regular file, a read-only place) is an OutputError that names it.
"""

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from nanokor.errors import OutputError


class AtomicFile:
    """A file written under a temporary name and renamed to `path` by `commit()`; `discard()` (or an
    exception inside `with`) removes it. Use as a context manager, or hold it across calls."""

    def __init__(self, path, buffering: int = -1):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file: BinaryIO = open(self.tmp, "wb", buffering=buffering)
        except (FileExistsError, NotADirectoryError) as e:  # some part of the directory is a regular file
            raise OutputError(f"Cannot write {self.path}: {_file_in(self.path.parent)} is a file, not a "
                              "directory. Choose another output path.", e) from None
        except PermissionError as e:
            raise OutputError(f"Cannot write {self.path}: permission denied ({e.filename}). Choose a "
                              "writable output path.", e) from None

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        _fsync_dir(self.path.parent)

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> BinaryIO:
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def atomic_write(path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Write `data` (bytes, or a function that writes to the open binary file) to `path` atomically."""
    with AtomicFile(path) as f:
        if callable(data):
            data(f)
        else:
            f.write(data)


def _file_in(directory: Path) -> Path:
    """The first component of `directory` that exists and is not a directory."""
    for part in reversed([directory, *directory.parents]):
        if part.exists() and not part.is_dir():
            return part
    return directory


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
