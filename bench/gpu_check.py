"""bench/gpu_check.sh's Python half: the machine report, the data, and the results.

    python bench/gpu_check.py machine --json LOGS/machine.json   # the GPU, torch, packages, two ceilings
    python bench/gpu_check.py data DIR --train-tokens N --val-tokens M
    python bench/gpu_check.py plan RESULTS WORK --mode gpu --deadline-s 420 NAME:KIND:BUDGET ...
    python bench/gpu_check.py record RESULTS WORK NAME --rc RC --started EPOCH --budget S | --skipped WHY
    python bench/gpu_check.py finish RESULTS                      # the overview; exit 1 if a stage failed

`plan` lists every stage as pending; `record` reads what a stage left in WORK (its log, its JSON, train.py's
metrics.jsonl), turns it into figures and a status, and rewrites RESULTS/summary.md, results.json and
gpu_check.tar.gz (WORK/logs packed), each through a temporary file, so a run killed at any moment returns
complete files holding every stage recorded so far. Recording imports no torch: it costs ~0.1 s.
"""

import argparse
import io
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

from nanokor.atomic import atomic_write
from nanokor.logger import read_metrics

LOSS_DROP = 0.5  # nats the training loss must fall by (last 5 steps' mean against the first step's)
TAIL_LINES = 15  # log lines shown in summary.md for a stage that did not succeed
ABSENT_ON_IMAGE = ("datasets", "wandb", "deepspeed", "flash_attn")  # the lent image has none of these
NEEDED = ("numpy", "sentencepiece", "safetensors", "tqdm", "transformers")
TIMED_OUT = (124, 137)  # timeout's exit status: SIGTERM sent at the budget, or SIGKILL after it
TORCHRUN_FAILED = re.compile(r"failed \(exitcode: -?\d+\) local_rank: \d+")  # torchrun's line for a failed worker


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("machine", help="print and save what this machine is")
    m.add_argument("--json", required=True)
    d = sub.add_parser("data", help="the embedded sample, prepared, its tokens tiled to the sizes given")
    d.add_argument("dir")
    d.add_argument("--train-tokens", type=int, required=True)
    d.add_argument("--val-tokens", type=int, required=True)
    pl = sub.add_parser("plan", help="start RESULTS with every stage pending")
    pl.add_argument("results")
    pl.add_argument("work")
    pl.add_argument("--mode", required=True, choices=["gpu", "dry-run"])
    pl.add_argument("--deadline-s", type=int, required=True)
    pl.add_argument("stages", nargs="+", help="NAME:KIND:BUDGET")
    f = sub.add_parser("finish", help="print the overview; exit 1 if a stage failed")
    f.add_argument("results")
    r = sub.add_parser("record", help="record one stage's result and rewrite RESULTS")
    r.add_argument("results")
    r.add_argument("work")
    r.add_argument("name")
    r.add_argument("--rc", type=int)
    r.add_argument("--started", type=float, help="the stage's start, seconds since the epoch")
    r.add_argument("--budget", type=int)
    r.add_argument("--skipped", help="the stage did not run, for this reason")
    return p.parse_args(argv)


# ---- machine ------------------------------------------------------------------------------------------

def machine(json_path: str) -> None:
    import importlib
    import importlib.metadata

    import torch

    from nanokor.device import peak_flops

    cuda = torch.cuda.is_available()
    info = {"python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if cuda else "cpu"}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info |= {"capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
                 "memory_gb": round(props.total_memory / 2**30, 1), "cudnn": torch.backends.cudnn.version()}
    smi = shutil.which("nvidia-smi")
    if smi:  # the full table for the log; driver and clocks for the figures
        print(subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout)
        query = "driver_version,clocks.sm,clocks.max.sm,power.limit"
        out = subprocess.run([smi, f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
        info["nvidia_smi"] = dict(zip(query.split(","), (v.strip() for v in out[0].split(",")))) if out else None
    info["packages"] = {}
    for name in NEEDED:
        try:
            info["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info["packages"][name] = "MISSING"
    for name in ABSENT_ON_IMAGE:  # imported for real: the dry run shadows them as the image lacks them
        try:
            module = importlib.import_module(name)
            info["packages"][name] = getattr(module, "__version__", "importable")
        except ImportError:
            info["packages"][name] = "absent"
    info |= ceilings(torch, cuda)
    info["peak_tflops_datasheet"] = (peak_flops(info["device"], torch.bfloat16) or 0) / 1e12 or None
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    info["problem"] = None if version >= (2, 9) else f"torch {torch.__version__} is older than nanokor's floor, 2.9"
    if "MISSING" in info["packages"].values():
        info["problem"] = f"missing packages: {[k for k, v in info['packages'].items() if v == 'MISSING']}"
    print(json.dumps(info, indent=2))
    atomic_write(json_path, (json.dumps(info, indent=2) + "\n").encode())


def ceilings(torch, cuda: bool) -> dict:
    """The matmul rate (bf16 8192^3 on a GPU, fp32 512^3 on a CPU) and the copy bandwidth, measured."""
    n, dtype, reps = (8192, torch.bfloat16, 10) if cuda else (512, torch.float32, 5)
    device = "cuda" if cuda else "cpu"
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    src = torch.randn((1 << 28) if cuda else (1 << 22), device=device)  # 1 GiB on a GPU

    def seconds(fn) -> float:
        for _ in range(3):
            fn()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    matmul = 2 * n**3 / seconds(lambda: a @ b) / 1e12
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * src.element_size() / seconds(lambda: dst.copy_(src)) / 1e9
    return {"matmul_tflops": matmul, "matmul_shape": f"{n}^3 {str(dtype).removeprefix('torch.')}",
            "copy_gb_s": copy}


# ---- data ---------------------------------------------------------------------------------------------

def data(out: str, train_tokens: int, val_tokens: int) -> None:
    """prepare.py --dataset sample, its tokens tiled to the sizes given: throughput does not depend on the
    text, and the base batch and the validation pass need more windows than the sample has."""
    import numpy as np

    from nanokor.shards import DataDir, ShardWriter, read_shard

    sample = Path(out).with_name("sample")
    subprocess.run([sys.executable, "-u", "prepare.py", "--dataset", "sample", "--out", str(sample)], check=True)
    src, dst = DataDir(sample), DataDir(out)
    dst.path.mkdir(parents=True)
    dst.write_tokenizer(src.tokenizer)
    meta = dict(src.meta)
    sha, vocab = meta["tokenizer"]["sha256"], meta["tokenizer"]["vocab_size"]
    meta["shards"] = {}
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        tokens = np.concatenate([np.asarray(read_shard(p)) for p in src.shard_paths(split)])
        writer = ShardWriter(dst.path, split, shard_tokens=n, vocab_size=vocab, tokenizer_sha=sha)
        writer.write(np.resize(tokens, n))
        meta["shards"][split] = writer.close()
    meta["note"] = "gpu_check: the embedded sample's tokens, tiled"
    dst.write_meta(meta)
    print(f"{out}: {train_tokens:,} train and {val_tokens:,} val tokens, vocab {vocab:,}")


# ---- figures: what each kind of stage left behind --------------------------------------------------------

def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def machine_figures(work: Path, name: str) -> tuple[dict, str | None, str]:
    info = read_json(work / "logs" / f"{name}.json")
    if info is None:
        return {}, "no machine report", ""
    figures = {k: info.get(k) for k in ("device", "torch", "cuda", "python", "capability", "memory_gb", "sms")}
    figures |= {"driver": (info.get("nvidia_smi") or {}).get("driver_version"),
                f"matmul TFLOP/s ({info['matmul_shape']})": round(info["matmul_tflops"], 3),
                "datasheet bf16 peak TFLOP/s": info["peak_tflops_datasheet"],
                "copy GB/s (read + write)": round(info["copy_gb_s"]),
                "packages": ", ".join(f"{k} {v}" for k, v in info["packages"].items())}
    headline = (f"{info['device']}, torch {info['torch']}, matmul {info['matmul_tflops']:.3g} TFLOP/s, "
                f"copy {info['copy_gb_s']:,.0f} GB/s")
    return {k: v for k, v in figures.items() if v is not None}, info.get("problem"), headline


def data_figures(work: Path, name: str) -> tuple[dict, str | None, str]:
    meta = read_json(work / "data" / "meta.json")
    if meta is None:
        return {}, "no meta.json written", ""
    count = {split: sum(shard["tokens"] for shard in meta["shards"][split]) for split in ("train", "val")}
    vocab = meta["tokenizer"]["vocab_size"]
    return ({"train tokens": count["train"], "val tokens": count["val"], "vocab": vocab}, None,
            f"{count['train']:,} train / {count['val']:,} val tokens, vocab {vocab:,}")


def train_figures(work: Path, name: str) -> tuple[dict, str | None, str]:
    run = work / "runs" / name
    for file in ("metrics.jsonl", "config.json"):  # into the logs, so the tarball carries them
        if (run / file).is_file():
            shutil.copy(run / file, work / "logs" / f"{name}.{file}")
    records = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    steps = [r for r in records if "loss" in r]
    if not steps:
        return {}, "no training step was logged", ""
    timed = steps[max(1, len(steps) // 5):] or steps  # the first steps hold compilation and warm-up
    losses = [r["loss"] for r in steps]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    last = statistics.fmean(losses[-5:]) if None not in losses[-5:] else math.nan
    mfu = [r["mfu"] for r in timed if "mfu" in r]
    config = read_json(run / "config.json") or {}
    figures = {"steps": len(steps), "tokens/step": config.get("batch_size", 0) * config.get("block_size", 0)
               * config.get("grad_accum", 0) or None,
               "first step s (compile + warm-up)": round(steps[0]["step_time"], 2),
               "step ms (median)": round(1e3 * statistics.median(r["step_time"] for r in timed), 1),
               "tokens/s (median)": round(statistics.median(r["tokens_per_sec"] for r in timed)),
               "MFU (median)": f"{statistics.median(mfu):.1%}" if mfu else "n/a (peak unknown)",
               "peak memory GB": round(max(r["mem_gb"] for r in steps), 2),
               "loss at step 1": round(losses[0], 3) if losses[0] is not None else None,
               "loss, mean of the last 5": round(last, 3), "val loss": round(val[-1], 3) if val else None,
               "non-finite steps": steps[-1].get("nonfinite_total")}
    problem = None
    if losses[0] is None or not math.isfinite(last):
        problem = "a non-finite loss"
    elif last > losses[0] - LOSS_DROP:
        problem = f"the loss did not fall by {LOSS_DROP}: {losses[0]:.3f} at step 1, {last:.3f} at the end"
    headline = (f"MFU {figures['MFU (median)']}, {figures['step ms (median)']} ms/step, "
                f"{figures['tokens/s (median)']:,} tok/s, loss {figures['loss at step 1']} -> {round(last, 2)}")
    return figures, problem, headline


def check_figures(work: Path, name: str) -> tuple[dict, str | None, str]:
    result = read_json(work / "logs" / f"{name}.json")
    if result is None or "paths" not in result:
        return {}, "no result written", ""
    figures = {"dtype": result["dtype"].removeprefix("torch."), "params": result["params"]}
    for path, r in result["paths"].items():
        figures[path] = f"{r['agree']}/{r['of']} tokens, {r['status']}" if "agree" in r else r["status"]
        if "seconds" in r:
            figures[f"{path} s"] = round(r["seconds"], 1)
    differ = [p for p, r in result["paths"].items() if not (r["status"] == "ok" or r["status"].startswith("skip"))]
    headline = "; ".join(f"{p.removeprefix('nanokor+')} {r['agree']}/{r['of']}" if "agree" in r else
                         f"{p.removeprefix('nanokor+')} {r['status']}" for p, r in result["paths"].items())
    return figures, f"differs from eager: {', '.join(differ)}" if differ else None, headline


def speed_figures(work: Path, name: str) -> tuple[dict, str | None, str]:
    result = read_json(work / "logs" / f"{name}.json")
    if result is None:
        return {}, "no result written", ""
    figures = {"dtype": result["dtype"].removeprefix("torch."), "rounds": result.get("rounds", 0)}
    figures |= {f"warm-up s, {k}": round(v, 1) for k, v in result.get("warmup_s", {}).items()}
    if "decode" not in result:  # cut during the warm-up: its times say which path took long
        return figures, "no round was timed", ""
    headline = []
    for row in result["decode"]:
        key = f"batch {row['batch']}, {row['impl']}"
        figures[key] = f"{row['tokens_per_s']:,.0f} tok/s, {row['speedup_vs_transformers']:.2f}x transformers"
        if row["impl"] != "transformers":
            headline.append(f"b{row['batch']} {row['impl'].replace('nanokor+', '')} "
                            f"{row['speedup_vs_transformers']:.2f}x")
    figures |= result.get("skipped", {})
    figures |= {f"time to first token, {k}": f"{v:.1f} ms" for k, v in result.get("ttft_ms", {}).items()}
    figures |= {f"tokens shared with eager (same seed), {k}": f"{v}/64"
                for k, v in result.get("seeded_agreement", {}).items()}
    return figures, None, "vs transformers: " + ", ".join(headline)


def muon_figures(work: Path, name: str) -> tuple[dict, str | None, str]:
    """bench/muon_scaling.py's parts and shares on this device, and its one-process check of nanokor's Muon
    (the partitioned optimizer, with one rank) against torch.optim.Muon."""
    result = read_json(work / "logs" / f"{name}.json")
    if result is None:
        return {}, "no result written", ""
    dtype = result["main_dtype"]
    figures = {"device": result["device"], "tokens/step modelled": result["tokens_per_step"]}
    figures |= {f"Newton-Schulz {shape} ({dtype}) ms": round(1e3 * t[dtype], 2)
                for shape, t in result["parts"]["newton_schulz"].items()}
    figures["forward + backward µs/token"] = round(1e6 * result["parts"]["fwd_bwd_per_token"], 3)
    rows = {row["ranks"]: row[dtype] for row in result["computed"]}
    for ranks in (1, 8, 64):
        if ranks in rows:
            figures[f"Muon's share at {ranks} rank{'s' * (ranks > 1)}, replicated / partitioned"] = \
                f"{rows[ranks]['replicated_share']:.1%} / {rows[ranks]['partitioned_share']:.2%}"
    widest = max(rows)
    headline = (f"Muon's share at {widest} ranks: replicated {rows[widest]['replicated_share']:.1%}, "
                f"partitioned {rows[widest]['partitioned_share']:.2%}")
    problem, check = None, result.get("against_torch")
    if check:
        step = check["step_s"]
        figures |= {"one-process step ms, nanokor's Muon": round(1e3 * step["nanokor"], 2),
                    "one-process step ms, torch.optim.Muon": round(1e3 * step["torch"], 2),
                    f"weights after {check['steps']} steps differ by (max)": check["max_weight_difference"],
                    "weights moved by (max)": float(f"{check['max_weight_change']:.3g}")}
        figures |= {f"one-process step, {name.split('+')[1]} / plain": round(step[name] / step["nanokor"], 3)
                    for name in step if name.startswith("nanokor+")}  # the optional variants' cost
        # Within bf16 rounding of the updates: a half-ulp of bf16 (2^-9) on each update, twice over.
        if not check["max_weight_difference"] <= 2 ** -8 * check["max_weight_change"]:
            problem = (f"nanokor's Muon differs from torch.optim.Muon by {check['max_weight_difference']:.3g} "
                       f"(the weights moved by {check['max_weight_change']:.3g})")
        same = "same weights" if check["max_weight_difference"] == 0 else \
            f"weights within {check['max_weight_difference']:.2g}"
        headline += (f"; one process {1e3 * step['nanokor']:.1f} ms/step vs torch.optim.Muon "
                     f"{1e3 * step['torch']:.1f} ms, {same}")
    return figures, problem, headline


def profile_figures(work: Path, name: str) -> tuple[dict, str | None, str]:
    result = read_json(work / "logs" / f"{name}.json")
    if result is None:
        return {}, "no result written", ""
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a"
    figures = {"step ms": round(result["step_ms"], 2), "tokens/s": round(result["tokens_per_s"]), "MFU": mfu,
               "warm-up s": round(result["warmup_s"], 1),
               "matmul kernels TFLOP/s": float(f"{result['matmul_tflops']:.3g}") if result["matmul_tflops"] else None}
    kernel_ms = result["profiled_ms_per_step"]
    figures |= {f"{cat} ms": f"{ms:.2f} ({ms / kernel_ms:.0%})" for cat, ms in result["categories_ms"].items()}
    headline = f"{figures['step ms']} ms/step, MFU {mfu}, " + ", ".join(
        f"{cat} {ms / kernel_ms:.0%}" for cat, ms in result["categories_ms"].items())
    return figures, None, headline


FIGURES = {"machine": machine_figures, "data": data_figures, "train": train_figures, "check": check_figures,
           "speed": speed_figures, "muon": muon_figures, "profile": profile_figures}


# ---- results ------------------------------------------------------------------------------------------

def plan(results: Path, work: Path, mode: str, deadline_s: int, stages: list[str]) -> None:
    rows = []
    for spec in stages:
        name, kind, budget = spec.split(":")
        if kind not in FIGURES:
            raise SystemExit(f"error: stage {name} has kind {kind!r}; bench/gpu_check.py knows {sorted(FIGURES)}")
        rows.append({"name": name, "kind": kind, "budget": budget, "status": "pending", "seconds": None,
                     "figures": {}, "headline": ""})
    state = {"mode": mode, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "deadline_s": deadline_s, "stages": rows}
    (work / "logs").mkdir(parents=True, exist_ok=True)
    publish(results, work, state)


def record(results: Path, work: Path, name: str, rc: int | None, started: float | None, budget: int | None,
           skipped: str | None) -> None:
    state = json.loads((results / "results.json").read_text())
    stage = next(s for s in state["stages"] if s["name"] == name)
    if skipped:
        stage |= {"status": f"skipped: {skipped}", "seconds": 0}
    else:
        try:
            figures, problem, headline = FIGURES[stage["kind"]](work, name)
        except Exception as e:  # a result in a shape this reader did not expect: say so, keep going
            figures, problem, headline = {}, f"its result could not be read ({type(e).__name__}: {e})", ""
        if rc in TIMED_OUT:
            status = f"TIMEOUT at its {budget} s budget"
        elif rc:
            status = f"FAIL (exit {rc})"
        else:
            status = "ok"
        if problem:
            status = f"{status}: {problem}" if status != "ok" else f"FAIL: {problem}"
        stage |= {"status": status, "seconds": round(time.time() - started, 1), "budget": budget,
                  "figures": figures, "headline": headline}
        if status != "ok":
            stage["log_tail"] = log_tail(work / "logs" / f"{name}.log")
        else:
            (work / "ok").mkdir(exist_ok=True)
            (work / "ok" / name).touch()  # gpu_check.sh: a stage that needs this one may run
    publish(results, work, state)
    print(f"   {name}: {stage['status']}" + (f" ({stage['seconds']} s)" if stage["seconds"] else "")
          + (f"; {stage['headline']}" if stage.get("headline") else ""))


def log_tail(path: Path) -> list[str]:
    """The log's last lines, each as a terminal would show it (tqdm redraws a line with carriage returns).
    torchrun follows a failed worker's output with its own report (a launcher traceback and a box that
    repeat the exit code), which would push the worker's error out of the tail: only its first line stays."""
    if not path.is_file():
        return []
    lines = [line.split("\r")[-1] for line in path.read_text(errors="replace").splitlines()]
    report = next((i for i, line in enumerate(lines) if TORCHRUN_FAILED.search(line)), None)
    if report is not None:
        lines = lines[:report + 1]
    return [line for line in lines if line.strip()][-TAIL_LINES:]


def publish(results: Path, work: Path, state: dict) -> None:
    """results.json, summary.md and gpu_check.tar.gz (the logs), each complete or absent."""
    text = json.dumps(state, indent=2, ensure_ascii=False) + "\n"
    atomic_write(work / "logs" / "results.json", text.encode())
    atomic_write(results / "results.json", text.encode())
    atomic_write(results / "summary.md", summary(state).encode())
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(work / "logs", arcname="gpu_check")
    atomic_write(results / "gpu_check.tar.gz", archive.getvalue())


def summary(state: dict) -> str:
    stages = state["stages"]
    done = [s for s in stages if s["status"] != "pending"]
    ok = sum(s["status"] == "ok" for s in stages)
    spent = sum(s["seconds"] or 0 for s in stages)
    mode = "dry run (CPU, tiny shapes)" if state["mode"] == "dry-run" else "GPU"
    lines = [f"# gpu_check: {mode}, started {state['started']}", "",
             f"{ok} of {len(stages)} stages ok, {len(done)} recorded, {spent:.0f} s of the {state['deadline_s']} s "
             "deadline spent. Stages run in priority order; each has its own timeout.", "",
             "| stage | status | seconds (budget) | headline |", "|---|---|---:|---|"]
    for s in stages:
        seconds = f"{s['seconds']:g} ({s['budget']})" if s["seconds"] else ""
        lines.append(f"| {s['name']} | {s['status']} | {seconds} | {s['headline']} |")
    for s in done:
        lines += ["", f"## {s['name']}: {s['status']}", ""]
        if s["figures"]:
            lines += ["| figure | value |", "|---|---|"]
            lines += [f"| {k} | {v:,} |" if isinstance(v, int) else f"| {k} | {v} |" for k, v in s["figures"].items()]
        if s.get("log_tail"):
            lines += [""] if s["figures"] else []
            lines += [f"Last lines of {s['name']}.log:", "", "```", *s["log_tail"], "```"]
    return "\n".join(lines) + "\n"


def finish(results: Path) -> int:
    """Print summary.md's overview table (the device tool returns the output's end); 1 if a stage failed."""
    text = (results / "summary.md").read_text()
    print("\n" + text[text.index("| stage |"):].split("\n\n")[0])
    print(f"{results}: summary.md, results.json, gpu_check.tar.gz")
    stages = json.loads((results / "results.json").read_text())["stages"]
    return int(any(s["status"] != "ok" and not s["status"].startswith("skipped") for s in stages))


def main(argv=None):
    args = parse_args(argv)
    if args.command == "machine":
        machine(args.json)
    elif args.command == "data":
        data(args.dir, args.train_tokens, args.val_tokens)
    elif args.command == "plan":
        plan(Path(args.results), Path(args.work), args.mode, args.deadline_s, args.stages)
    elif args.command == "finish":
        sys.exit(finish(Path(args.results)))
    else:
        if not args.skipped and None in (args.rc, args.started, args.budget):
            raise SystemExit("error: record needs --rc, --started and --budget, or --skipped")
        record(Path(args.results), Path(args.work), args.name, args.rc, args.started, args.budget, args.skipped)


if __name__ == "__main__":
    main()
