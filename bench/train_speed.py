"""Throughput of train.py itself (data loading, logging and all) next to the bare model step.

    python bench/train_speed.py                          # corpus at ../shared/data/korean_corpus
    python bench/train_speed.py --corpus PATH --steps 500

The corpus (parquet files, column `text`) is prepared once into --data-dir (git-ignored data/...).
Then, in one run: the bare step (forward + backward + AdamW of the same model on random tokens, in this
process), `python train.py` for --steps steps in a subprocess (its metrics.jsonl gives step times and
peak RSS), and the bare step again, so that machine noise hits both sides.

    loop overhead = median train.py step time / median bare step time - 1        (goal <= 5%)
    RSS growth    = peak RSS at the last step / peak RSS at step --rss-from - 1   (goal <= 5%)

Prints a table and writes bench/results/train_speed.json.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from nanokor.model import ModelConfig, Transformer
from nanokor.config import load_config
from nanokor.logger import read_metrics
from nanokor.optim import build_optimizer
from nanokor.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="../shared/data/korean_corpus",
                   help="directory of .parquet files, relative to the repository root unless absolute")
    p.add_argument("--data-dir", default="data/bench-korean_corpus", help="prepared data (made if missing)")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokenizer size when preparing")
    p.add_argument("--steps", type=int, default=2000, help="train.py steps")
    p.add_argument("--warmup", type=int, default=50, help="train.py steps left out of the medians")
    p.add_argument("--rss-from", type=int, default=100, help="step whose peak RSS is the growth baseline")
    p.add_argument("--bare-steps", type=int, default=100, help="bare steps before and again after train.py")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-ff", type=int, default=384)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="bench/results/train_speed.json")
    return p.parse_args()


def prepare(corpus: Path, data_dir: Path, vocab_size: int) -> None:
    if (data_dir / "meta.json").is_file():
        return
    files = sorted(corpus.glob("*.parquet"))
    if not files:
        sys.exit(f"bench/train_speed.py: no .parquet files in {corpus}. Pass --corpus DIR (relative to the "
                 "repository root), e.g. --corpus ../shared/data/korean_corpus.")
    print(f"preparing {len(files)} parquet files from {corpus} into {data_dir} (once)", flush=True)
    subprocess.run([sys.executable, "prepare.py", "--data-files", *map(str, files), "--out", str(data_dir),
                    "--vocab-size", str(vocab_size)], cwd=REPO, check=True)


def bare_steps(args, vocab_size: int, n: int, desc: str) -> list[float]:
    """Seconds per forward + backward + AdamW step of the same model on random tokens."""
    config = ModelConfig(vocab_size=vocab_size, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                         d_ff=args.d_ff, max_seq_len=args.block_size)
    torch.manual_seed(0)
    model = Transformer(config)
    optimizer = build_optimizer(model, load_config(["--optimizer=adamw", "--schedule=cosine", "--lr=1e-3"]))
    x = torch.randint(0, vocab_size, (args.batch_size, args.block_size))
    y = torch.randint(0, vocab_size, (args.batch_size, args.block_size))
    times = []
    for i in tqdm(range(n + 3), desc=desc, unit="step"):
        t0 = time.perf_counter()
        _, loss = model(x, y, loss_only=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        if i >= 3:  # the first steps allocate optimizer state and warm the allocator
            times.append(time.perf_counter() - t0)
    return times


def train_py(args, data_dir: Path, out_dir: Path) -> list[dict]:
    cmd = [sys.executable, "train.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--device=cpu",
           "--dtype=fp32", f"--n_layer={args.n_layer}", f"--n_head={args.n_head}", f"--d_model={args.d_model}",
           f"--d_ff={args.d_ff}", f"--block_size={args.block_size}", f"--batch_size={args.batch_size}",
           f"--max_steps={args.steps}", f"--eval_interval={args.steps}", "--eval_tokens=65536",
           "--sample_tokens=16", "--warmup_steps=100", "--lr_factor=0.5", "--dropout=0", "--wandb_mode=disabled"]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)  # tqdm's bar (stderr) stays visible
    return [r for r in read_metrics(out_dir / "metrics.jsonl") if "loss" in r]


def main():
    args = parse_args()
    corpus = (REPO / args.corpus).resolve()
    data_dir = REPO / args.data_dir
    prepare(corpus, data_dir, args.vocab_size)
    vocab_size = Tokenizer.load(data_dir / "tokenizer.model").vocab_size

    bare = bare_steps(args, vocab_size, args.bare_steps, "bare step (before)")
    with tempfile.TemporaryDirectory(prefix="train_speed-") as tmp:
        records = train_py(args, data_dir, Path(tmp))
    bare += bare_steps(args, vocab_size, args.bare_steps, "bare step (after)")

    timed = [r for r in records if r["step"] > args.warmup]
    tokens_per_step = args.batch_size * args.block_size
    bare_ms = statistics.median(bare) * 1e3
    loop_ms = statistics.median(r["step_time"] for r in timed) * 1e3
    # Means include the stalls a shared machine inflicts; medians are the like-for-like comparison.
    bare_mean_tps = tokens_per_step * len(bare) / sum(bare)
    wall_tps = tokens_per_step * len(timed) / sum(r["step_time"] for r in timed)
    rss_start = next(r["mem_gb"] for r in records if r["step"] >= args.rss_from)
    rss_end = records[-1]["mem_gb"]
    result = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {"vocab_size": vocab_size},
        "bare_step_ms": bare_ms,
        "train_py_step_ms": loop_ms,
        "loop_overhead": loop_ms / bare_ms - 1,
        "bare_tokens_per_sec_median": tokens_per_step / (bare_ms / 1e3),
        "train_py_tokens_per_sec_median": tokens_per_step / (loop_ms / 1e3),
        "bare_tokens_per_sec_mean": bare_mean_tps,
        "train_py_tokens_per_sec_mean": wall_tps,
        "peak_rss_gb": {"at_step": args.rss_from, "start": rss_start, "end": rss_end, "steps": records[-1]["step"]},
        "rss_growth": rss_end / rss_start - 1,
        "final_train_loss": records[-1]["loss"],
    }
    rows = [
        ("bare step: fwd+bwd+AdamW, median", f"{bare_ms:.1f} ms ({result['bare_tokens_per_sec_median']:,.0f} tok/s)"),
        ("train.py step, median", f"{loop_ms:.1f} ms ({result['train_py_tokens_per_sec_median']:,.0f} tok/s)"),
        ("tokens/s over all timed steps: bare, train.py", f"{bare_mean_tps:,.0f}, {wall_tps:,.0f}"),
        ("loop overhead (goal <= 5%)", f"{result['loop_overhead']:+.1%}"),
        (f"peak RSS, step {args.rss_from} -> {records[-1]['step']}",
         f"{rss_start * 1024:.0f} -> {rss_end * 1024:.0f} MiB"),
        ("peak RSS growth (goal <= 5%)", f"{result['rss_growth']:+.1%}"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\ntrain.py vs bare step: d_model {args.d_model}, {args.n_layer} layers, vocab {vocab_size}, "
          f"{args.batch_size} x {args.block_size} tokens, {torch.get_num_threads()} threads")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
