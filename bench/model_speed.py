"""Training-step throughput of nanokor's decoder against transformers' LlamaForCausalLM.

Both models get the identical shape and weights; each step is forward + backward + AdamW on random
tokens. fp32 and bf16 autocast run side by side, interleaved so machine noise hits both equally.
Achieved FLOP/s (6N with the LM head, plus attention) is compared with a matmul peak measured in the
same run, so the fraction says how close the whole step gets to what this machine's GEMMs can do.
A third row runs nanokor under torch.compile (as `train.py --compile` does). Each configuration's
fastest round is reported: on a shared machine noise only adds time.

    python bench/model_speed.py            # vocab 8192, d 384, 6 layers, T 256, B 8: a small model a CPU trains
"""

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from nanokor.export import hf_config, hf_state_dict
from nanokor.model import ModelConfig, Transformer
from nanokor.config import load_config
from nanokor.optim import build_optimizer


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the fastest is reported")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--out", default="bench/results/model_speed.json")
    return p.parse_args()


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Best FLOP/s of a large square matmul: the ceiling the model's GEMMs could reach here."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def make_models(args):
    config = ModelConfig(vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                         d_model=args.d_model, d_ff=args.d_ff, max_seq_len=args.seq_len, attention="sdpa")
    torch.manual_seed(0)
    ours = Transformer(config)
    import transformers  # benchmark-only dependency

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(config)))
    hf.config._attn_implementation = "sdpa"
    hf.load_state_dict(hf_state_dict(ours))
    return config, ours, hf


def nanokor_step(model):
    def step(x, y):
        _, loss = model(x, y)
        loss.backward()
    return step


def hf_step(model):
    def step(x, y):
        # labels are shifted inside transformers; pass the unshifted sequence so both see T targets.
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
    return step


def make_optimizer(model):
    if isinstance(model, Transformer):
        return build_optimizer(model, load_config(["--optimizer=adamw", "--schedule=cosine", "--lr=1e-4"]))
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))


def time_steps(step, opt, x, y, autocast, n: int) -> float:
    """Seconds per training step (forward, backward, AdamW), after a warm-up step."""
    for i in range(n + 1):
        if i == 1:
            t0 = time.perf_counter()
        with autocast():
            step(x, y)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / n


def main():
    args = parse_args()
    config, ours, hf = make_models(args)
    B, T = args.batch_size, args.seq_len
    x = torch.randint(0, config.vocab_size, (B, T))
    y = torch.randint(0, config.vocab_size, (B, T))
    flops_per_step = ours.flops_per_token(T) * B * T
    precisions = {"fp32": (torch.float32, nullcontext),
                  "bf16": (torch.bfloat16, lambda: torch.autocast("cpu", dtype=torch.bfloat16))}
    runners = {"nanokor": (ours, nanokor_step(ours)), "transformers": (hf, hf_step(hf))}
    if not args.no_compile:
        runners["nanokor+compile"] = (ours, nanokor_step(torch.compile(ours)))
    optimizers = {name: make_optimizer(model) for name, (model, _) in runners.items()}
    for p, (_, autocast) in precisions.items():  # warm-up, and compile both precisions outside the timing
        for name, (_, step) in runners.items():
            time_steps(step, optimizers[name], x, y, autocast, 1)

    times = {(p, r): [] for p in precisions for r in runners}
    peaks = {p: [] for p in precisions}
    for _ in range(args.rounds):
        for p, (dtype, autocast) in precisions.items():
            peaks[p].append(matmul_peak(dtype))
            for r, (_, step) in runners.items():
                times[(p, r)].append(time_steps(step, optimizers[r], x, y, autocast, args.steps))

    rows = []
    for p in precisions:
        peak = max(peaks[p])
        ref = min(times[(p, "transformers")])
        for r in runners:
            sec = min(times[(p, r)])
            rows.append({"precision": p, "impl": r, "step_s": sec, "tokens_per_s": B * T / sec,
                         "vs_transformers": ref / sec, "achieved_gflops": flops_per_step / sec / 1e9,
                         "matmul_peak_gflops": peak / 1e9, "fraction_of_peak": flops_per_step / sec / peak})

    print(f"shape: vocab {config.vocab_size}, d_model {config.d_model}, layers {config.n_layer}, "
          f"heads {config.n_head}, d_ff {config.d_ff}, T {T}, batch {B}; "
          f"{ours.flops_per_token(T) / 1e6:.1f} MFLOP/token; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    header = f"{'precision':<9} {'impl':<16} {'step ms':>8} {'tokens/s':>9} {'vs HF':>6} {'GFLOP/s':>8} " \
             f"{'peak':>7} {'of peak':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['precision']:<9} {r['impl']:<16} {r['step_s'] * 1e3:>8.1f} {r['tokens_per_s']:>9.0f} "
              f"{r['vs_transformers']:>6.2f} {r['achieved_gflops']:>8.1f} {r['matmul_peak_gflops']:>7.1f} "
              f"{r['fraction_of_peak']:>8.1%}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
