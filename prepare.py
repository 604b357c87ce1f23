"""Turn a Korean corpus into what training reads: a tokenizer and validated token shards.

    python prepare.py --dataset sample                                   # embedded sample, seconds
    python prepare.py --data-files 'corpus/*.parquet'                    # local parquet/jsonl/txt
    python prepare.py --subset tiny-textbooks --max-bytes 2G             # maywell/korean_textbooks
    python prepare.py --dataset owner/name --subset a,b --split train    # any Hub dataset, or a directory

Output (default data/<name>/): tokenizer.model, token_bytes.npy, train_000000.bin …, val_000000.bin …,
meta.json. The directory is built as <out>.partial and renamed when complete.
"""

import argparse
import os
import re
import shlex
import shutil
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

import nanokor
from nanokor.corpus import HF_DATASET, clean, open_corpus
from nanokor.encode import doc_key, encode_to_shards, split_of
from nanokor.errors import DataError, exit_on_error
from nanokor.shards import DataDir
from nanokor.tokenizer import DEFAULT_VOCAB, Tokenizer, train_tokenizer

# The embedded sample has ~100 documents: 1% would leave validation with one or two of them.
DEFAULT_VAL_FRACTION = {"sample": 0.10}
DEFAULT_VAL_FRACTION_OTHER = 0.01
ALL_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def parse_size(text: str) -> int:
    """'500M', '2G', '1.5e6', '1048576' -> bytes (K/M/G/T are powers of 1000)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 500M or 2G")
    return int(float(m.group(1)) * 1000 ** " kmgt".index(m.group(2).lower() or " "))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("source")
    src.add_argument("--dataset", default=HF_DATASET, metavar="ID_OR_DIR",
                     help="a Hugging Face dataset id, streamed (default: %(default)s), a local directory laid "
                          "out like one (data files, and a README.md whose `configs:` names them), or 'sample': "
                          "the Korean sample shipped in nanokor/data/sample")
    src.add_argument("--subset",
                     help="the dataset's configs, comma-separated (e.g. tiny-textbooks,claude_evol), or 'all'; "
                          f"default: all, but for {HF_DATASET} its distinct configs, without the duplicate "
                          "mmlu_* copies")
    src.add_argument("--split", default="train", help="the dataset's split (default: train)")
    src.add_argument("--data-files", nargs="+", metavar="GLOB",
                     help="local .parquet/.jsonl/.txt files (globs; quote them); overrides --dataset")
    src.add_argument("--val-files", nargs="+", metavar="GLOB",
                     help="held-out .parquet/.jsonl/.txt files: every document goes to validation, none to "
                          "training (files --data-files also matches are left out of training); "
                          "--val-fraction then defaults to 0")
    src.add_argument("--text-column", default="text", help="the column (jsonl field) holding the text")
    src.add_argument("--max-docs", type=int, help="stop after this many documents")
    src.add_argument("--max-bytes", type=parse_size, help="stop after this much raw text (e.g. 2G)")
    tok = p.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer", metavar="PATH", help="reuse this SentencePiece .model instead of training one")
    tok.add_argument("--vocab-size", type=int,
                     help=f"default {DEFAULT_VOCAB}, capped for small corpora at one piece per 40 bytes of "
                          "tokenizer-training text (multiple of 256); at most 65535 (uint16 shards)")
    tok.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="SentencePiece algorithm (bpe)")
    tok.add_argument("--tokenizer-sample-bytes", type=parse_size, default=parse_size("50M"),
                     help="train the tokenizer on the first this-many bytes of clean training documents (50M)")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, help="output directory (default data/<name>, e.g. data/sample)")
    out.add_argument("--val-fraction", type=float,
                     help="share of documents for validation, chosen by content hash "
                          f"(default {DEFAULT_VAL_FRACTION_OTHER}; 0.1 for the small sample)")
    out.add_argument("--shard-tokens", type=positive_int, default=100_000_000, help="tokens per shard file (100M: 200 MB files)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--num-proc", type=int, default=ALL_CORES,
                   help=f"worker processes that read, clean and tokenize (default: all cores, {ALL_CORES})")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for tokenizer training (the split depends on document content only)")
    return p


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


def warn_held_out_names(corpus, explicit_val: bool) -> None:
    """A file named like a held-out split, read as training text, is usually a glob that caught too
    much (corpus/*.parquet over train-* and validation-*): say so, and how to hold it out."""
    if explicit_val:
        return
    suspicious = [f for f in corpus.info.get("files", []) if HELD_OUT_NAME.search(Path(f).stem)]
    if suspicious:
        names = ", ".join(Path(f).name for f in suspicious[:3]) + (" ..." if len(suspicious) > 3 else "")
        print(f"warning: {names} look{'s' if len(suspicious) == 1 else ''} like held-out data but will be "
              "trained on (documents are split by content hash). To keep them out of training, pass them "
              "with --val-files, e.g. --data-files 'corpus/train-*.parquet' --val-files "
              "'corpus/validation-*.parquet'.", file=sys.stderr)


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


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to clobber, before any slow work."""
    if out.exists():
        if not overwrite:
            raise DataError(f"{out} already exists. Pass --overwrite to replace it, or choose another --out.")
        if not (out / "meta.json").is_file():
            raise DataError(f"{out} exists but is not a prepared data directory (no meta.json); refusing to "
                            "delete it with --overwrite. Remove it yourself or choose another --out.")


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


# File names that say "held out": validation-00000-of-00001.parquet, val.jsonl, test_2.txt, dev.txt ...
HELD_OUT_NAME = re.compile(r"(^|[-_.])(validation|valid|val|test|dev|eval)([-_.\d]|$)", re.IGNORECASE)


def run(args, argv: list[str]) -> dict:
    val_corpus = open_corpus(data_files=args.val_files, text_column=args.text_column) if args.val_files else None
    held_out_files = [Path(f) for f in val_corpus.info["files"]] if val_corpus else []
    corpus = open_corpus(args.dataset, subsets=args.subset, split=args.split, data_files=args.data_files,
                         text_column=args.text_column, max_docs=args.max_docs, max_bytes=args.max_bytes,
                         exclude=held_out_files)
    warn_held_out_names(corpus, bool(val_corpus))
    out = args.out or Path("data") / corpus.name
    val_fraction = args.val_fraction
    if val_fraction is None:
        val_fraction = 0.0 if val_corpus else DEFAULT_VAL_FRACTION.get(corpus.info["source"],
                                                                       DEFAULT_VAL_FRACTION_OTHER)
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1), e.g. 0.01.")
    if args.tokenizer and args.vocab_size:
        raise DataError("--vocab-size applies when training a tokenizer; --tokenizer reuses one. Pass one of them.")
    check_output_dir(out, args.overwrite)
    num_proc = max(1, args.num_proc)
    print(describe(corpus.info, args.max_docs, args.max_bytes))
    warn_duplicate_subsets(corpus.info)

    if args.tokenizer:
        try:
            tokenizer = Tokenizer.load(args.tokenizer)
        except OSError as e:
            raise DataError(f"Cannot read --tokenizer {args.tokenizer}: {e.strerror}.") from None
        tokenizer_info = {"reused": str(args.tokenizer)}
    else:
        t0 = time.time()
        sample = tokenizer_sample(corpus, args.tokenizer_sample_bytes, val_fraction)
        sample_bytes = sum(len(d.encode("utf-8")) for d in sample)
        print(f"training a {args.model_type} tokenizer on {len(sample):,} documents ({sample_bytes / 1e6:.1f} MB)")
        tokenizer = train_tokenizer(sample, vocab_size=args.vocab_size, model_type=args.model_type,
                                    num_threads=num_proc, seed=args.seed)
        if args.vocab_size is None and tokenizer.vocab_size < DEFAULT_VOCAB:
            print(f"vocab size {tokenizer.vocab_size:,}: capped from {DEFAULT_VOCAB:,} for a small corpus "
                  f"(one piece per 40 bytes of training text; --vocab-size to choose)")
        tokenizer_info = {"model_type": args.model_type, "trained_on_documents": len(sample),
                          "trained_on_bytes": sample_bytes, "seconds": round(time.time() - t0, 2)}
        del sample
    staging = DataDir(staging_dir(out))
    tokenizer_meta = staging.write_tokenizer(tokenizer)

    t0 = time.time()
    with tqdm(total=args.max_bytes, unit="B", unit_scale=True, desc="encode", disable=None) as bar:
        n_tokens = 0

        def progress(n_bytes: int, tokens: int) -> None:
            nonlocal n_tokens
            n_tokens += tokens
            bar.update(n_bytes)
            bar.set_postfix_str(f"{n_tokens / max(time.time() - t0, 1e-9) / 1e6:.2f}M tok/s", refresh=False)

        result = encode_to_shards(corpus.tasks(), tokenizer, staging.path, val_fraction=val_fraction,
                                  shard_tokens=args.shard_tokens, num_proc=num_proc, progress=progress,
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
        "command": shlex.join(["python", "prepare.py", *argv]),
        "corpus": {**corpus.info, "max_docs": args.max_docs, "max_bytes": args.max_bytes},
        "val_files": val_corpus.info["files"] if val_corpus else None,
        "val_fraction": val_fraction,
        "cleaning": dict(Counter(result["cleaning"]) + corpus.counts),  # read problems: workers' and ours
        "splits": splits,
        "tokenizer": {**tokenizer_meta, **tokenizer_info},
        "compression": {"split": held_out, "bytes_per_token": s["bytes"] / text_tokens,
                        "hangul_per_token": s["hangul"] / text_tokens},
        "document_framing": "<s> text </s>",
        "encode_seconds": round(seconds, 2),
        "shards": result["shards"],
    }
    staging.write_meta(meta)
    replace_dir(staging.path, out)
    report(out, meta, seconds)
    return meta


def report(out: Path, meta: dict, seconds: float) -> None:
    total_bytes = sum(s["bytes"] for s in meta["splits"].values())
    for name, s in meta["splits"].items():
        print(f"{name:>5}: {s['documents']:>10,} docs {s['bytes'] / 1e6:>10.1f} MB {s['tokens']:>13,} tokens "
              f"in {len(meta['shards'][name])} shard(s)")
    cleaning = ", ".join(f"{k} {v:,}" for k, v in sorted(meta["cleaning"].items())) or "nothing to clean"
    print(f"cleaning: {cleaning}")
    c = meta["compression"]
    print(f"compression on {c['split']}: {c['hangul_per_token']:.2f} Hangul chars/token, "
          f"{c['bytes_per_token']:.2f} bytes/token (vocab {meta['tokenizer']['vocab_size']:,})")
    print(f"encoded {total_bytes / 1e6:.1f} MB in {seconds:.1f} s ({total_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s) "
          f"-> {out}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    return exit_on_error(run, args, argv)


if __name__ == "__main__":
    sys.exit(main())
