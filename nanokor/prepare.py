"""Build a prepared data directory from a corpus: the pipeline behind prepare.py, which train.py also
runs when the embedded sample it is pointed at (data/sample, the default data_dir) is not there yet.

    say what will be read -> tokenizer (trained on the first clean training documents, or reused)
      -> shards (nanokor/encode.py's worker processes) -> meta.json, written last -> rename into place

The directory is built as <out>.partial and renamed when complete, so a killed run never leaves data
that looks finished; an existing <out> is replaced only with overwrite=True, and moved aside first.
"""

import fcntl
import os
import shutil
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

import nanokor
from nanokor import chat_data
from nanokor.chat_format import require_chat_tokens
from nanokor.corpus import HF_DATASET, clean, open_corpus
from nanokor.encode import doc_key, encode_to_shards, split_of
from nanokor.errors import DataError
from nanokor.shards import CONVERSATIONS, DOCUMENTS, DataDir
from nanokor.tokenizer import DEFAULT_VOCAB, Tokenizer, train_tokenizer

# The embedded sample has ~100 documents: 1% would leave validation with one or two of them.
DEFAULT_VAL_FRACTION = {"sample": 0.10}
DEFAULT_VAL_FRACTION_OTHER = 0.01
TOKENIZER_SAMPLE_BYTES = 50_000_000
SHARD_TOKENS = 100_000_000  # 200 MB files
ALL_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
SAMPLE_COMMAND = "python prepare.py --dataset sample"
DEFAULT_CONTEXT = 1024  # --chat: the longest conversation kept fits config/base.py's block_size


def default_out(corpus_name: str) -> Path:
    """Where a corpus is prepared when no --out is given: data/<name> (data/sample for the sample)."""
    return Path("data") / corpus_name


def build(corpus, out: Path, *, command: str, val_corpus=None, tokenizer_path=None, vocab_size: int | None = None,
          model_type: str = "bpe", tokenizer_sample_bytes: int = TOKENIZER_SAMPLE_BYTES,
          val_fraction: float | None = None, shard_tokens: int = SHARD_TOKENS, num_proc: int = ALL_CORES,
          seed: int = 0, overwrite: bool = False) -> dict:
    """Prepare `corpus` (nanokor.corpus.open_corpus) into `out`; returns meta.json's contents.

    `val_corpus` holds documents that all go to validation; otherwise a `val_fraction` of documents
    does, chosen by content hash (None: the default for the kind of source). `tokenizer_path` reuses a
    SentencePiece model instead of training one on `tokenizer_sample_bytes` of training text.
    `command` is recorded in meta.json."""
    if val_fraction is None:
        val_fraction = 0.0 if val_corpus else DEFAULT_VAL_FRACTION.get(corpus.info["source"],
                                                                       DEFAULT_VAL_FRACTION_OTHER)
    check_output_dir(out, overwrite)
    print(describe(corpus.info, corpus.max_docs, corpus.max_bytes))
    warn_duplicate_subsets(corpus.info)

    if tokenizer_path:
        tokenizer = Tokenizer.load(tokenizer_path)
        tokenizer_info = {"reused": str(tokenizer_path)}
    else:
        t0 = time.time()
        sample = tokenizer_sample(corpus, tokenizer_sample_bytes, val_fraction)
        sample_bytes = sum(len(d.encode("utf-8")) for d in sample)
        print(f"training a {model_type} tokenizer on {len(sample):,} documents ({sample_bytes / 1e6:.1f} MB)")
        tokenizer = train_tokenizer(sample, vocab_size=vocab_size, model_type=model_type, num_threads=num_proc,
                                    seed=seed)
        if vocab_size is None and tokenizer.vocab_size < DEFAULT_VOCAB:
            print(f"vocab size {tokenizer.vocab_size:,}: capped from {DEFAULT_VOCAB:,} for a small corpus "
                  f"(one piece per 40 bytes of training text; --vocab-size to choose)")
        tokenizer_info = {"model_type": model_type, "trained_on_documents": len(sample),
                          "trained_on_bytes": sample_bytes, "seconds": round(time.time() - t0, 2)}
        del sample
    meta = _build_into(out, lambda staging: _write_data(staging, corpus, val_corpus, tokenizer, tokenizer_info,
                                                         val_fraction, shard_tokens, num_proc, command))
    report(out, meta)
    return meta


def _build_into(out: Path, write) -> dict:
    """`write(staging)` into <out>.partial, then renamed to `out`; returns its meta. A refusal (a damaged
    file, no text) leaves nothing; a kill leaves <out>.partial, which the next run removes."""
    staging = DataDir(staging_dir(out))
    try:
        meta = write(staging)
    except Exception:
        shutil.rmtree(staging.path, ignore_errors=True)
        raise
    replace_dir(staging.path, out)
    return meta


def _write_data(staging: DataDir, corpus, val_corpus, tokenizer: Tokenizer, tokenizer_info: dict, val_fraction: float,
                shard_tokens: int, num_proc: int, command: str) -> dict:
    """The tokenizer, the shards and meta.json (last) into `staging`; returns meta."""
    tokenizer_meta = staging.write_tokenizer(tokenizer)

    t0 = time.time()
    with tqdm(total=corpus.max_bytes, unit="B", unit_scale=True, desc="encode", disable=None) as bar:
        n_tokens = 0

        def progress(n_bytes: int, tokens: int) -> None:
            nonlocal n_tokens
            n_tokens += tokens
            bar.update(n_bytes)
            bar.set_postfix_str(f"{n_tokens / max(time.time() - t0, 1e-9) / 1e6:.2f}M tok/s", refresh=False)

        result = encode_to_shards(corpus.tasks(), tokenizer, staging.path, val_fraction=val_fraction,
                                  shard_tokens=shard_tokens, num_proc=num_proc, progress=progress,
                                  val_tasks=val_corpus.tasks() if val_corpus else ())
    seconds = time.time() - t0
    splits = result["splits"]
    if splits["train"]["documents"] == 0:
        raise DataError("No training documents were written (every document was empty, duplicate or in "
                        "validation). Check the source, --text-column and --val-fraction.")
    held_out = "val" if splits["val"]["documents"] else "train"
    s = splits[held_out]
    text_tokens = s["tokens"] - 2 * s["documents"]  # without the <s> </s> framing
    meta = {
        "nanokor_version": nanokor.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "corpus": {**corpus.info, "max_docs": corpus.max_docs, "max_bytes": corpus.max_bytes},
        "val_files": val_corpus.info["files"] if val_corpus else None,
        "val_fraction": val_fraction,
        "cleaning": dict(Counter(result["cleaning"]) + corpus.counts),  # read problems: workers' and ours
        "splits": splits,
        "tokenizer": {**tokenizer_meta, **tokenizer_info},
        "content": DOCUMENTS,
        "compression": {"split": held_out, "bytes_per_token": s["bytes"] / text_tokens,
                        "hangul_per_token": s["hangul"] / text_tokens},
        "document_framing": "<s> text </s>",
        "encode_seconds": round(seconds, 2),
        "shards": result["shards"],
    }
    staging.write_meta(meta)
    return meta


def build_chat(corpus, out: Path, *, command: str, tokenizer_path: str, val_corpus=None, layout: str | None = None,
               columns: dict | None = None, context: int = DEFAULT_CONTEXT, val_fraction: float | None = None,
               shard_tokens: int = SHARD_TOKENS, num_proc: int = ALL_CORES, overwrite: bool = False) -> dict:
    """Prepare the conversations of `corpus` (nanokor.corpus.open_records) into chat shards at `out`, with
    the base model's tokenizer (`tokenizer_path`: a .model or a checkpoint); returns meta.json's contents.

    `layout` (chat_data.LAYOUTS) is detected from the first record when None; `columns` maps a layout's
    fields to other column names. Conversations longer than `context` + 1 tokens are left out, counted."""
    if val_fraction is None:
        val_fraction = 0.0 if val_corpus else DEFAULT_VAL_FRACTION.get(corpus.info["source"], DEFAULT_VAL_FRACTION_OTHER)
    tokenizer = load_chat_tokenizer(tokenizer_path)
    check_output_dir(out, overwrite)
    first = next(iter(corpus.documents()), None)
    if first is None:
        raise DataError(f"{describe_records(corpus.info)} holds no records. Check the source.")
    layout, column_of = chat_data.resolve_layout(first, layout, columns or {})
    held_first = next(iter(val_corpus.documents()), None) if val_corpus else None
    if held_first is not None:
        chat_data.resolve_layout(held_first, layout, columns or {})  # the same layout, or a clear error now
    print(f"{describe_records(corpus.info)}{f'; at most {corpus.max_docs:,} records' if corpus.max_docs else ''}: "
          f"{layout} conversations, {chat_data.LAYOUTS[layout].holds} (" +
          ", ".join(f"{field} <- {column!r}" if field != column else repr(column)
                    for field, column in column_of.items()) + f"); context {context} tokens")

    meta = _build_into(out, lambda staging: _write_chat_data(staging, corpus, val_corpus, tokenizer, layout, column_of,
                                                              context, val_fraction, shard_tokens, num_proc, command,
                                                              tokenizer_path))
    report_chat(out, meta)
    return meta


def _write_chat_data(staging: DataDir, corpus, val_corpus, tokenizer: Tokenizer, layout: str, column_of: dict,
                     context: int, val_fraction: float, shard_tokens: int, num_proc: int, command: str,
                     tokenizer_path: str) -> dict:
    """The tokenizer, the chat shards and meta.json (last) into `staging`; returns meta."""
    tokenizer_meta = staging.write_tokenizer(tokenizer)
    t0 = time.time()
    with tqdm(unit="conv", unit_scale=True, desc="render", disable=None) as bar:
        n_tokens = 0

        def progress(records: int, tokens: int) -> None:
            nonlocal n_tokens
            n_tokens += tokens
            bar.update(records)
            bar.set_postfix_str(f"{n_tokens / max(time.time() - t0, 1e-9) / 1e3:.0f}k tok/s", refresh=False)

        result = chat_data.encode_conversations(
            corpus.documents(), tokenizer, staging.path, layout=layout, columns=column_of, context=context,
            val_fraction=val_fraction, shard_tokens=shard_tokens, num_proc=num_proc, progress=progress,
            val_records=val_corpus.documents() if val_corpus else ())
    seconds = time.time() - t0
    splits, left_out = result["splits"], result["left_out"]
    if splits["train"]["conversations"] == 0:
        raise DataError(f"No training conversations were written: of the records read, {left_out['total']:,} "
                        f"were left out ({', '.join(f'{k} {v:,}' for k, v in left_out['kinds'].items()) or 'none'}) "
                        "and the rest were duplicates or in validation. " + (
                            f"The first: {next(iter(left_out['examples'].values()))}. " if left_out['examples'] else "")
                        + "Check the source, --chat-format, --columns and --context.")
    meta = {
        "nanokor_version": nanokor.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "content": CONVERSATIONS,
        "corpus": {**corpus.info, "max_docs": corpus.max_docs, "layout": layout, "columns": column_of},
        "val_files": val_corpus.info["files"] if val_corpus else None,
        "val_fraction": val_fraction,
        "context": context,
        "cleaning": dict(Counter(result["cleaning"]) + corpus.counts + (val_corpus.counts if val_corpus else Counter())),
        "left_out": left_out,
        "splits": splits,
        "tokenizer": {**tokenizer_meta, "reused": str(tokenizer_path)},
        "chat_format": "nanokor/chat_format.py: <s>, then <|im_start|>role\\n content <|im_end|>\\n per turn; "
                       "trained: assistant content and its <|im_end|>",
        "encode_seconds": round(seconds, 2),
        "shards": result["shards"],
    }
    staging.write_meta(meta)
    return meta


def load_chat_tokenizer(path: str) -> Tokenizer:
    """--tokenizer for --chat: a SentencePiece .model or a checkpoint (.pt) that carries one; it must hold
    the chat tokens."""
    if Path(path).suffix == ".pt":
        from nanokor.checkpoint import build_tokenizer, load_checkpoint  # torch: only on this path

        tokenizer = build_tokenizer(load_checkpoint(path, mmap=True))
    else:
        tokenizer = Tokenizer.load(path)
    require_chat_tokens(tokenizer, f"--tokenizer {path}")
    return tokenizer


def describe_records(info: dict) -> str:
    """What --chat reads, said before reading."""
    if info["source"] == "sample":
        return f"reading the embedded Korean conversation sample ({', '.join(info['files'])})"
    if info["source"] == "files":
        names = ", ".join(Path(f).name for f in info["files"][:3]) + (" ..." if len(info["files"]) > 3 else "")
        return f"reading {len(info['files'])} local file(s) ({names})"
    where = "the Hugging Face Hub" if info["source"] == "hub" else "a local dataset directory"
    return (f"reading {info['dataset']} from {where}, streamed: {len(info['subsets'])} config(s) "
            f"({', '.join(info['subsets'])}), split {info['split']!r}")


def report_chat(out: Path, meta: dict) -> None:
    for name, s in meta["splits"].items():
        print(f"{name:>5}: {s['conversations']:>9,} conversations {s['replies']:>9,} replies {s['tokens']:>12,} tokens "
              f"({s['trained_tokens']:,} trained) in {len(meta['shards'][name])} shard(s)")
    left = meta["left_out"]
    if left["total"]:
        kinds = ", ".join(f"{k} {v:,}" for k, v in left["kinds"].items())
        print(f"left out: {left['total']:,} malformed conversation(s), never trained on: {kinds}; the first of each "
              f"kind is in {out / DataDir.META} (left_out.examples)")
    else:
        print("left out: none (every conversation is well formed and fits the context)")
    cleaning = ", ".join(f"{k} {v:,}" for k, v in sorted(meta["cleaning"].items())) or "nothing to clean"
    print(f"cleaning: {cleaning}")
    print(f"rendered in {meta['encode_seconds']:.1f} s -> {out}")


def sample_missing(data_dir) -> bool:
    """Whether `data_dir` is where `python prepare.py --dataset sample` writes (data/sample, from the
    current directory) and nothing is there yet: the one missing data directory that can be made here."""
    return Path(data_dir).resolve() == default_out("sample").resolve() and not Path(data_dir).exists()


def prepare_sample(out) -> bool:
    """Prepare the embedded sample into `out` (about a second) unless it is there by now; returns whether
    it did. Runs started side by side on a fresh clone (a sweep) take turns on a lock on the parent
    directory, so one prepares and the others find it done."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(out.parent, os.O_RDONLY)
    except OSError as e:
        raise DataError(f"Cannot prepare the embedded sample into {out} ({e.strerror}: {e.filename}). Point "
                        "data_dir at a prepared directory, or run prepare.py with a writable --out.") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if out.exists():
            return False
        build(open_corpus("sample"), out, command=SAMPLE_COMMAND)
        return True
    finally:
        os.close(fd)  # releases the lock


# ---- the steps, in the order build calls them --------------------------------------------------

def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to clobber, before any slow work."""
    if out.exists():
        if not overwrite:
            raise DataError(f"{out} already exists. Pass --overwrite to replace it, or choose another --out.")
        if not (out / "meta.json").is_file():
            raise DataError(f"{out} exists but is not a prepared data directory (no meta.json); refusing to "
                            "delete it with --overwrite. Remove it yourself or choose another --out.")


def describe(info: dict, max_docs: int | None, max_bytes: int | None) -> str:
    """One paragraph on what will be read, printed before reading starts."""
    if info["source"] == "sample":
        what = f"the embedded Korean sample ({len(info['files'])} files)"
    elif info["source"] == "files":
        names = ", ".join(Path(f).name for f in info["files"][:3]) + (" ..." if len(info["files"]) > 3 else "")
        what = f"{len(info['files'])} local file(s) ({names}), column {info['text_column']!r}"
    else:
        where = "the Hugging Face Hub" if info["source"] == "hub" else "a local dataset directory"
        what = (f"{info['dataset']} from {where}, streamed: {len(info['subsets'])} config(s) in turn "
                f"({', '.join(info['subsets'])}), split {info['split']!r}, column {info['text_column']!r}")
    caps = (f"; at most {max_docs:,} documents" if max_docs else "") + (f"; at most {max_bytes / 1e6:,.0f} MB"
                                                                         if max_bytes else "")
    return f"reading {what}{caps}"


def warn_duplicate_subsets(info: dict) -> None:
    """maywell/korean_textbooks' mmlu_* configs are copies of one another (see corpus.HF_DATASET_SUBSETS)."""
    mmlu = [s for s in info["subsets"] if s.startswith("mmlu_")] if info.get("dataset") == HF_DATASET else []
    if mmlu:
        print(f"warning: {len(mmlu)} of the configs read are {HF_DATASET}'s mmlu_* ones, identical ~149 MB copies "
              "of one another (their repeated documents are dropped, but only after being streamed), and text "
              "derived from MMLU contaminates a KMMLU evaluation. The default --subset leaves them out.",
              file=sys.stderr)


def tokenizer_sample(corpus, max_bytes: int, val_fraction: float) -> list[str]:
    """The first `max_bytes` of clean, distinct training documents; validation documents are left out
    so that compression measured on them is honest."""
    docs, seen, total = [], set(), 0
    for raw in corpus.documents():
        text, utf8 = clean(raw)
        key = doc_key(utf8)
        if not text.strip() or key in seen or split_of(key, val_fraction) == "val":
            continue
        seen.add(key)
        docs.append(text)
        total += len(utf8)
        if total >= max_bytes:
            break
    if not docs:
        raise DataError("No training text to fit a tokenizer on: the source produced no non-empty documents "
                        "outside the validation split. Check --data-files/--text-column, or lower --val-fraction.")
    return docs


def staging_dir(out: Path) -> Path:
    """The directory the run writes into, renamed to `out` once complete."""
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted run
    try:
        staging.mkdir(parents=True)
        (staging / ".writable").touch()
        (staging / ".writable").unlink()
    except OSError as e:
        raise DataError(f"Cannot write the output directory {out} ({e.strerror}: {e.filename}). Choose a "
                        "writable --out.") from None
    return staging


def replace_dir(staging: Path, out: Path) -> None:
    """Put the finished `staging` at `out`. An existing `out` is moved aside first and deleted last, so
    an interruption leaves the old data whole (as `<out>.old` at worst), never a half-deleted mix."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old)


def report(out: Path, meta: dict) -> None:
    seconds = meta["encode_seconds"]
    total_bytes = sum(s["bytes"] for s in meta["splits"].values())
    for name, s in meta["splits"].items():
        print(f"{name:>5}: {s['documents']:>10,} docs {s['bytes'] / 1e6:>10.1f} MB {s['tokens']:>13,} tokens "
              f"in {len(meta['shards'][name])} shard(s)")
    cleaning = ", ".join(f"{k} {v:,}" for k, v in sorted(meta["cleaning"].items())) or "nothing to clean"
    print(f"cleaning: {cleaning}")
    c = meta["compression"]
    print(f"compression on {c['split']}: {c['hangul_per_token']:.2f} Hangul chars/token, "
          f"{c['bytes_per_token']:.2f} bytes/token (vocab {meta['tokenizer']['vocab_size']:,})")
    print(f"encoded {total_bytes / 1e6:.1f} MB in {seconds:.1f} s ({total_bytes / 1e6 / max(seconds, 1e-2):.1f} MB/s) "
          f"-> {out}")
