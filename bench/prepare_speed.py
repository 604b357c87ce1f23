"""How fast is prepare.py next to the tokenizer itself?

Measures, on the same text and the same cores, in the same run (so a busy machine slows both):
  raw      SentencePiece batch-encode of the corpus, already in memory (encode(texts, num_threads=N));
  prepare  `prepare.py --data-files … --tokenizer …` end to end: read parquet, clean, dedup, split,
           encode in N worker processes, write shards and meta.json.
Tokenizer training is excluded (done once, up front). Runs alternate and the medians are compared;
the floor is prepare >= 0.8x raw. Prints a table and writes bench/results/prepare_speed.json.

    python bench/prepare_speed.py [--data ../shared/data/korean_corpus] [--num-proc N] [--repeats 3]
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanokor.tokenizer import train_tokenizer  # noqa: E402

FLOOR = 0.8


def load_prepare():
    spec = importlib.util.spec_from_file_location("prepare", REPO / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    prepare = load_prepare()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "korean_corpus",
                   help="directory of parquet files with a `text` column (default: ../shared/data/korean_corpus)")
    p.add_argument("--num-proc", type=int, default=prepare.ALL_CORES, help="processes and threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--tokenizer-sample-bytes", type=float, default=20e6)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "prepare_speed.json")
    args = p.parse_args()

    files = sorted(args.data.glob("*.parquet"))
    if not files:
        sys.exit(f"no parquet files in {args.data}; pass --data DIR")
    texts = [t for f in files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    sample, size = [], 0
    for t in texts:
        if size >= args.tokenizer_sample_bytes:
            break
        sample.append(t)
        size += len(t.encode("utf-8"))
    tok = train_tokenizer(sample, vocab_size=args.vocab_size, num_threads=args.num_proc)

    raw_s, prep_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(tmp)
        for i in range(args.repeats):
            t0 = time.perf_counter()
            ids = tok.sp.encode(texts, num_threads=args.num_proc)
            raw_s.append(time.perf_counter() - t0)
            n_tokens = sum(map(len, ids))
            del ids
            t0 = time.perf_counter()
            rc = prepare.main(["--data-files", *map(str, files), "--tokenizer", f"{tmp}/tokenizer.model",
                               "--out", f"{tmp}/out{i}", "--num-proc", str(args.num_proc)])
            prep_s.append(time.perf_counter() - t0)
            assert rc == 0, "prepare.py failed"

    raw_mbs, prep_mbs = n_bytes / 1e6 / statistics.median(raw_s), n_bytes / 1e6 / statistics.median(prep_s)
    ratio = prep_mbs / raw_mbs
    rows = [("raw SentencePiece encode", raw_mbs, n_tokens / statistics.median(raw_s), raw_s),
            ("prepare.py end to end", prep_mbs, n_tokens / statistics.median(prep_s), prep_s)]
    print(f"\n{n_bytes / 1e6:.1f} MB, {len(texts):,} documents, {n_tokens:,} tokens, vocab {tok.vocab_size:,}, "
          f"{args.num_proc} processes/threads, {args.repeats} alternating runs (median)")
    print(f"{'':<26}{'MB/s':>8}{'Mtok/s':>9}   runs (s)")
    for name, mbs, tps, runs in rows:
        print(f"{name:<26}{mbs:>8.2f}{tps / 1e6:>9.2f}   {' '.join(f'{s:.2f}' for s in runs)}")
    verdict = "PASS" if ratio >= FLOOR else "FAIL"
    print(f"prepare / raw = {ratio:.2f}x  (floor {FLOOR}x: {verdict})")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "data": str(args.data), "bytes": n_bytes, "documents": len(texts), "tokens": n_tokens,
        "vocab_size": tok.vocab_size, "num_proc": args.num_proc, "cpu_count": os.cpu_count(),
        "machine": platform.platform(), "raw_seconds": raw_s, "prepare_seconds": prep_s,
        "raw_mb_per_s": raw_mbs, "prepare_mb_per_s": prep_mbs, "ratio": ratio, "floor": FLOOR, "verdict": verdict,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
