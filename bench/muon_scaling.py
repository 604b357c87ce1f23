"""Muon's share of a rank's step from 1 to 64 ranks, replicated (torch.optim.Muon: every rank
orthogonalizes every matrix) against partitioned (nanokor/muon.py: each rank its own share).

    python bench/muon_scaling.py          # ~15-25 minutes on a shared 2-core CPU (alone: never beside another benchmark)
    python bench/muon_scaling.py --worlds 2 --rounds 3 --layers 2
    python bench/muon_scaling.py --device cuda --worlds ""       # a GPU's parts (~30 s), no multi-process run
    python bench/muon_scaling.py --device cuda --worlds "" --against-torch 4   # bench/gpu_check.sh's stage

At config/base.py's shape (d_model 768, 12 layers of q/k/v/o 768x768, gate/up 3072x768, down 768x3072;
vocabulary 32,000; 1,024-token sequences; 524,288 tokens a step), in this order:

  measured, one process (on a CPU, one thread, in CPU time; on a GPU, in wall-clock time):
    - each matrix shape's Newton-Schulz time (five iterations), in bf16 as the optimizer runs it and in
      fp32, since a CPU without bf16 matmul units runs bf16 many times slower than fp32 while a GPU
      runs it faster: on a CPU the like-for-like ratio is fp32 against the fp32 forward/backward, on a
      GPU bf16 against the bf16 (autocast) forward/backward;
    - each shape's elementwise work (momentum, Nesterov, decay and the update: every rank does it);
    - the forward + backward of one 1,024-token sequence through the whole model, eager, scaled to a
      rank's share of the global batch (its time is linear in the tokens at a fixed sequence length);
  measured, the real optimizer in --worlds processes (gloo): nanokor's Muon on --layers layers'
    matrices, replicated (each process alone, as torch.optim.Muon under DDP) against partitioned
    (one collective), in interleaved rounds; a step's time is its slowest rank's, in wall-clock time
    and in CPU time (which other load on a shared machine does not inflate); medians of the rounds'
    ratios;
  measured with --against-torch N, one process on --device: nanokor's Muon against torch.optim.Muon
    over every matrix of the model, N steps from the same weights and gradients: each one's step time
    (the median after the first step) and how far the weights part (nanokor's partitioned path, with one
    rank, must give torch's weights within bf16 rounding of the updates);
  computed from those parts, for 1-64 ranks: forward + backward of a rank's share of the global batch
    (524,288 / ranks tokens), Muon's step replicated (every matrix) and partitioned (the heaviest
    rank's matrices, under the real owner assignment), and Muon's share of the rank's step. The
    exchange (an all_gather of bf16 updates, --exchange MB per rank) is not in the computed rows: its
    time depends on the network, so the table gives its size.

Prints the tables and writes bench/results/muon_scaling.json.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanokor.atomic import atomic_write
from nanokor.config import load_config
from nanokor.model import ModelConfig, Transformer
from nanokor.muon import EXCHANGE_DTYPE, Muon, newton_schulz, newton_schulz_cost, partition, polar_express

REPO = Path(__file__).resolve().parents[1]
GROUP = {"ns_coefficients": (3.4445, -4.7750, 2.0315), "ns_steps": 5, "eps": 1e-7}  # torch.optim.Muon's
RANKS = (1, 2, 3, 4, 8, 16, 32, 64)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config/base.py", help="the shapes, batch and vocabulary to model")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config key over --config's (repeatable), e.g. --set n_layer=2 for a quick run")
    p.add_argument("--vocab-size", type=int, default=32000, help="prepare.py's default tokenizer size")
    p.add_argument("--global-batch", type=int, default=524288, help="tokens per step (base.py on 8 GPUs)")
    p.add_argument("--repeats", type=int, default=3, help="fp32 Newton-Schulz timings per shape (median)")
    p.add_argument("--worlds", default="2,3", help="process counts for the real optimizer")
    p.add_argument("--layers", type=int, default=2, help="layers of matrices the real optimizer steps")
    p.add_argument("--rounds", type=int, default=2, help="interleaved replicated/partitioned steps per world")
    p.add_argument("--against-torch", type=int, default=0, metavar="STEPS",
                   help="also step nanokor's Muon and torch.optim.Muon side by side over every matrix, in one "
                        "process on --device (0: not; bf16 Newton-Schulz, which a CPU runs slowly)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--ns-dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="Newton-Schulz precision of the table and the real optimizer (auto: fp32 on a CPU, "
                        "bf16, torch's, on a GPU)")
    p.add_argument("--out", default="bench/results/muon_scaling.json")
    return p.parse_args()


def block_shapes(cfg) -> list[tuple[int, int]]:
    """One block's Muon matrices: q, k, v, o, gate, up, down (as nn.Linear weights: out x in)."""
    kv = (cfg.n_kv_head or cfg.n_head) * (cfg.d_model // cfg.n_head)
    d, f = cfg.d_model, cfg.d_ff
    return [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]


def timed(fn, repeats: int = 1, device: str = "cpu") -> float:
    """The median time of fn: on a GPU wall-clock time, synchronized; on a CPU this process's CPU time (one
    thread), which the other jobs of a shared machine do not inflate as they inflate wall-clock time."""
    clock = time.perf_counter if device == "cuda" else time.process_time
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = clock()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - t)
    return statistics.median(times)


def measure_parts(cfg, args) -> dict:
    dev = args.device
    if dev == "cpu":
        torch.set_num_threads(1)
    parts = {"newton_schulz": {}, "elementwise": {}}
    for shape in sorted(set(block_shapes(cfg))):
        g, key = torch.randn(shape, device=dev), f"{shape[0]}x{shape[1]}"
        newton_schulz(g, GROUP)  # warm-up (cuBLAS handles and workspaces)
        fp32 = timed(lambda: newton_schulz(g, GROUP, torch.float32), args.repeats, dev)
        # bf16 takes minutes on a CPU without bf16 units: timed once there
        bf16 = timed(lambda: newton_schulz(g, GROUP), args.repeats if dev == "cuda" else 1, dev)
        parts["newton_schulz"][key] = {"fp32": fp32, "bf16": bf16}
        print(f"  Newton-Schulz {key}: {fp32 * 1e3:.0f} ms fp32, {bf16 * 1e3:.0f} ms bf16")
        p, buf = torch.randn(shape, device=dev), torch.zeros(shape, device=dev)
        update = torch.randn(shape, device=dev).to(EXCHANGE_DTYPE)

        def elementwise():  # what every rank does for every matrix, as Muon.step does it
            buf.lerp_(g, 0.05)
            g.lerp(buf, 0.95)  # the Nesterov update (only the owner's is used; counted for all)
            p.mul_(1 - 1e-4)
            p.add_(update, alpha=-1e-3)
        parts["elementwise"][key] = timed(elementwise, 5, dev)
    model = Transformer(ModelConfig(vocab_size=args.vocab_size, max_seq_len=cfg.block_size, n_layer=cfg.n_layer,
                                    n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, d_model=cfg.d_model, d_ff=cfg.d_ff,
                                    dropout=0.0)).to(dev)
    autocast = torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")  # each device's training dtype
    batch = 1 if dev == "cpu" else cfg.batch_size  # a CPU takes minutes for one sequence; a GPU wants a batch

    def fwd_bwd(tokens: int):
        x = torch.randint(0, args.vocab_size, (batch, tokens + 1), device=dev)
        with autocast:
            loss = model(x[:, :-1], x[:, 1:], loss_only=True)[1]
        loss.backward()
    fwd_bwd(min(128, cfg.block_size))  # warm-up: allocations, kernels
    t = timed(lambda: fwd_bwd(cfg.block_size), 1 if dev == "cpu" else args.repeats, dev)
    parts["fwd_bwd_per_token"] = t / (batch * cfg.block_size)
    print(f"  forward + backward of {batch} x {cfg.block_size} tokens ({model.num_params() / 1e6:.0f}M parameters, "
          f"{'bf16 autocast' if dev == 'cuda' else 'fp32'}): {t:.2f} s")
    return parts


def _s(seconds: float) -> str:
    return f"{seconds:,.0f} s" if seconds >= 100 else f"{seconds:.3g} s"


def computed_rows(cfg, parts: dict, tokens_per_step: int, main: str) -> list[dict]:
    shapes = block_shapes(cfg) * cfg.n_layer
    ns = [parts["newton_schulz"][f"{r}x{c}"] for r, c in shapes]
    ew = sum(parts["elementwise"][f"{r}x{c}"] for r, c in shapes)
    rows = []
    for ranks in RANKS:
        owners = partition([newton_schulz_cost(s) for s in shapes], ranks)
        heaviest = max(range(ranks), key=lambda r: sum(t[main] for t, o in zip(ns, owners) if o == r))
        width = max(sum(r * c for (r, c), o in zip(shapes, owners) if o == k) for k in range(ranks))
        fwd_bwd = parts["fwd_bwd_per_token"] * tokens_per_step / ranks
        row = {"ranks": ranks, "fwd_bwd_s": fwd_bwd, "elementwise_s": ew,
               "exchange_mb": 0.0 if ranks == 1 else width * 2 * (ranks - 1) / 1e6}
        for dtype in ("fp32", "bf16"):
            replicated = sum(t[dtype] for t in ns) + ew
            partitioned = sum(t[dtype] for t, o in zip(ns, owners) if o == heaviest) + ew
            row[dtype] = {"replicated_s": replicated, "partitioned_s": partitioned,
                          "replicated_share": replicated / (fwd_bwd + replicated),
                          "partitioned_share": partitioned / (fwd_bwd + partitioned)}
        rows.append(row)
    return rows


def _real_worker(rank: int, world: int, store: str, shapes, rounds: int, ns_dtype: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    alone = dist.new_subgroups(group_size=1)[0]  # this rank by itself: replicated, as torch.optim.Muon
    dtype = torch.float32 if ns_dtype == "fp32" else torch.bfloat16
    g = torch.Generator().manual_seed(0)  # the same matrices and gradients on every rank (after DDP's all-reduce)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    optimizers = {"replicated": Muon(params, lr=0.02, process_group=alone, ns_dtype=dtype),
                  "partitioned": Muon(params, lr=0.02, ns_dtype=dtype)}
    times = {f"{name}{kind}": [] for name in optimizers for kind in ("", "_cpu")}
    for _ in range(rounds):
        for name, opt in optimizers.items():
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
            dist.barrier()
            wall, cpu = time.perf_counter(), time.process_time()
            opt.step()
            slowest = torch.tensor([time.perf_counter() - wall, time.process_time() - cpu])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            times[name].append(slowest[0].item())
            times[f"{name}_cpu"].append(slowest[1].item())  # the CPU time: what a loaded machine cannot inflate
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def against_torch(shapes, steps: int, device: str) -> dict:
    """nanokor's Muon (one rank: its owner assignment and exchange buffer, no collective) and
    torch.optim.Muon from the same weights over the same gradients, steps interleaved; and the cost of
    nanokor's optional variants (config keys muon_ns, normuon_beta2, muon_cautious_wd) on the same steps."""
    g = torch.Generator(device).manual_seed(0)
    start = [torch.randn(s, generator=g, device=device) for s in shapes]
    variants = {"nanokor": {}, "nanokor+polar_express": {"orthogonalize": polar_express},
                "nanokor+normuon": {"normuon_beta2": 0.95}, "nanokor+cautious_wd": {"cautious_wd": True}}
    params = {name: [torch.nn.Parameter(t.clone()) for t in start] for name in (*variants, "torch")}
    optimizers = {name: Muon(params[name], lr=0.02, weight_decay=0.1, adjust_lr_fn="original", **kwargs)
                  for name, kwargs in variants.items()}
    optimizers["torch"] = torch.optim.Muon(params["torch"], lr=0.02, weight_decay=0.1, adjust_lr_fn="original")
    times = {name: [] for name in optimizers}
    for _ in range(steps):
        grads = [torch.randn(s, generator=g, device=device) for s in shapes]
        for name, opt in optimizers.items():
            for p, grad in zip(params[name], grads):
                p.grad = grad.clone()
            times[name].append(timed(opt.step, 1, device))
    moved = max((p.detach() - s).abs().max().item() for p, s in zip(params["torch"], start))
    differ = max((p.detach() - q.detach()).abs().max().item() for p, q in zip(params["nanokor"], params["torch"]))
    step_s = {name: statistics.median(t[1:] or t) for name, t in times.items()}  # the first step allocates
    print(f"  one process, {len(shapes)} matrices, {steps} steps: nanokor's Muon {step_s['nanokor'] * 1e3:.1f} ms a "
          f"step, torch.optim.Muon {step_s['torch'] * 1e3:.1f} ms; weights differ by at most {differ:.3g} "
          f"(they moved by up to {moved:.3g}); the variants " +
          ", ".join(f"{n.split('+')[1]} {step_s[n] / step_s['nanokor']:.2f}x" for n in list(variants)[1:]))
    return {"matrices": len(shapes), "steps": steps, "step_s": step_s, "times": times,
            "max_weight_difference": differ, "max_weight_change": moved}


def real_optimizer(shapes, world: int, rounds: int, ns_dtype: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        mp.start_processes(_real_worker, args=(world, os.path.join(tmp, "store"), shapes, rounds, ns_dtype, out),
                           nprocs=world, start_method="spawn")
        times = json.loads(Path(out).read_text())
    ratio = {kind: statistics.median(p / r for p, r in zip(times[f"partitioned{kind}"], times[f"replicated{kind}"]))
             for kind in ("", "_cpu")}
    return {"world": world, "matrices": len(shapes), **times, "ratio_median": ratio[""], "cpu_ratio_median": ratio["_cpu"]}


def main():
    args = parse_args()
    if args.ns_dtype == "auto":
        args.ns_dtype = "bf16" if args.device == "cuda" else "fp32"
    main_dtype, other = args.ns_dtype, {"fp32": "bf16", "bf16": "fp32"}[args.ns_dtype]
    cfg = load_config([str(REPO / args.config), *(f"--{kv}" for kv in args.set)])
    tokens_per_step = args.global_batch
    where = args.config + "".join(f" --set {kv}" for kv in args.set)
    print(f"measuring the parts at {where}'s shapes on {args.device} (one process)")
    parts = measure_parts(cfg, args)
    rows = computed_rows(cfg, parts, tokens_per_step, main_dtype)
    single = against_torch(block_shapes(cfg) * cfg.n_layer, args.against_torch, args.device) \
        if args.against_torch else None
    shapes = block_shapes(cfg) * args.layers
    real = []
    for world in (int(w) for w in args.worlds.split(",") if w):
        print(f"the real optimizer, {len(shapes)} matrices ({args.layers} layers), {world} processes, "
              f"Newton-Schulz in {args.ns_dtype}")
        real.append(real_optimizer(shapes, world, args.rounds, args.ns_dtype))

    bf16_over_fp32 = statistics.median(t["bf16"] / t["fp32"] for t in parts["newton_schulz"].values())
    print(f"\nMuon's share of a rank's step at {where}'s shapes, {tokens_per_step:,} tokens a step, on "
          f"{args.device} (computed from the measured parts; Newton-Schulz in {main_dtype}, where bf16 takes "
          f"{bf16_over_fp32:.2f}x fp32's time on this device)")
    print("| ranks | fwd+bwd per rank | Muon replicated | share | Muon partitioned | share | "
          f"exchange per rank | share, {other} Newton-Schulz, replicated / partitioned |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        f, b = r[main_dtype], r[other]
        print(f"| {r['ranks']} | {_s(r['fwd_bwd_s'])} | {_s(f['replicated_s'])} | {f['replicated_share']:.1%} | "
              f"{_s(f['partitioned_s'])} | {f['partitioned_share']:.2%} | {r['exchange_mb']:.0f} MB | "
              f"{b['replicated_share']:.1%} / {b['partitioned_share']:.1%} |")
    if real:
        print(f"\nThe real optimizer (measured; each step's time is its slowest rank's; "
              f"Newton-Schulz in {args.ns_dtype}; the machine is shared)")
        print("| processes | matrices | replicated step | partitioned step | partitioned / replicated | "
              "the same in CPU time |")
        print("|---:|---:|---:|---:|---:|---:|")
    for r in real:
        print(f"| {r['world']} | {r['matrices']} | {statistics.median(r['replicated']):.2f} s | "
              f"{statistics.median(r['partitioned']):.2f} s | {r['ratio_median']:.2f} | {r['cpu_ratio_median']:.2f} |")
    atomic_write(args.out, (json.dumps({
        "args": vars(args), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "cpus": os.cpu_count(),
        "tokens_per_step": tokens_per_step, "main_dtype": main_dtype, "parts": parts, "computed": rows,
        "real": real, "against_torch": single, "bf16_over_fp32": bf16_over_fp32}, indent=2) + "\n").encode())
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
