"""Generation speed: nanokor's KV-cache decoding against transformers' `generate` on the exported model.

Both sides get the same weights (nanokor's export, loaded back with AutoModelForCausalLM), the same
Korean prompt, the same number of new tokens and the same sampling (temperature 0.8, top-k 50; EOS
ignored so every run makes exactly that many tokens). nanokor runs eager, compiled over a static KV
cache (`Decoder(model, "compile")`, as `sample.py --compile`; compilation happens in the warm-up and is
reported apart) and, on CUDA, as a replayed CUDA graph (`sample.py --cuda-graph`). Before timing, every
nanokor path must produce eager's greedy tokens. Runs are interleaved so machine noise hits all
equally, and the fastest round is reported (on a shared machine noise only adds time); the slowest
round's ratio is reported too, as the noise. Also measured: time to first token (prefill of a
512-token prompt plus one sampled token) at batch 1.

    python bench/sample_speed.py                       # a 6-layer, d=384 model on the sample tokenizer
    python bench/sample_speed.py --ckpt out/last.pt    # a trained checkpoint
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from nanokor.checkpoint import build_model, build_tokenizer, load_checkpoint
from nanokor.corpus import SAMPLE_DIR, normalize, open_corpus
from nanokor.export import export
from nanokor.device import DTYPES, resolve_device, resolve_dtype
from nanokor.generate import Decoder, generate
from nanokor.model import ModelConfig, Transformer
from nanokor.tokenizer import train_tokenizer

SAMPLING = dict(temperature=0.8, top_k=50)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="benchmark this checkpoint (default: a random model of the shape below)")
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--n-kv-head", type=int, default=2)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length for the decode runs")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--ttft-prompt-tokens", type=int, default=512)
    p.add_argument("--rounds", type=int, default=8,
                   help="interleaved rounds; the fastest is reported (noise only adds time)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument("--out", default="bench/results/sample_speed.json")
    return p.parse_args()


def make_checkpoint(args) -> dict:
    """A checkpoint dict: the given one, or random weights with a tokenizer trained on the sample."""
    if args.ckpt:
        return load_checkpoint(args.ckpt)
    tokenizer = train_tokenizer([normalize(d) for d in open_corpus("sample").documents()])
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                         n_kv_head=args.n_kv_head, d_model=args.d_model, d_ff=args.d_ff, max_seq_len=1024)
    torch.manual_seed(0)
    model = Transformer(config)
    return {"model_config": config.architecture(), "model": model.state_dict(), "tokenizer": tokenizer.model_bytes}


def korean_prompt(tokenizer, n: int) -> list[int]:
    ids = [tokenizer.bos_id]
    for path in sorted(SAMPLE_DIR.glob("*.txt")):
        ids += tokenizer.encode(path.read_text(encoding="utf-8"))
        if len(ids) >= n:
            return ids[:n]
    raise SystemExit(f"the embedded sample has fewer than {n} tokens; lower --ttft-prompt-tokens")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def nanokor_decode(model, idx, n, generator):
    return torch.stack(list(generate(model, idx, n, generator=generator, **SAMPLING)), dim=1)


def hf_decode(hf, idx, n, _generator):
    out = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=True, max_new_tokens=n, **SAMPLING)
    return out[:, idx.size(1):]


def timed(fn, device) -> tuple[float, torch.Tensor]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def main():
    args = parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    ckpt = make_checkpoint(args)
    tokenizer = build_tokenizer(ckpt)
    ours = build_model(ckpt).to(device, dtype)
    import transformers  # benchmark-only dependency

    with tempfile.TemporaryDirectory() as hf_dir:
        export(ckpt, hf_dir)
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None  # both sides make exactly --new-tokens tokens
    generator = torch.Generator(device).manual_seed(0)
    torch.manual_seed(0)
    impls = {"nanokor": (ours, nanokor_decode), "transformers": (hf, hf_decode)}
    if device.type == "cuda":  # as `sample.py --cuda-graph` does
        impls["nanokor+cudagraph"] = (Decoder(ours, "graph"), nanokor_decode)
    if not args.no_compile:  # as `sample.py --compile` does
        impls["nanokor+compile"] = (Decoder(ours, "compile"), nanokor_decode)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    prompt = torch.tensor([korean_prompt(tokenizer, args.prompt_tokens)], device=device)
    long_prompt = torch.tensor([korean_prompt(tokenizer, args.ttft_prompt_tokens)], device=device)

    times = {(b, name): [] for b in batch_sizes for name in impls}
    ttft = {name: [] for name in impls}
    with torch.no_grad():
        warmup = {}  # allocator, kernels, caches; compilation, for every shape timed below
        for name, (model, decode) in impls.items():
            t0 = time.perf_counter()
            for b in batch_sizes:
                decode(model, prompt.expand(b, -1), 4, generator)
            decode(model, long_prompt, 1, generator)
            warmup[name] = time.perf_counter() - t0
        greedy = {name: torch.stack(list(generate(model, prompt, 64, temperature=0)), 1)
                  for name, (model, _) in impls.items() if name.startswith("nanokor")}
        # How many greedy tokens each path shares with eager before the first difference: all 64 in fp32;
        # in bf16 a near-tie may flip late, while a wrong cache or mask diverges at once.
        agree = {name: int((out != greedy["nanokor"]).int().cumsum(1).eq(0).sum()) for name, out in greedy.items()}
        if min(agree.values()) < 16:
            raise SystemExit(f"greedy tokens shared with eager nanokor (of 64): {agree}; a fast path is wrong")
        for _ in range(args.rounds):
            for b in batch_sizes:
                for name, (model, decode) in impls.items():
                    sec, out = timed(lambda: decode(model, prompt.expand(b, -1), args.new_tokens, generator), device)
                    assert out.shape == (b, args.new_tokens), (name, out.shape)
                    times[(b, name)].append(sec)
            for name, (model, decode) in impls.items():
                ttft[name].append(timed(lambda: decode(model, long_prompt, 1, generator), device)[0])

    rows = []
    for b in batch_sizes:
        ref, ref_worst = min(times[(b, "transformers")]), max(times[(b, "transformers")])
        for name in impls:
            sec = min(times[(b, name)])
            rows.append({"batch": b, "impl": name, "seconds": sec, "ms_per_step": sec / args.new_tokens * 1e3,
                         "tokens_per_s": b * args.new_tokens / sec, "speedup_vs_transformers": ref / sec,
                         "slowest_round_speedup": ref_worst / max(times[(b, name)])})
    ttft_ms = {name: min(v) * 1e3 for name, v in ttft.items()}

    c = ours.config
    print(f"model: vocab {c.vocab_size}, d_model {c.d_model}, layers {c.n_layer}, heads {c.n_head}/{c.n_kv_head} kv, "
          f"{ours.num_params() / 1e6:.1f}M params; {device.type} {str(dtype).removeprefix('torch.')}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    print(f"decode: prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, sampling {SAMPLING}, "
          f"best of {args.rounds} interleaved rounds")
    header = (f"{'batch':>5} {'impl':<18} {'seconds':>8} {'ms/step':>8} {'tokens/s':>9} {'speedup':>8} "
              f"{'slowest':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['batch']:>5} {r['impl']:<18} {r['seconds']:>8.3f} {r['ms_per_step']:>8.2f} "
              f"{r['tokens_per_s']:>9.1f} {r['speedup_vs_transformers']:>7.2f}x {r['slowest_round_speedup']:>7.2f}x")
    print(f"time to first token, {args.ttft_prompt_tokens}-token prompt, batch 1: " +
          ", ".join(f"{name} {ms:.1f} ms" for name, ms in ttft_ms.items()))
    print(f"greedy tokens shared with eager nanokor before the first difference (of 64): {agree}")
    print("warm-up (compilation included): " + ", ".join(f"{name} {sec:.1f} s" for name, sec in warmup.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "device": device.type, "dtype": str(dtype),
                               "torch": torch.__version__, "transformers": transformers.__version__,
                               "decode": rows, "ttft_ms": ttft_ms, "warmup_s": warmup,
                               "greedy_agreement": agree}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
