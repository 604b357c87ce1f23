"""How fast is prepare.py next to the tokenizer itself?

Measures, on the same text and the same cores, in the same run (so a busy machine slows both):
  raw      SentencePiece batch-encode of the corpus, NFC'd and already in memory
           (encode(texts, num_threads=N)); also with numpy output, SentencePiece's fastest form;
  prepare  `prepare.py --data-files … --tokenizer …` end to end, in this process: read parquet, clean,
           dedup, split, encode in N worker processes, write shards and meta.json.
Tokenizer training is excluded (done once, up front). Runs alternate and the medians are compared;
the floor is prepare >= 0.8x raw. Also checks that prepare wrote exactly the tokens raw encode made
(for each distinct document, plus the <s> </s> framing). Other work on the machine makes every
number noisy, so each run also shows the share of the CPUs that other processes used meanwhile
(from /proc/stat, Linux), and the load average is recorded: trust runs where both are low. Prints a
table and writes bench/results/prepare_speed.json.

    python bench/prepare_speed.py [--data ../shared/data/korean_corpus] [--num-proc N] [--repeats 5]
"""

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanokor.corpus import normalize  # noqa: E402
from nanokor.shards import DataDir  # noqa: E402
from nanokor.tokenizer import train_tokenizer  # noqa: E402

FLOOR = 0.8


def load_prepare():
    spec = importlib.util.spec_from_file_location("prepare", REPO / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_seconds() -> tuple[float, float]:
    """CPU time used so far by the whole machine (nan where /proc/stat is missing) and by this process
    with its finished children."""
    try:
        ticks = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        machine = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except OSError:
        machine = float("nan")
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    return machine, own


def timed(fn) -> tuple[float, float, object]:
    """Seconds fn took, the share of the CPUs other processes used meanwhile, and fn's result."""
    (machine0, own0), t0 = cpu_seconds(), time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    machine, own = cpu_seconds()
    return seconds, max(0.0, (machine - machine0) - (own - own0)) / (seconds * os.cpu_count()), result


def main() -> None:
    prepare = load_prepare()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "korean_corpus",
                   help="directory of parquet files with a `text` column (default: ../shared/data/korean_corpus)")
    p.add_argument("--num-proc", type=int, default=prepare.ALL_CORES, help="processes and threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--tokenizer-sample-bytes", type=float, default=20e6)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "prepare_speed.json")
    args = p.parse_args()

    files = sorted(args.data.glob("*.parquet"))
    if not files:
        sys.exit(f"no parquet files in {args.data}; pass --data DIR")
    texts = [normalize(t or "") for f in files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    sample, size = [], 0
    for t in texts:
        if size >= args.tokenizer_sample_bytes:
            break
        sample.append(t)
        size += len(t.encode("utf-8"))
    tok = train_tokenizer(sample, vocab_size=args.vocab_size, num_threads=args.num_proc)
    distinct = list({t: None for t in texts if t.strip()})  # what prepare keeps, in order
    expected_tokens = sum(map(len, tok.sp.encode(distinct, num_threads=args.num_proc))) + 2 * len(distinct)

    runs = {"raw": [], "raw_numpy": [], "prepare": []}  # (seconds, others' CPU share) per run
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(tmp)
        for i in range(args.repeats):
            *run, ids = timed(lambda: tok.sp.encode(texts, num_threads=args.num_proc))
            runs["raw"].append(run)
            n_tokens = sum(map(len, ids))
            del ids
            runs["raw_numpy"].append(timed(lambda: tok.sp.encode(texts, num_threads=args.num_proc,
                                                                 out_type="numpy"))[:2])
            out = f"{tmp}/out{i}"
            argv = ["--data-files", *map(str, files), "--tokenizer", f"{tmp}/tokenizer.model", "--out", out,
                    "--num-proc", str(args.num_proc)]
            with contextlib.redirect_stdout(io.StringIO()):
                *run, rc = timed(lambda: prepare.main(argv))
            runs["prepare"].append(run)
            assert rc == 0, "prepare.py failed"
            written = sum(s["tokens"] for s in DataDir(out).meta["splits"].values())
            assert written == expected_tokens, f"prepare wrote {written:,} tokens, raw encode made {expected_tokens:,}"
            load.append(os.getloadavg()[0])

    median = {name: statistics.median(seconds for seconds, _ in r) for name, r in runs.items()}
    ratio, ratio_numpy = median["raw"] / median["prepare"], median["raw_numpy"] / median["prepare"]
    labels = {"raw": "raw encode (lists)", "raw_numpy": "raw encode (numpy)", "prepare": "prepare.py end to end"}
    print(f"\n{n_bytes / 1e6:.1f} MB, {len(texts):,} documents, {n_tokens:,} tokens, vocab {tok.vocab_size:,}, "
          f"{args.num_proc} processes/threads, {args.repeats} alternating runs (median); "
          f"load average {min(load):.2f}-{max(load):.2f} on {os.cpu_count()} cores")
    print(f"{'':<24}{'MB/s':>8}{'Mtok/s':>9}   runs: seconds (share of the CPUs other processes used)")
    for name, r in runs.items():
        print(f"{labels[name]:<24}{n_bytes / 1e6 / median[name]:>8.2f}{n_tokens / 1e6 / median[name]:>9.2f}   "
              f"{' '.join(f'{seconds:.2f} ({others:.0%})' for seconds, others in r)}")
    verdict = "PASS" if ratio >= FLOOR else "FAIL"
    print(f"prepare / raw = {ratio:.2f}x  (floor {FLOOR}x: {verdict});  prepare / raw numpy = {ratio_numpy:.2f}x")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "data": str(args.data), "bytes": n_bytes, "documents": len(texts), "tokens": n_tokens,
        "vocab_size": tok.vocab_size, "num_proc": args.num_proc, "cpu_count": os.cpu_count(),
        "machine": platform.platform(), "load_average": load,
        **{f"{name}_seconds": [seconds for seconds, _ in r] for name, r in runs.items()},
        **{f"{name}_others_cpu_share": [others for _, others in r] for name, r in runs.items()},
        "raw_mb_per_s": n_bytes / 1e6 / median["raw"], "prepare_mb_per_s": n_bytes / 1e6 / median["prepare"],
        "ratio": ratio, "ratio_vs_numpy": ratio_numpy, "floor": FLOOR, "verdict": verdict,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
