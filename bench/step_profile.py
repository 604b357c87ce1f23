"""Where a training step's time goes: matmuls, attention, the optimizer, and everything else.

Runs forward + backward + the optimizer (Muon + AdamW, as config/base.py; or --optimizer adamw) on random
tokens (bf16 autocast on CUDA, fp32 on CPU unless --dtype), times plain steps for the throughput and MFU,
then profiles a few more in several windows, keeps each kernel's fastest window and sorts the kernels'
own time into categories. On CUDA it also reports how busy the GPU was (kernel time / wall time), and how
fast the matmul kernels alone ran (6N FLOPs over their time), which separates "the GEMMs are slow"
from "everything around them is". The default shape is config/base.py's, with a 32k vocabulary.

    python bench/step_profile.py --compile                   # on a GPU: the base model, compiled
    python bench/step_profile.py --d-model 256 --n-layer 6 --n-head 4 --d-ff 688 --vocab-size 8192 \\
        --seq-len 256 --batch-size 16 --optimizer adamw        # on a CPU: model_speed.py's shape
"""

import argparse
import json
import re
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from nanokor.device import estimate_mfu, resolve_device
from nanokor.model import ModelConfig, Transformer
from nanokor.config import load_config
from nanokor.optim import build_optimizer

CATEGORIES = (  # first match wins; names of CUDA kernels, Inductor kernels and aten ops, lower-cased
    # Compiled graphs' own time is their fused elementwise kernels (their GEMMs are timed apart), and a
    # loss wrapper's own time is its Python; either name may hold "bmm" or "linear" by accident.
    ("other", re.compile(r"compiledfxgraph|cross_?entropy")),
    ("attention", re.compile(r"flash|fmha|attention|sdpa")),
    ("matmul", re.compile(r"gemm|xmma|nvjet|cutlass|cublas|\bmm\b|aten::mm|addmm|bmm|matmul|linear")),
    ("optimizer", re.compile(r"adam|foreach|multi_tensor|norm_kernel|clip")),
)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--d-ff", type=int, default=3072)
    p.add_argument("--dropout", type=float, default=0.0, help="config/base.py trains without")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--optimizer", default="muon", choices=["adamw", "muon"], help="config/base.py's is muon")
    p.add_argument("--plain-loss", action="store_true",
                   help="the unfused LM head + cross-entropy (full logits), to measure what the fused one saves")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--profile-rounds", type=int, default=3, help="profiled windows; each op keeps its fastest")
    p.add_argument("--out", default="bench/results/step_profile.json")
    return p.parse_args()


def category(name: str) -> str:
    name = name.lower()
    return next((cat for cat, pattern in CATEGORIES if pattern.search(name)), "other")


def main():
    args = parse_args()
    device = resolve_device(args.device)
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    config = ModelConfig(vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                         d_model=args.d_model, d_ff=args.d_ff, dropout=args.dropout, max_seq_len=args.seq_len)
    torch.manual_seed(0)
    model = Transformer(config).to(device)
    optimizer = build_optimizer(model, load_config([f"--optimizer={args.optimizer}", "--schedule=cosine", "--lr=1e-4"]))
    fwd = torch.compile(model) if args.compile else model
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    x = torch.randint(args.vocab_size, (args.batch_size, args.seq_len), device=device)
    y = torch.randint(args.vocab_size, (args.batch_size, args.seq_len), device=device)

    def step():
        with autocast():
            _, loss = fwd(x, y, loss_only=not args.plain_loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(3):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    step_s = (time.perf_counter() - t0) / args.steps

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # Several profiled windows; each op keeps its fastest window (noise on a shared machine only adds time,
    # and it slows memory-bound ops most, which would inflate exactly the share this measures).
    by_kernel = {}
    for _ in range(args.profile_rounds):
        with profile(activities=activities) as prof:
            for _ in range(args.profile_steps):
                step()
            sync()
        window = defaultdict(float)
        for event in prof.key_averages():
            us = event.self_device_time_total if cuda else event.self_cpu_time_total
            if us <= 0 or event.key.startswith("ProfilerStep"):
                continue
            # On CUDA a user annotation ("Optimizer.step#AdamW.step") spans kernels counted on their own.
            if cuda and (event.device_type != torch.autograd.DeviceType.CUDA or "#" in event.key):
                continue
            window[event.key] += us / 1e3 / args.profile_steps
        for name, ms in window.items():
            by_kernel[name] = min(ms, by_kernel.get(name, ms))
    by_cat = defaultdict(float)
    for name, ms in by_kernel.items():
        by_cat[category(name)] += ms
    kernel_ms = sum(by_cat.values())

    tokens = args.batch_size * args.seq_len
    flops_per_token = model.flops_per_token(args.seq_len)
    matmul_flops = 6 * (model.num_params(include_embedding=False)) * tokens
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    dtype = torch.bfloat16 if bf16 else torch.float32
    mfu = estimate_mfu(flops_per_token, tokens / step_s, device_name, dtype, 1)
    result = {
        "args": vars(args), "device": device_name, "torch": torch.__version__, "params": model.num_params(),
        "step_ms": step_s * 1e3, "tokens_per_s": tokens / step_s, "tflops": flops_per_token * tokens / step_s / 1e12,
        "mfu": mfu, "warmup_s": warmup_s, "profiled_ms_per_step": kernel_ms,
        "categories_ms": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
        "matmul_tflops": matmul_flops / (by_cat["matmul"] / 1e3) / 1e12 if by_cat["matmul"] else None,
        "top": sorted(by_kernel.items(), key=lambda kv: -kv[1])[:15],
    }

    print(f"{device_name}, torch {torch.__version__}, {'bf16' if bf16 else 'fp32'}, "
          f"{'compiled' if args.compile else 'eager'}; {model.num_params() / 1e6:.1f}M params, "
          f"{args.batch_size} x {args.seq_len} tokens, dropout {args.dropout}, {args.optimizer}, "
          f"{'plain' if args.plain_loss else 'fused'} LM head + loss")
    print(f"step {step_s * 1e3:.1f} ms, {tokens / step_s:,.0f} tokens/s, {result['tflops']:.3g} TFLOP/s"
          + (f", MFU {mfu:.1%}" if mfu is not None else "") + f" (warm-up {warmup_s:.1f} s)")
    busy = f", {kernel_ms / (step_s * 1e3):.0%} of the step's wall time" if cuda else ""
    print(f"{'kernel' if cuda else 'op'} time per step {kernel_ms:.1f} ms{busy}:")
    for cat, ms in result["categories_ms"].items():
        print(f"  {cat:<10} {ms:>8.2f} ms  {ms / kernel_ms:>6.1%}")
    if result["matmul_tflops"]:
        print(f"matmuls alone: {result['matmul_tflops']:.3g} TFLOP/s (6N over their own time)")
    print("top kernels:" if cuda else "top ops:")
    for name, ms in result["top"]:
        print(f"  {ms:>8.2f} ms  [{category(name)}] {name[:110]}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
