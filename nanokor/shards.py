"""Token shards: the on-disk format, the (atomic) writer, the (validated) reader, and the parallel
encoder that turns a corpus into train/val shards.

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

A data directory is complete only once meta.json exists: it is written last, by rename, and lists
the shards; `shard_paths` reads the list from it. Shards are likewise written to a .tmp name and
renamed when whole, so a killed prepare.py leaves nothing that looks finished.
"""

import hashlib
import json
import multiprocessing as mp
import os
import struct
import sys
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from nanokor.atomic import atomic_write
from nanokor.corpus import DataError, clean
from nanokor.tokenizer import BOS_ID, EOS_ID, Tokenizer

MAGIC = b"NKSHARD\0"
VERSION = 1
DTYPE = "<u2"
HEADER_SIZE = 256
_HEADER = struct.Struct("<8sIIQ8s32s")
SPLITS = ("train", "val")


class ShardError(DataError):
    """A shard that cannot be used as is: wrong file, truncated, or made with another tokenizer."""


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
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
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


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{data_dir} is not a prepared data directory: it has no meta.json (prepare.py writes it "
                        "last, so an interrupted run leaves none). Run `python prepare.py --dataset sample` "
                        "or see `python prepare.py --help`.")
    return json.loads(path.read_text(encoding="utf-8"))


def write_meta(data_dir: str | Path, meta: dict) -> None:
    atomic_write(Path(data_dir) / "meta.json", json.dumps(meta, ensure_ascii=False, indent=2).encode("utf-8"))


def shard_paths(data_dir: str | Path, split: str) -> list[Path]:
    """The shards of one split ("train" or "val"), in order, as listed by the directory's meta.json."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    return [Path(data_dir) / s["file"] for s in read_meta(data_dir)["shards"][split]]


class ShardWriter:
    """Appends tokens to `{split}_000000.bin`, `{split}_000001.bin`, … of `shard_tokens` tokens each.

    Each shard is written as `<name>.tmp` with a placeholder header, completed with the real header,
    fsynced, then renamed: a crash before the rename leaves only a .tmp file.
    """

    def __init__(self, out_dir: str | Path, split: str, *, shard_tokens: int, vocab_size: int, tokenizer_sha: str):
        self.out_dir, self.split, self.shard_tokens = Path(out_dir), split, shard_tokens
        self.vocab_size, self.tokenizer_sha = vocab_size, tokenizer_sha
        self.shards: list[dict] = []  # {"file": name, "tokens": n} of each finished shard
        self._file = None
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=DTYPE)
        while len(tokens):
            if self._file is None:
                name = f"{self.split}_{len(self.shards):06d}.bin"
                self._file = open(self.out_dir / (name + ".tmp"), "wb", buffering=1 << 20)
                self._file.write(b"\0" * HEADER_SIZE)
                self._count = 0
            part, tokens = tokens[: self.shard_tokens - self._count], tokens[self.shard_tokens - self._count:]
            self._file.write(part.tobytes())
            self._count += len(part)
            if self._count == self.shard_tokens:
                self._finish()

    def close(self) -> list[dict]:
        if self._file is not None:
            self._finish()
        return self.shards

    def _finish(self) -> None:
        f, self._file = self._file, None
        f.seek(0)
        f.write(pack_header(self.vocab_size, self._count, self.tokenizer_sha))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        tmp = Path(f.name)
        os.replace(tmp, tmp.with_suffix(""))  # drop ".tmp"
        self.shards.append({"file": tmp.with_suffix("").name, "tokens": self._count})


# ---------------------------------------------------------------------------------------------
# Document split and the parallel encoder


def doc_key(utf8: bytes) -> int:
    """64-bit content hash of a clean document's UTF-8: the key for exact dedup and for the split."""
    return int.from_bytes(hashlib.sha1(utf8).digest()[:8], "little")  # sha1: twice blake2b's speed here


def split_of(key: int, val_fraction: float) -> str:
    """Which split a document belongs to, from its content alone: the same text always lands in the
    same split, whatever else is in the corpus and in whatever order it is read."""
    return "val" if _in_val(key, val_fraction) else "train"


def _in_val(key, val_fraction: float):
    """`split_of`'s rule, for one key or a uint64 array of them."""
    return key % 1_000_000 < val_fraction * 1_000_000


_worker_tokenizer: Tokenizer | None = None
_BOS, _EOS = np.array([BOS_ID], np.int32), np.array([EOS_ID], np.int32)  # framing, in SentencePiece's dtype
_NUMPY_IDS = hasattr(spm.SentencePieceProcessor, "EncodeAsNumpy")  # numpy output: recent sentencepiece (0.2.3)


def _init_worker(model_bytes: bytes) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_bytes)


def _encode_part(part) -> dict:
    """Worker: read, clean, hash, measure and tokenize one unit of work (see `Corpus.tasks`). Returns
    per document its key and measures, and all of its tokens as <s> … </s> runs back to back."""
    counts: Counter = Counter()
    utf8s, keys, n_chars, n_hangul = [], [], [], []
    for raw in part.read(counts):
        text, utf8 = clean(raw, counts)
        if not text or text.isspace():
            counts["empty"] += 1
            continue
        utf16 = np.frombuffer(text.encode("utf-16-le"), dtype=np.uint16)
        utf8s.append(utf8)
        keys.append(doc_key(utf8))
        n_chars.append(len(text))
        n_hangul.append(np.count_nonzero(utf16 - np.uint16(0xAC00) <= 0xD7A3 - 0xAC00))  # syllables 가..힣
    ids = _encode_ids(_worker_tokenizer.sp, utf8s)
    framed = [run for doc in ids for run in (_BOS, doc, _EOS)]  # ids < vocab <= 65535: the cast below is exact
    return dict(keys=keys, counts=counts,
                ids=np.concatenate(framed, dtype=DTYPE, casting="unsafe") if framed else np.zeros(0, DTYPE),
                tokens=np.fromiter(map(len, ids), np.int64, len(ids)) + 2,
                bytes=np.fromiter(map(len, utf8s), np.int64, len(utf8s)),
                characters=np.array(n_chars, np.int64), hangul=np.array(n_hangul, np.int64))


def _encode_ids(sp, utf8s: list[bytes]) -> list[np.ndarray]:
    """Each document's token ids, as an array. UTF-8 in, because SentencePiece would otherwise convert
    every str again (the text is already NFC, so no encode_batch pass either)."""
    if _NUMPY_IDS:  # one buffer per document, no Python int per token
        return sp.encode(utf8s, num_threads=1, out_type="numpy")
    return [np.array(doc, np.int32) for doc in sp.encode(utf8s, num_threads=1)]


def _ordered_map(fn, items: Iterable, num_proc: int, init, init_args) -> Iterator:
    """map(fn, items) over `num_proc` worker processes, in order, with at most 4 tasks per worker in
    flight: enough queued work that a worker never waits on this process (reading the Hugging Face
    stream in bursts, or writing), while results never pile up, so memory stays bounded for any corpus."""
    if num_proc <= 1:
        init(*init_args)
        yield from map(fn, items)
        return
    # fork starts workers in milliseconds; spawn re-imports everything in each (~1 s, a third of a small
    # run). The workers touch numpy, sentencepiece and pyarrow's parquet reader without its thread pools
    # (see corpus._row_group), never the threads the parent may hold (pyarrow's pools, datasets, tqdm),
    # the same bet `datasets.map(num_proc=...)` makes. Elsewhere (macOS, where fork is unsafe, and
    # Windows) spawn.
    method = "fork" if sys.platform == "linux" else "spawn"
    with mp.get_context(method).Pool(num_proc, init, init_args) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 4 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def encode_to_shards(tasks: Iterable, tokenizer: Tokenizer, out_dir: str | Path, *, val_fraction: float,
                     shard_tokens: int, num_proc: int, progress=None) -> dict:
    """Read, clean, deduplicate, split and tokenize a corpus into train/val shards in `out_dir`.

    `tasks` are units of work in source order, each with `read(counts)` (see `Corpus.tasks`). Workers
    read, clean and encode them in parallel; this process only dedups (a set of 64-bit keys, ~70
    bytes per document: the one thing that grows with the corpus), frames and writes, taking results
    in source order so that the first copy of a document is the one kept. Returns counts per split,
    cleaning counts and the shard list, for meta.json.
    """
    writers = {s: ShardWriter(out_dir, s, shard_tokens=shard_tokens, vocab_size=tokenizer.vocab_size,
                              tokenizer_sha=tokenizer.sha256) for s in SPLITS}
    stats = {s: Counter(documents=0, characters=0, bytes=0, hangul=0, tokens=0) for s in SPLITS}
    cleaning: Counter = Counter()
    seen: set[int] = set()
    results = _ordered_map(_encode_part, tasks, num_proc, _init_worker, (tokenizer.model_bytes,))
    for r in results:
        cleaning.update(r["counts"])
        new = _first_seen(r["keys"], seen)
        cleaning["duplicates"] += len(new) - int(np.count_nonzero(new))
        in_val = _in_val(np.array(r["keys"], np.uint64), val_fraction)
        for split, keep in (("train", new & ~in_val), ("val", new & in_val)):
            if keep.any():
                writers[split].write(r["ids"] if keep.all() else r["ids"][np.repeat(keep, r["tokens"])])
                st = stats[split]
                st["documents"] += int(np.count_nonzero(keep))
                for name in ("characters", "bytes", "hangul", "tokens"):
                    st[name] += int(r[name][keep].sum())
        if progress is not None:
            progress(int(r["bytes"].sum()), len(r["ids"]))
    shards = {s: w.close() for s, w in writers.items()}
    return {"splits": {s: dict(c) for s, c in stats.items()}, "cleaning": dict(cleaning), "shards": shards}


def _first_seen(keys: list[int], seen: set[int]) -> np.ndarray:
    """Mask of the keys met for the first time (not in `seen`, nor earlier in `keys`); adds them to `seen`."""
    new = np.zeros(len(keys), bool)
    for i, key in enumerate(keys):
        if key not in seen:
            seen.add(key)
            new[i] = True
    return new
