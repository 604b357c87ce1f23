"""The on-disk data format: token shards, and the prepared data directory that holds them.

A shard is a 256-byte header followed by uint16 token ids (little-endian):

    offset  size  field
    0       8     magic b"NKSHARD\\0"
    8       4     format version (uint32)
    12      4     vocab size (uint32)
    16      8     token count (uint64)
    24      8     dtype, ASCII, NUL-padded ("<u2")
    32      32    SHA-256 of the tokenizer model (raw digest)
    64      192   zero

Every document is framed as <s> text </s> (bos, tokens, eos): the model sees where documents start,
so generation can begin from <s>, and learns to end them, so generation can stop at </s>.

A prepared directory (`DataDir`) holds tokenizer.model, token_bytes.npy, train_000000.bin …,
val_000000.bin … and meta.json. It is complete only once meta.json exists: it is written last, by
rename, and lists the shards. Shards are likewise written under a temporary name and renamed when
whole, so a killed prepare.py leaves nothing that looks finished. The encoding pipeline that writes
them is nanokor/encode.py; this module is what readers need.
"""

import bisect
import json
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from nanokor.atomic import AtomicFile, atomic_write
from nanokor.errors import DataError, ShardError
from nanokor.tokenizer import Tokenizer

MAGIC = b"NKSHARD\0"
VERSION = 1
DTYPE = "<u2"
HEADER_SIZE = 256
_HEADER = struct.Struct("<8sIIQ8s32s")
SPLITS = ("train", "val")


@dataclass(frozen=True)
class ShardHeader:
    version: int
    vocab_size: int
    n_tokens: int
    tokenizer_sha: str  # hex


def pack_header(vocab_size: int, n_tokens: int, tokenizer_sha: str) -> bytes:
    packed = _HEADER.pack(MAGIC, VERSION, vocab_size, n_tokens, DTYPE.encode(), bytes.fromhex(tokenizer_sha))
    return packed.ljust(HEADER_SIZE, b"\0")


def read_header(path: str | Path) -> ShardHeader:
    """Parse and check a shard's header against its file (magic, version, dtype, length)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
    except OSError as e:
        raise ShardError(f"Cannot read the shard {path} ({e.strerror}): its data directory is incomplete or "
                         "damaged. Re-run prepare.py with --overwrite.") from None
    if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
        raise ShardError(f"{path} is not a nanokor token shard (bad magic). Point the loader at a directory "
                         "written by prepare.py.")
    _, version, vocab_size, n_tokens, dtype, sha = _HEADER.unpack_from(raw)
    dtype = dtype.rstrip(b"\0").decode("ascii", "replace")
    if version != VERSION or dtype != DTYPE:
        raise ShardError(f"{path} has shard format version {version}, dtype {dtype!r}; this nanokor reads "
                         f"version {VERSION}, {DTYPE!r}. Re-run prepare.py.")
    expected = HEADER_SIZE + 2 * n_tokens
    actual = path.stat().st_size
    if actual != expected:
        raise ShardError(f"{path} is {actual} bytes but its header promises {n_tokens} tokens ({expected} bytes): "
                         "the file is truncated or corrupt. Re-run prepare.py with --overwrite.")
    return ShardHeader(version, vocab_size, n_tokens, sha.hex())


def check_header(path: str | Path, *, tokenizer_sha: str | None = None, vocab_size: int | None = None) -> ShardHeader:
    """`read_header`, and refuse a shard made with another tokenizer than the one in use."""
    header = read_header(path)
    if tokenizer_sha is not None and header.tokenizer_sha != tokenizer_sha:
        raise ShardError(f"{path} was tokenized with tokenizer {header.tokenizer_sha[:12]}…, but the tokenizer in "
                         f"use is {tokenizer_sha[:12]}…: token ids would mean different text. Use the "
                         "tokenizer.model from the same data directory (or re-run prepare.py with --tokenizer).")
    if vocab_size is not None and header.vocab_size != vocab_size:
        raise ShardError(f"{path} has vocab size {header.vocab_size}, but the model expects {vocab_size}. "
                         "Set the model's vocab size from the data directory's meta.json.")
    return header


def read_shard(path: str | Path, *, tokenizer_sha: str | None = None, vocab_size: int | None = None) -> np.ndarray:
    """The shard's tokens as a read-only uint16 memmap, after validating the header."""
    header = check_header(path, tokenizer_sha=tokenizer_sha, vocab_size=vocab_size)
    if header.n_tokens == 0:
        return np.zeros(0, dtype=DTYPE)
    return np.memmap(path, dtype=DTYPE, mode="r", offset=HEADER_SIZE, shape=(header.n_tokens,))


class ShardWriter:
    """Appends tokens to `{split}_000000.bin`, `{split}_000001.bin`, … of `shard_tokens` tokens each.

    Each shard is an `AtomicFile`: written with a placeholder header, completed with the real header,
    then committed (fsync, rename); a crash before the rename leaves only a temporary file.
    """

    def __init__(self, out_dir: str | Path, split: str, *, shard_tokens: int, vocab_size: int, tokenizer_sha: str):
        self.out_dir, self.split, self.shard_tokens = Path(out_dir), split, shard_tokens
        self.vocab_size, self.tokenizer_sha = vocab_size, tokenizer_sha
        self.shards: list[dict] = []  # {"file": name, "tokens": n} of each finished shard
        self._shard: AtomicFile | None = None
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=DTYPE)
        while len(tokens):
            if self._shard is None:
                self._shard = AtomicFile(self.out_dir / f"{self.split}_{len(self.shards):06d}.bin", buffering=1 << 20)
                self._shard.file.write(b"\0" * HEADER_SIZE)
                self._count = 0
            part, tokens = tokens[: self.shard_tokens - self._count], tokens[self.shard_tokens - self._count:]
            self._shard.file.write(part.tobytes())
            self._count += len(part)
            if self._count == self.shard_tokens:
                self._finish()

    def close(self) -> list[dict]:
        if self._shard is not None:
            self._finish()
        return self.shards

    def _finish(self) -> None:
        shard, self._shard = self._shard, None
        shard.file.seek(0)
        shard.file.write(pack_header(self.vocab_size, self._count, self.tokenizer_sha))
        shard.commit()
        self.shards.append({"file": shard.path.name, "tokens": self._count})


class TokenStream:
    """The shards of one split, read as one token array (windows may cross shard boundaries).

    Tokens are read with pread, not through a memmap: a memmap's touched pages count toward the
    process's resident memory, which would grow to the dataset's size over a long run. The page cache
    still makes repeated reads cheap; resident memory stays flat.
    """

    def __init__(self, paths: list[Path], tokenizer_sha: str | None = None):
        self.sizes = [check_header(p, tokenizer_sha=tokenizer_sha).n_tokens for p in paths]
        self.starts = np.cumsum([0] + self.sizes).tolist()
        self.n_tokens = self.starts[-1]
        self._files = [open(p, "rb") for p in paths]

    def read(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=DTYPE)
        i, done = bisect.bisect_right(self.starts, start) - 1, 0
        while done < count:
            local = start + done - self.starts[i]
            n = min(count - done, self.sizes[i] - local)
            got = os.preadv(self._files[i].fileno(), [out[done:done + n].view(np.uint8)], HEADER_SIZE + 2 * local)
            if got != 2 * n:
                raise DataError(f"{self._files[i].name} changed while training (short read); re-run prepare.py.")
            done, i = done + n, i + 1
        return out

    def windows(self, block_size: int) -> int:
        """How many block_size+1 windows, every block_size tokens, fit in the stream."""
        return max(0, (self.n_tokens - 1) // block_size)

    def close(self) -> None:
        for f in self._files:
            f.close()


class DataDir:
    """A directory prepare.py wrote: the one place that knows its layout.

    Readers (train.py, evaluate, benchmarks) open it and take the tokenizer, the byte table and token
    streams from it; prepare.py writes one through `write_tokenizer` and `write_meta` (meta.json last).
    """

    TOKENIZER, TOKEN_BYTES, META = "tokenizer.model", "token_bytes.npy", "meta.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    @cached_property
    def meta(self) -> dict:
        path = self.path / self.META
        if not path.is_file():
            raise DataError(f"{self.path} is not a prepared data directory: it has no meta.json (prepare.py writes "
                            "it last, so an interrupted run leaves none). Run `python prepare.py --dataset sample` "
                            "for data/sample, or point data_dir at the directory prepare.py wrote.")
        try:
            meta = json.loads(path.read_bytes())
        except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
            meta = f"{type(e).__name__}: {e}"
        if not (isinstance(meta, dict) and isinstance(meta.get("shards"), dict)
                and all(isinstance(meta["shards"].get(s), list) for s in SPLITS)):
            reason = meta if isinstance(meta, str) else "it does not list the shards of each split"
            raise DataError(f"{path} is damaged ({reason}): it is the index of the prepared data, written last "
                            "by prepare.py. Re-run prepare.py with --overwrite to rebuild the directory.")
        return meta

    @cached_property
    def tokenizer(self) -> Tokenizer:
        path = self.path / self.TOKENIZER
        if not path.is_file():
            raise DataError(f"No prepared data in {self.path} (no {self.TOKENIZER}). Prepare it first, e.g. "
                            "`python prepare.py --dataset sample` for data/sample, or point data_dir at the "
                            "directory prepare.py wrote.")
        tokenizer = Tokenizer.load(path)
        if self.tokenizer_sha not in (None, tokenizer.sha256):
            raise DataError(f"{path} is not the tokenizer {self.path} was prepared with (meta.json records "
                            f"{self.tokenizer_sha[:12]}…, the file is {tokenizer.sha256[:12]}…): its ids would "
                            "mean other text. Restore the original file, or re-run prepare.py.")
        return tokenizer

    @property
    def tokenizer_sha(self) -> str | None:
        """The SHA-256 of the tokenizer the shards were encoded with, as meta.json records it."""
        return self.meta.get("tokenizer", {}).get("sha256")

    def shard_paths(self, split: str) -> list[Path]:
        """The shards of one split ("train" or "val"), in order, as listed by meta.json."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        return [self.path / s["file"] for s in self.meta["shards"][split]]

    def stream(self, split: str) -> TokenStream:
        """One split's tokens, each shard checked against the tokenizer meta.json records; close() it."""
        return TokenStream(self.shard_paths(split), self.tokenizer_sha)

    def write_tokenizer(self, tokenizer: Tokenizer) -> dict:
        """tokenizer.model and token_bytes.npy (each token's UTF-8 length, for tools outside nanokor);
        returns their entry for meta.json."""
        atomic_write(self.path / self.TOKENIZER, tokenizer.model_bytes)
        atomic_write(self.path / self.TOKEN_BYTES, lambda f: np.save(f, tokenizer.token_bytes))
        return {"file": self.TOKENIZER, "token_bytes": self.TOKEN_BYTES, "sha256": tokenizer.sha256,
                "vocab_size": tokenizer.vocab_size}

    def write_meta(self, meta: dict) -> None:
        atomic_write(self.path / self.META, json.dumps(meta, ensure_ascii=False, indent=2).encode("utf-8"))
        self.__dict__.pop("meta", None)
