"""Generation speed: nanokor's KV-cache decoding against transformers' `generate` on the exported model;
and, with --check, the fast decoding paths' greedy tokens against eager's.

Timing (the default). Both sides get the same weights (nanokor's export, loaded back with
AutoModelForCausalLM), the same Korean prompt, the same number of new tokens and the same sampling
(temperature 0.8, top-k 50; EOS ignored so every run makes exactly that many tokens). nanokor runs eager,
compiled over a static KV cache (`Decoder(model, "compile")`, as `sample.py --compile`; compilation
happens in the warm-up and is reported apart) and, on CUDA, as a replayed CUDA graph (`sample.py
--cuda-graph`). Runs are interleaved so machine noise hits all equally, and the fastest round is
reported (on a shared machine noise only adds time); the slowest round's ratio is reported too, as the
noise. Also measured: time to first token (prefill of a 512-token prompt plus one sampled token) at
batch 1. The JSON is rewritten after every round, so a run cut short keeps what it measured. How many
tokens each fast path shares with eager from the same seed is recorded as a figure, never a gate: in
bf16 a near-tie may flip a token late, and correctness is the fp32 check's job.

Check (--check; fp32 unless --dtype says otherwise). Each fast path's greedy tokens against eager's for
two batches of two prompts through one Decoder (its static cache and graph reused, the second prompts
shorter than what the first left in the cache), and eager's against full forwards with no cache. In
fp32 every path computes the same function, so all tokens must agree; at a difference, eager's gap
between its two most likely tokens is reported (a gap at rounding level is a near-tie, a wide one is a
wrong cache, mask or graph). On CUDA also: the graph path captured under bf16 autocast and replayed
under a later autocast, after the first one's freed weight copies were overwritten with NaN, must
repeat its own tokens. A path this device lacks is recorded as skipped (the graph on a CPU), as is one
switched off (--no-compile). Exit 1 unless every path that ran agrees.

    python bench/sample_speed.py                       # a 6-layer, d=384 model on the sample tokenizer
    python bench/sample_speed.py --ckpt out/last.pt    # a trained checkpoint
    python bench/sample_speed.py --check --device cuda # the CUDA graph and reduce-overhead paths, fp32
"""

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from nanokor.atomic import atomic_write
from nanokor.checkpoint import build_model, build_tokenizer, load_checkpoint
from nanokor.corpus import SAMPLE_DIR, normalize, open_corpus
from nanokor.export import export
from nanokor.device import DTYPES, resolve_device, resolve_dtype
from nanokor.generate import Decoder, generate
from nanokor.model import ModelConfig, Transformer
from nanokor.tokenizer import train_tokenizer

SAMPLING = dict(temperature=0.8, top_k=50)
AGREEMENT_TOKENS = 64  # tokens compared against eager, by --check and by the timing's agreement figure


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true",
                   help="no timing: every fast path's greedy tokens must equal eager's (fp32 unless --dtype)")
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
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile path")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument("--out", default="bench/results/sample_speed.json")
    return p.parse_args(argv)


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


def decode(model, idx, n, **sampling) -> torch.Tensor:
    if hasattr(model, "forget"):  # a Decoder: the rounds repeat one prompt, which it would otherwise not prefill again
        model.forget()
    return torch.stack(list(generate(model, idx, n, **sampling)), dim=1)


def nanokor_decode(model, idx, n, generator):
    return decode(model, idx, n, generator=generator, **SAMPLING)


def hf_decode(hf, idx, n, _generator):
    out = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=True, max_new_tokens=n, **SAMPLING)
    return out[:, idx.size(1):]


def timed(fn, device) -> tuple[float, torch.Tensor]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def write(out: Path, result: dict) -> None:
    atomic_write(out, (json.dumps(result, indent=2) + "\n").encode())


def fast_paths(model, device, compile_: bool) -> dict:
    """nanokor's fast decoding paths: name -> a Decoder, or the reason it is skipped on this run."""
    return {"nanokor+cudagraph": Decoder(model, "graph") if device.type == "cuda" else "skipped: no CUDA",
            "nanokor+compile": Decoder(model, "compile") if compile_ else "skipped: --no-compile"}


def shared_prefix(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per row, the tokens out shares with ref before their first difference."""
    return (out == ref).int().cumprod(1).sum(1)


def top2_gap(model, prompt: torch.Tensor, tokens: torch.Tensor) -> tuple[float, float]:
    """Eager's logit margin between its two most likely next tokens after prompt + tokens (1-D each), and
    the logits' largest magnitude, the scale of their rounding error."""
    logits = model(torch.cat([prompt, tokens])[None])[0][0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1]), float(logits.abs().max())


def agreement(model, prompts, outs, refs) -> dict:
    """outs against refs (one (B, n) tensor per prompt batch): ok when every token agrees; else where the
    first difference is, and eager's top-2 gap there. fp32 rounding (~1e-6 of the logits' scale) can flip
    only a near-tie; a wrong cache, mask or graph parts where the gap is wide."""
    n = refs[0].size(1)
    shared = [shared_prefix(out, ref) for out, ref in zip(outs, refs)]
    agree = min(int(s.min()) for s in shared)
    if agree == n:
        return {"status": "ok", "agree": n, "of": n}
    i, row = next((i, int(s.argmin())) for i, s in enumerate(shared) if int(s.min()) == agree)
    gap, scale = top2_gap(model, prompts[i][row], refs[i][row, :agree])
    tie = ", a near-tie that fp32 rounding can flip" if gap < 1e-5 * scale else ""
    return {"status": f"DIFFERS at token {agree} of {n} (eager's top-2 logit gap there {gap:.2g}{tie})",
            "agree": agree, "of": n, "first_difference": {"prompt": i, "row": row, "token": agree,
                                                          "eager_top2_gap": gap, "logit_scale": scale}}


def full_forwards(model, idx, n) -> torch.Tensor:
    """Greedy decoding with no KV cache: the whole sequence through the model for every token."""
    seq = idx
    for _ in range(n):
        seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, idx.size(1):]


def check_prompts(tokenizer, device) -> list[torch.Tensor]:
    """Two batches of two Korean prompts; the second batch's are shorter than what the first leaves in
    the cache, so stale cache entries must stay masked."""
    ids = korean_prompt(tokenizer, 160)
    return [torch.tensor(rows, device=device) for rows in ([ids[:24], ids[100:124]], [ids[:9], ids[60:69]])]


def graph_under_autocast(model, prompts, n=AGREEMENT_TOKENS, device_type="cuda", dtype=torch.bfloat16) -> dict:
    """The graph path captured under one autocast and replayed under a later one, with the first
    autocast's freed weight copies overwritten by NaN in between: the replay must give the tokens the
    capturing run gave (the same kernels on the same inputs, so exactly), where a graph that read those
    copies would read NaN. (Against eager they may differ in bf16: the static cache attends over its
    whole masked buffer, so a near-tie may round the other way.)"""
    decoder = Decoder(model, "graph")
    with torch.autocast(device_type, dtype=dtype):
        refs = [decode(decoder, prompt, n, temperature=0) for prompt in prompts]  # captures, then replays
    poison = [torch.full(p.shape, float("nan"), dtype=dtype, device=p.device)
              for p in model.parameters() if p.dim() == 2]
    with torch.autocast(device_type, dtype=dtype):
        outs = [decode(decoder, prompt, n, temperature=0) for prompt in prompts]  # replays only
        result = agreement(model, prompts, outs, refs)
    del poison
    return result


def check(args, model, tokenizer, device, result: dict, out: Path) -> bool:
    """--check: every fast path's greedy tokens against eager's; True when every path that ran agrees."""
    prompts = check_prompts(tokenizer, device)
    refs = [decode(model, prompt, AGREEMENT_TOKENS, temperature=0) for prompt in prompts]
    paths = result["paths"] = {}

    def against_eager(path) -> dict:
        return agreement(model, prompts, [decode(path, p, AGREEMENT_TOKENS, temperature=0) for p in prompts], refs)

    fast = {name: path if isinstance(path, str) else partial(against_eager, path)
            for name, path in fast_paths(model, device, not args.no_compile).items()}
    # Eager's KV cache against none at all first (the reference the fast paths are held to, on any device);
    # the compiled path last, as it alone takes long (it compiles on the first prompt).
    runs = {"full forwards (no cache)": lambda: agreement(
        model, prompts, [full_forwards(model, p, AGREEMENT_TOKENS) for p in prompts], refs),
        "nanokor+cudagraph": fast["nanokor+cudagraph"],
        "nanokor+cudagraph under autocast": (partial(graph_under_autocast, model, prompts)
                                             if device.type == "cuda" else "skipped: no CUDA"),
        "nanokor+compile": fast["nanokor+compile"]}
    for name, run in runs.items():  # each result written as soon as it is known
        if isinstance(run, str):
            paths[name] = {"status": run}
        else:
            t0 = time.perf_counter()
            paths[name] = {**run(), "seconds": time.perf_counter() - t0}
        print(f"{name:<34} {paths[name]['status']}", flush=True)
        write(out, result)
    result["ok"] = all(p["status"] == "ok" or p["status"].startswith("skipped") for p in paths.values())
    write(out, result)
    return result["ok"]


def bench(args, ours, ckpt, tokenizer, device, dtype, result: dict, out: Path) -> None:
    """The timing: nanokor's paths against transformers, interleaved rounds, the JSON after each."""
    import transformers  # benchmark-only dependency

    with tempfile.TemporaryDirectory() as hf_dir:
        export(ckpt, hf_dir)
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None  # both sides make exactly --new-tokens tokens
    result["transformers"] = transformers.__version__
    generator = torch.Generator(device).manual_seed(0)
    torch.manual_seed(0)
    impls = {"nanokor": (ours, nanokor_decode), "transformers": (hf, hf_decode)}
    result["skipped"] = {}
    for name, path in fast_paths(ours, device, not args.no_compile).items():
        if isinstance(path, str):
            result["skipped"][name] = path
        else:
            impls[name] = (path, nanokor_decode)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    prompt = torch.tensor([korean_prompt(tokenizer, args.prompt_tokens)], device=device)
    long_prompt = torch.tensor([korean_prompt(tokenizer, args.ttft_prompt_tokens)], device=device)

    times = {(b, name): [] for b in batch_sizes for name in impls}
    ttft = {name: [] for name in impls}
    with torch.no_grad():
        warmup = result["warmup_s"] = {}  # allocator, kernels, caches; compilation, for every shape timed below
        for name, (model, decode_fn) in impls.items():
            t0 = time.perf_counter()
            for b in batch_sizes:
                decode_fn(model, prompt.expand(b, -1), 4, generator)
            decode_fn(model, long_prompt, 1, generator)
            warmup[name] = time.perf_counter() - t0
            write(out, result)
        # Tokens shared with eager before the first difference, from the same seed and the timed sampling
        # (so no extra compilation): all in fp32 as a rule, while in bf16 a near-tie may flip one late.
        n, seeded = AGREEMENT_TOKENS, lambda: torch.Generator(device).manual_seed(1)
        eager = decode(ours, prompt, n, generator=seeded(), **SAMPLING)
        agree = result["seeded_agreement"] = {
            name: int(shared_prefix(decode(model, prompt, n, generator=seeded(), **SAMPLING), eager).min())
            for name, (model, _) in impls.items() if name.startswith("nanokor+")}
        for r in range(args.rounds):
            for b in batch_sizes:
                for name, (model, decode_fn) in impls.items():
                    sec, tokens = timed(lambda: decode_fn(model, prompt.expand(b, -1), args.new_tokens, generator),
                                        device)
                    assert tokens.shape == (b, args.new_tokens), (name, tokens.shape)
                    times[(b, name)].append(sec)
            for name, (model, decode_fn) in impls.items():
                ttft[name].append(timed(lambda: decode_fn(model, long_prompt, 1, generator), device)[0])
            result.update(rounds=r + 1, decode=decode_rows(times, batch_sizes, impls, args.new_tokens),
                          ttft_ms={name: min(v) * 1e3 for name, v in ttft.items()})
            write(out, result)

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
    for r in result["decode"]:
        print(f"{r['batch']:>5} {r['impl']:<18} {r['seconds']:>8.3f} {r['ms_per_step']:>8.2f} "
              f"{r['tokens_per_s']:>9.1f} {r['speedup_vs_transformers']:>7.2f}x {r['slowest_round_speedup']:>7.2f}x")
    for name, why in result["skipped"].items():
        print(f"{'':>5} {name:<18} {why}")
    print(f"time to first token, {args.ttft_prompt_tokens}-token prompt, batch 1: " +
          ", ".join(f"{name} {ms:.1f} ms" for name, ms in result["ttft_ms"].items()))
    print(f"tokens shared with eager nanokor from the same seed before the first difference (of {n}): {agree}")
    print("warm-up (compilation included): " + ", ".join(f"{name} {sec:.1f} s" for name, sec in warmup.items()))


def decode_rows(times: dict, batch_sizes, impls, new_tokens: int) -> list[dict]:
    """One row per batch size and implementation, from the rounds timed so far: the fastest round, and
    the slowest round's ratio as the noise."""
    rows = []
    for b in batch_sizes:
        ref, ref_worst = min(times[(b, "transformers")]), max(times[(b, "transformers")])
        for name in impls:
            sec = min(times[(b, name)])
            rows.append({"batch": b, "impl": name, "seconds": sec, "ms_per_step": sec / new_tokens * 1e3,
                         "tokens_per_s": b * new_tokens / sec, "speedup_vs_transformers": ref / sec,
                         "slowest_round_speedup": ref_worst / max(times[(b, name)])})
    return rows


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype("fp32" if args.check and args.dtype == "auto" else args.dtype, device)
    ckpt = make_checkpoint(args)
    tokenizer = build_tokenizer(ckpt)
    ours = build_model(ckpt).to(device, dtype)
    out = Path(args.out)
    result = {"args": vars(args), "mode": "check" if args.check else "timing", "device": device.type,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype), "torch": torch.__version__, "params": ours.num_params()}
    if args.check:
        with torch.no_grad():
            ok = check(args, ours, tokenizer, device, result, out)
        print(f"wrote {out}")
        if not ok:
            raise SystemExit(f"error: a fast decoding path's greedy tokens differ from eager's in "
                             f"{str(dtype).removeprefix('torch.')} (see above and {out})")
        return
    bench(args, ours, ckpt, tokenizer, device, dtype, result, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
