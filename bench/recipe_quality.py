"""Training recipes compared by the held-out bits per byte they reach: at equal tokens, and at equal
wall-clock time.

    python bench/recipe_quality.py                        # every recipe below, seeds 1337 and 1338
    python bench/recipe_quality.py --recipes adamw-cosine,muon --seeds 1337
    python bench/recipe_quality.py --define "muon-lr03=--optimizer=muon --muon_lr=0.03" --recipes adamw-cosine,muon-lr03
    python bench/recipe_quality.py --baseline muon --define "qk=muon --qk_norm=true" --recipes qk --tokens 1e6 \
        --seeds 1337 --no-equal-time                      # one change against the defaults, in a sweep

Every run is `python train.py` itself, on the shared Korean corpus prepared once with an 8,192-piece BPE
and an explicit held-out file (`prepare.py --val-files`, so no recipe ever trains on it). The model is
the same for all recipes: 6 layers, d_model 256, 4 heads, d_ff 688 (SwiGLU at the non-embedding size of
a GPT-2 block), 256-token sequences, batch 16, fp32 on CPU. Runs go two at a time, each pinned to its
own core with one thread, the baseline beside a candidate, so machine noise hits both alike; after
training, each run is scored once on the whole held-out split.

Equal tokens: every recipe trains for --tokens. Equal wall-clock: a recipe whose step is slower or
faster than the baseline's (--baseline, nanoGPT's recipe unless named) by more than 1% is trained again
for the number of steps that costs the baseline's training time; its schedule is laid out over those
steps, as a user with that budget would do. The step-time ratio comes from short runs (--timing-steps) of
the recipe beside the baseline, once on each core (recipes with the same work differ by up to 5% between
the rounds of the equal-token runs). Evaluation time is not training time.

Runs are kept in --work (one directory each, with the flags it ran with); a run whose result is already
there is not repeated, so an interrupted benchmark continues, and --define'd sweeps reuse the baseline.
Prints a table and writes bench/results/recipe_quality.json.
"""

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nanokor.atomic import atomic_write
from nanokor.logger import read_metrics
from pinned import cached, run_all, run_pinned, save

REPO = Path(__file__).resolve().parents[1]
SHAPE = ["--n_layer=6", "--d_model=256", "--n_head=4", "--d_ff=688", "--block_size=256", "--batch_size=16",
         "--grad_accum=1", "--device=cpu", "--dtype=fp32", "--compile=false", "--tie_embeddings=false",
         "--dropout=0", "--label_smoothing=0", "--sample_tokens=0", "--keep_best=0", "--eval_tokens=1073741824",
         "--wandb_mode=disabled"]
BASELINE = "adamw-cosine"
# Every recipe spells out the keys that recipe v2 changed, so its definition does not move with the defaults
# (and a cached run, whose flags are its cache key, stays what it says).
V1 = "--qk_norm=false --beta1=0.9 --eps=1e-8"
RECIPES = {
    # nanoGPT's recipe on nanokor's model: AdamW, linear warmup, cosine from 1e-3 to 1e-4.
    "adamw-cosine": "--optimizer=adamw --schedule=cosine --lr=1e-3 --min_lr=1e-4 --warmup_steps=50 "
                    f"--embed_lr=0 --weight_decay=0.1 --beta2=0.95 {V1}",
    # nanokor 0.1's config/tiny.py: Noam (never anneals), AdamW.
    "noam-0.1": "--optimizer=adamw --schedule=noam --warmup_steps=50 --lr_factor=0.5 --cooldown_frac=0 --embed_lr=0 "
                f"--weight_decay=0.1 {V1}",
    # The original guide's recipe (config/guide.py): Noam, label smoothing 0.1, dropout 0.1.
    "guide": "--optimizer=adamw --schedule=noam --warmup_steps=50 --lr_factor=0.5 --cooldown_frac=0 --embed_lr=0 "
             f"--weight_decay=0.1 --label_smoothing=0.1 --dropout=0.1 {V1}",
    # nanokor's recipe before v2 (at this shape's width and length): Muon for the block matrices at 0.02, AdamW
    # for the head at Noam's peak of 0.679 / sqrt(256 * 50) = 6e-3 and the embedding at 0.2, a linear cooldown
    # over the last 40% of the steps, weight decay 0.1. The screening of recipe v2 calls it "muon".
    "muon": "--optimizer=muon --schedule=noam --warmup_steps=50 --lr_factor=0.679 --cooldown_frac=0.4 "
            f"--muon_lr=0.02 --embed_lr=0.2 --weight_decay=0.1 --beta2=0.95 {V1}",
}
# Recipe v2, nanokor's defaults: v1 with QK-norm, AdamW betas (0.8, 0.95) and eps 1e-10, and Muon at 0.03.
RECIPES["v2"] = RECIPES["muon"].replace(V1, "--qk_norm=true --beta1=0.8 --eps=1e-10").replace(
    "--muon_lr=0.02", "--muon_lr=0.03")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="../shared/data/korean_corpus",
                   help="train-*.parquet and validation-*.parquet, relative to the repository root unless absolute")
    p.add_argument("--data-dir", default="data/bench-recipe", help="prepared data (made if missing)")
    p.add_argument("--tokens", type=float, default=2e6, help="training tokens per run at equal tokens")
    p.add_argument("--shape", default="", metavar="KEY=VALUE,...",
                   help="the model and batch for every recipe, changed from the default above: "
                        "'n_layer=4,d_model=128,d_ff=344,block_size=128' (a quicker screening shape; give it "
                        "its own --work and --out)")
    p.add_argument("--seeds", default="1337,1338")
    p.add_argument("--one-seed", default="noam-0.1,guide",
                   help="recipes run with the first seed only (comma-separated; '' for none)")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated; the baseline is always run")
    p.add_argument("--baseline", default=BASELINE, help=f"the recipe the others are compared with (default {BASELINE})")
    p.add_argument("--define", action="append", default=[], metavar="NAME=FLAGS",
                   help="an extra recipe: train.py flags on top of the shape, optionally after a recipe's name, "
                        "whose flags they then follow (and override): 'muon-qk=muon --qk_norm=true' (repeatable)")
    p.add_argument("--no-equal-time", action="store_true", help="skip the equal wall-clock runs")
    p.add_argument("--timing-steps", type=int, default=40,
                   help="equal wall-clock: each recipe's step time against the baseline's, from short runs side by "
                        "side on the two cores, then with the cores swapped (0: the medians of the equal-token runs, "
                        "which ran beside whichever recipe shared their round)")
    p.add_argument("--cores", default="0,1", help="one run per core, at the same time")
    p.add_argument("--work", default="bench/results/recipe_runs")
    p.add_argument("--out", default="bench/results/recipe_quality.json")
    return p.parse_args()


def shape_flags(changes: str) -> list[str]:
    """SHAPE with `changes` ("key=value,...") applied in place."""
    flags = dict(f[2:].split("=", 1) for f in SHAPE)
    for change in filter(None, changes.split(",")):
        key, _, value = change.partition("=")
        if key not in flags:
            sys.exit(f"--shape changes {', '.join(f[2:].split('=')[0] for f in SHAPE)}; got {key!r}")
        flags[key] = value
    return [f"--{k}={v}" for k, v in flags.items()]


def prepare(corpus: Path, data_dir: Path) -> None:
    if (data_dir / "meta.json").is_file():
        return
    subprocess.run([sys.executable, "prepare.py", "--data-files", str(corpus / "train-*.parquet"),
                    "--val-files", str(corpus / "validation-*.parquet"), "--vocab-size", "8192",
                    "--out", str(data_dir)], cwd=REPO, check=True)


def run_dir(work: Path, recipe: str, seed: int, steps: int) -> Path:
    return work / f"{recipe}-s{seed}-{steps}"


def train(job: dict, core: str) -> dict:
    """One train.py run pinned to `core`; its result is cached in the run directory."""
    out = job["dir"]
    if (result := cached(out, job["flags"])) is not None:
        return result
    t0 = time.time()
    run_pinned([sys.executable, "train.py", *job["flags"], f"--out_dir={out}"], core)
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "step_time" in r]
    val = [r for r in records if "val_bpb" in r][-1]
    result = {"recipe": job["recipe"], "seed": job["seed"], "steps": len(steps), "flags": job["flags"],
              "tokens": steps[-1]["tokens_seen"], "val_bpb": val["val_bpb"], "val_loss": val["val_loss"],
              "final_train_loss": steps[-1]["loss"], "train_seconds": sum(r["step_time"] for r in steps),
              "median_step_s": statistics.median(r["step_time"] for r in steps[5:]),
              "wall_seconds": time.time() - t0, "core": core}
    save(out, result)
    print(f"  {job['recipe']:<16} seed {job['seed']} {len(steps)} steps: val bpb {result['val_bpb']:.4f}, "
          f"{result['median_step_s'] * 1e3:.0f} ms/step", flush=True)
    return result


def paired_step_times(args, recipes, names, cores, base_step_s: float) -> dict[str, float]:
    """Each recipe's step time as its ratio to the baseline's times the baseline's: the ratio is the mean of
    two short runs beside the baseline, one on each core, so a slower core or a busy moment hits both."""
    base, ratios = names[0], {names[0]: 1.0}
    for r in names[1:]:
        rounds = []
        for swap in (False, True):
            pair = [make_job(args, recipes, name, args.seeds_list[0], args.timing_steps,
                             work=Path(args.work) / "timing" / ("swapped" if swap else "first")) for name in (r, base)]
            for job in pair:  # a short run: the held-out score is not what it is for
                job["flags"] = [*job["flags"], "--eval_tokens=4096"]
            with ThreadPoolExecutor(2) as pool:
                mine, theirs = pool.map(train, pair, cores[::-1] if swap else cores)
            rounds.append(mine["median_step_s"] / theirs["median_step_s"])
        ratios[r] = statistics.mean(rounds)
        print(f"  step time {r} / {base}: {' and '.join(f'{x:.3f}' for x in rounds)} (cores swapped)", flush=True)
    return {r: ratios[r] * base_step_s for r in names}


def make_job(args, recipes, recipe: str, seed: int, steps: int, work: Path | None = None) -> dict:
    flags = [*args.shape_flags, f"--data_dir={args.data_dir}", f"--seed={seed}", f"--max_steps={steps}",
             f"--eval_interval={steps}", *shlex.split(recipes[recipe])]
    return {"recipe": recipe, "seed": seed, "steps": steps, "flags": flags,
            "dir": run_dir(work or Path(args.work), recipe, seed, steps)}


def main():
    args = parse_args()
    recipes = dict(RECIPES)
    for d in args.define:
        name, _, flags = d.partition("=")
        first, _, rest = flags.strip().partition(" ")
        recipes[name.strip()] = f"{recipes[first]} {rest}".strip() if first in recipes else flags
    base = args.baseline
    names = [base] + [r for r in args.recipes.split(",") if r and r != base]
    unknown = [r for r in names if r not in recipes]
    if unknown:
        sys.exit(f"unknown recipe(s) {unknown}; known: {', '.join(recipes)} (add one with --define NAME=FLAGS)")
    seeds = args.seeds_list = [int(s) for s in args.seeds.split(",")]
    cores = args.cores.split(",")
    corpus = Path(args.corpus) if Path(args.corpus).is_absolute() else REPO / args.corpus
    prepare(corpus, REPO / args.data_dir)
    args.shape_flags = shape_flags(args.shape)
    shape = dict(f[2:].split("=", 1) for f in args.shape_flags)
    step_tokens = int(shape["batch_size"]) * int(shape["block_size"]) * int(shape["grad_accum"])
    steps = round(args.tokens / step_tokens)

    print(f"equal tokens: {steps} steps x {step_tokens:,} tokens, recipes {', '.join(names)}, seeds {seeds}", flush=True)
    one_seed = set(args.one_seed.split(",")) - {base}
    seeds_of = {r: seeds[:1] if r in one_seed else seeds for r in names}
    jobs = [make_job(args, recipes, r, s, steps) for s in seeds for r in names if s in seeds_of[r]]
    equal_tokens = run_all(jobs, cores, train)
    step_s = {r: statistics.median(x["median_step_s"] for x in equal_tokens if x["recipe"] == r) for r in names}
    if args.timing_steps and len(cores) == 2 and not args.no_equal_time:
        step_s = paired_step_times(args, recipes, names, cores, step_s[base])

    equal_time = []
    if not args.no_equal_time:
        budget_steps = {r: round(steps * step_s[base] / step_s[r]) for r in names}
        timed = [r for r in names if abs(budget_steps[r] - steps) > 0.01 * steps]
        print(f"equal wall-clock: {', '.join(f'{r} {budget_steps[r]} steps' for r in timed) or 'no recipe differs by >1%'}",
              flush=True)
        equal_time = run_all([make_job(args, recipes, r, s, budget_steps[r]) for s in seeds for r in timed
                              if s in seeds_of[r]], cores, train)
        equal_time += [x for x in equal_tokens if x["recipe"] not in timed]

    rows = summarize(names, seeds_of, equal_tokens, equal_time, step_s, base)
    print_table(rows, steps, step_tokens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"shape": args.shape_flags, "tokens": steps * step_tokens, "seeds": seeds, "baseline": base,
              "recipes": {r: recipes[r] for r in names}, "rows": rows, "runs": equal_tokens + equal_time}
    atomic_write(out, (json.dumps(report, indent=2) + "\n").encode())
    print(f"wrote {out}")


def summarize(names, seeds_of, equal_tokens, equal_time, step_s, base) -> list[dict]:
    def by(results, recipe):
        return {x["seed"]: x for x in results if x["recipe"] == recipe}

    base_tok, base_time = by(equal_tokens, base), by(equal_time, base) or by(equal_tokens, base)
    rows = []
    for r in names:
        tok, tim, seeds = by(equal_tokens, r), by(equal_time, r), seeds_of[r]
        row = {"recipe": r, "seeds": seeds, "step_ms": step_s[r] * 1e3, "step_vs_baseline": step_s[r] / step_s[base],
               "bpb": [tok[s]["val_bpb"] for s in seeds],
               "bpb_vs_baseline": [tok[s]["val_bpb"] / base_tok[s]["val_bpb"] for s in seeds]}
        if tim:
            row.update(time_steps=tim[seeds[0]]["steps"], time_bpb=[tim[s]["val_bpb"] for s in seeds],
                       time_bpb_vs_baseline=[tim[s]["val_bpb"] / base_time[s]["val_bpb"] for s in seeds],
                       time_train_s=[tim[s]["train_seconds"] for s in seeds])
        rows.append(row)
    return rows


def print_table(rows, steps, step_tokens):
    def seeds(values, fmt):
        return " / ".join(format(v, fmt) for v in values)

    header = (f"{'recipe':<16} {'ms/step':>8} {'vs base':>7} | {'bpb (equal tokens)':>20} {'vs base':>15} | "
              f"{'steps':>5} {'bpb (equal time)':>18} {'vs base':>15}")
    print(header)
    print("-" * len(header))
    for r in rows:
        line = (f"{r['recipe']:<16} {r['step_ms']:>8.0f} {r['step_vs_baseline']:>6.3f}x | {seeds(r['bpb'], '.4f'):>20} "
                f"{seeds(r['bpb_vs_baseline'], '.3f'):>15} |")
        if "time_bpb" in r:
            line += (f" {r['time_steps']:>5} {seeds(r['time_bpb'], '.4f'):>18} "
                     f"{seeds(r['time_bpb_vs_baseline'], '.3f'):>15}")
        print(line)
    print(f"(equal tokens: {steps} steps of {step_tokens:,} tokens; bits per byte on the whole held-out file; "
          "values are per seed)")


if __name__ == "__main__":
    main()
