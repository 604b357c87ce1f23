"""The encoding pipeline prepare.py runs: documents in, train/val shards out.

Worker processes read, clean, hash and tokenize units of work (see `Corpus.tasks`); this process
deduplicates, splits and writes the shards (nanokor/shards.py's `ShardWriter`). The split goes by a
hash of each document's content, so the same text always lands in the same split; documents named
as held out (`val_tasks`) go to validation whole.
"""

import hashlib
import multiprocessing as mp
import sys
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path

import numpy as np
import sentencepiece as spm

from nanokor.corpus import clean
from nanokor.shards import DTYPE, SPLITS, ShardWriter
from nanokor.tokenizer import BOS_ID, EOS_ID, Tokenizer

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


def _encode_part(tagged_part) -> dict:
    """Worker: read, clean, hash, measure and tokenize one unit of work (see `Corpus.tasks`), given as
    (held_out, part). Returns per document its key and measures, and all of its tokens as <s> … </s>
    runs back to back."""
    held_out, part = tagged_part
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
    return dict(held_out=held_out, keys=keys, counts=counts,
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


def ordered_map(fn, items: Iterable, num_proc: int, init, init_args) -> Iterator:
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
                     shard_tokens: int, num_proc: int, progress=None, val_tasks: Iterable = ()) -> dict:
    """Read, clean, deduplicate, split and tokenize a corpus into train/val shards in `out_dir`.

    `tasks` are units of work in source order, each with `read(counts)` (see `Corpus.tasks`). Workers
    read, clean and encode them in parallel; this process only dedups (a set of 64-bit keys, ~70
    bytes per document: the one thing that grows with the corpus), frames and writes, taking results
    in source order so that the first copy of a document is the one kept. `val_tasks` are held-out
    documents named explicitly (prepare's --val-files): they all go to val and are read first, so a
    copy of one among `tasks` is dropped as a duplicate rather than trained on. The documents of
    `tasks` are split by content hash (`split_of`). Returns counts per split, cleaning counts and the
    shard list, for meta.json.
    """
    writers = {s: ShardWriter(out_dir, s, shard_tokens=shard_tokens, vocab_size=tokenizer.vocab_size,
                              tokenizer_sha=tokenizer.sha256) for s in SPLITS}
    stats = {s: Counter(documents=0, characters=0, bytes=0, hangul=0, tokens=0) for s in SPLITS}
    cleaning: Counter = Counter()
    seen: set[int] = set()
    tagged = chain(((True, t) for t in val_tasks), ((False, t) for t in tasks))
    results = ordered_map(_encode_part, tagged, num_proc, _init_worker, (tokenizer.model_bytes,))
    for r in results:
        cleaning.update(r["counts"])
        new = _first_seen(r["keys"], seen)
        cleaning["duplicates"] += len(new) - int(np.count_nonzero(new))
        keys = np.array(r["keys"], np.uint64)
        in_val = np.ones(len(keys), bool) if r["held_out"] else _in_val(keys, val_fraction)
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
