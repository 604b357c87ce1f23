"""Training-step throughput of nanokor's decoder against transformers' GPT-2 and Llama, in one run.

Every row is one training step (forward, backward, optimizer) on the same random tokens:

    nanokor                 nanokor's model with AdamW, as train.py runs it (eager)
    nanokor + Muon          the same with optimizer=muon: the row that says what Muon costs per step
    nanokor + compile       torch.compile, as `train.py --compile` does
    GPT2LMHeadModel         transformers' GPT-2 of the same width and depth (4x MLP, learned positions,
                            LayerNorm, tied head) with AdamW; nanokor's SwiGLU width d_ff defaults to
                            8/3 d_model (rounded to 16), so both have the same non-embedding parameters
    LlamaForCausalLM        transformers' Llama with nanokor's own weights (the architecture twin)

fp32 and bf16 autocast, every configuration interleaved round by round so machine noise hits all
alike; each configuration's fastest round is reported (noise on a shared machine only adds time).
Achieved FLOP/s (6N with the LM head, plus attention) is compared with a matmul peak measured in the
same run. The default shape is bench/recipe_quality.py's: a model a CPU trains in half an hour.

    python bench/model_speed.py                      # vocab 8192, d 256, 6 layers, 4 heads, T 256, B 16
    OMP_NUM_THREADS=1 taskset -c 0 python bench/model_speed.py --rounds 5   # one core, as the recipes train
"""

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from nanokor.config import load_config
from nanokor.export import hf_config
from nanokor.export_spec import hf_state_dict
from nanokor.model import ModelConfig, Transformer
from nanokor.optim import build_optimizer


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-ff", type=int, help="SwiGLU width (default: 8/3 d_model rounded up to 16: GPT-2's parameters)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the fastest is reported")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--out", default="bench/results/model_speed.json")
    return p.parse_args()


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of a large square matmul: the ceiling the model's GEMMs could reach here."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def optimizer_cfg(name: str):
    return load_config([f"--optimizer={name}", "--schedule=cosine", "--lr=1e-4", "--weight_decay=0.1"])


def make_runners(args) -> tuple[Transformer, dict]:
    """{row name: (step function, optimizer)}; each step function takes (x, y) and runs backward."""
    import transformers  # benchmark-only dependency

    d_ff = args.d_ff or -(-8 * args.d_model // 3 // 16) * 16
    config = ModelConfig(vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                         d_model=args.d_model, d_ff=d_ff, max_seq_len=args.seq_len, attention="sdpa")
    torch.manual_seed(0)
    ours = Transformer(config)
    muon_model = Transformer(config)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(config)))
    llama.load_state_dict(hf_state_dict(ours))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=args.vocab_size, n_positions=args.seq_len, n_embd=args.d_model, n_layer=args.n_layer,
        n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2))
    for hf in (llama, gpt2):
        hf.config._attn_implementation = "sdpa"

    def nanokor_step(model):
        def step(x, y):
            model(x, y, loss_only=True)[1].backward()
        return step

    def hf_step(model):
        def step(x, y):  # labels are shifted inside transformers: pass the inputs, both then see T-1 targets
            model(input_ids=x, labels=x).loss.backward()
        return step

    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), foreach=True)

    runners = {"nanokor": (nanokor_step(ours), build_optimizer(ours, optimizer_cfg("adamw"))),
               "nanokor + Muon": (nanokor_step(muon_model), build_optimizer(muon_model, optimizer_cfg("muon")))}
    if not args.no_compile:
        runners["nanokor + compile"] = (nanokor_step(torch.compile(ours)), runners["nanokor"][1])
    runners["GPT2LMHeadModel"] = (hf_step(gpt2), adamw(gpt2))
    runners["LlamaForCausalLM"] = (hf_step(llama), adamw(llama))
    params = {"nanokor": ours.num_params(include_embedding=False) - ours.lm_head.weight.numel(),
              "GPT2LMHeadModel": sum(p.numel() for n, p in gpt2.named_parameters() if ".wte." not in n
                                     and ".wpe." not in n)}
    return ours, runners, params


def time_steps(step, opt, x, y, autocast, n: int) -> float:
    """Seconds per training step (forward, backward, optimizer), after a warm-up step."""
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
    ours, runners, params = make_runners(args)
    B, T = args.batch_size, args.seq_len
    x = torch.randint(0, args.vocab_size, (B, T))
    y = torch.randint(0, args.vocab_size, (B, T))
    flops_per_step = ours.flops_per_token(T) * B * T
    all_precisions = {"fp32": (torch.float32, nullcontext),
                      "bf16": (torch.bfloat16, lambda: torch.autocast("cpu", dtype=torch.bfloat16))}
    precisions = {p: all_precisions[p] for p in args.precisions.split(",")}
    for _, autocast in precisions.values():  # warm-up, and compile each precision outside the timing
        for step, opt in runners.values():
            time_steps(step, opt, x, y, autocast, 1)

    times = {(p, r): [] for p in precisions for r in runners}
    peaks = {p: [] for p in precisions}
    for _ in range(args.rounds):
        for p, (dtype, autocast) in precisions.items():
            peaks[p].append(matmul_peak(dtype))
            for r, (step, opt) in runners.items():
                times[(p, r)].append(time_steps(step, opt, x, y, autocast, args.steps))

    rows = []
    for p in precisions:
        peak, gpt2, ours_s = max(peaks[p]), min(times[(p, "GPT2LMHeadModel")]), min(times[(p, "nanokor")])
        for r in runners:
            sec = min(times[(p, r)])
            rows.append({"precision": p, "impl": r, "step_s": sec, "tokens_per_s": B * T / sec,
                         "vs_gpt2": gpt2 / sec, "vs_nanokor": sec / ours_s,
                         "achieved_gflops": flops_per_step / sec / 1e9, "matmul_peak_gflops": peak / 1e9,
                         "fraction_of_peak": flops_per_step / sec / peak})

    c = ours.config
    print(f"shape: vocab {c.vocab_size}, d_model {c.d_model}, layers {c.n_layer}, heads {c.n_head}, d_ff {c.d_ff}, "
          f"T {T}, batch {B}; non-embedding parameters: nanokor {params['nanokor']:,}, GPT-2 "
          f"{params['GPT2LMHeadModel']:,}; {ours.flops_per_token(T) / 1e6:.1f} MFLOP/token (nanokor); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = (f"{'precision':<9} {'impl':<18} {'step ms':>8} {'tokens/s':>9} {'vs GPT-2':>8} {'vs nanokor':>10} "
              f"{'GFLOP/s':>8} {'of peak':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['precision']:<9} {r['impl']:<18} {r['step_s'] * 1e3:>8.1f} {r['tokens_per_s']:>9.0f} "
              f"{r['vs_gpt2']:>7.2f}x {r['vs_nanokor']:>9.3f}x {r['achieved_gflops']:>8.1f} "
              f"{r['fraction_of_peak']:>8.1%}")
    print("(vs GPT-2: tokens/s over GPT2LMHeadModel's; vs nanokor: step time over nanokor+AdamW's, so the "
          "Muon row is Muon's cost per step; of peak: nanokor's FLOPs over the measured 2048^3 matmul peak)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "params": params, "rows": rows},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
