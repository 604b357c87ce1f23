"""Serving under load: N concurrent streaming clients against `python -m nanokor.serve` on loopback.

The server runs as its own process (the command users run) on a tiny random chat model (or --ckpt).
Each level sends one greedy streaming chat request per prompt (--prompts distinct Korean questions,
--max-tokens tokens each, EOS ignored so every reply has the same length), --concurrency at a time,
and measures requests/s, output tokens/s, time to first token (the first text, not the role chunk
that opens a stream at once) and time per output token after it, as percentiles over requests, and
errors: a failed request, or a reply that differs from the same prompt's reply served alone (the
concurrency-1 level), which would be text mixed up between requests.

The reference, measured in the same run: the engine alone (nanokor.generate in this process, the
server idle) making the same replies one after another, before and after the levels; the server's
tokens/s over it is what HTTP, SSE and the queue cost. One generation thread serves every request, so
throughput stays about flat with concurrency while the time to first token grows with the queue.
The model runs on one core with one thread (the server pinned to CPU 0 with OMP_NUM_THREADS=1, the
engine reference likewise), the clients on the other core: on a shared 2-core machine, two OpenMP
threads per process make a tiny model several times slower, and the figures noise.

    python bench/serve_load.py                          # the quickstart's shape (2.2M), levels 1,10,50
    python bench/serve_load.py --ckpt out-sft/last.pt --concurrency 1,8 --max-tokens 64
    python bench/serve_load.py   # timing: run it alone, never beside another benchmark
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from nanokor.chat_format import render
from nanokor.checkpoint import build_model, build_tokenizer, load_checkpoint, save_checkpoint
from nanokor.corpus import normalize, open_corpus
from nanokor.generate import StreamDecoder, generate
from nanokor.model import ModelConfig, Transformer
from nanokor.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["역사", "수도", "음식", "언어", "산", "강", "노래", "과학", "수학", "바다", "날씨", "교육", "경제"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="serve this checkpoint (default: a random chat model of the shape below)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--concurrency", default="1,10,50", help="levels; the first must be 1 (the served-alone replies)")
    p.add_argument("--prompts", type=int, default=50, help="distinct requests per level (at most 200)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=120, help="seconds a level may take before it is cut off")
    p.add_argument("--compile", action="store_true", help="serve with --compile (warm-up time is reported apart)")
    p.add_argument("--out", default="bench/results/serve_load.json")
    args = p.parse_args()
    args.levels = [int(c) for c in args.concurrency.split(",")]
    if args.levels[0] != 1 or not 1 <= args.prompts <= 200:
        p.error("--concurrency must start with 1 (the reference replies) and --prompts be 1..200")
    return args


def make_checkpoint(args, path: Path) -> Path:
    """A random chat model (marked chat-trained, as SFT marks it) on a tokenizer trained on the sample."""
    tokenizer = train_tokenizer([normalize(d) for d in open_corpus("sample").documents()])
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=args.n_layer, n_head=4, n_kv_head=4,
                         d_model=args.d_model, d_ff=3 * args.d_model, max_seq_len=1024, init_std=0.3)
    torch.manual_seed(0)
    model = Transformer(config)
    save_checkpoint({"model_config": config.architecture(), "model": model.state_dict(),
                     "tokenizer": tokenizer.model_bytes, "train_config": {}, "chat": True}, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MODEL_CPU, CLIENT_CPU = 0, 1  # the model's core (server or engine reference) and the clients'


def pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() > 1:
        os.sched_setaffinity(0, {cpu})


def start_server(ckpt: Path, port: int, max_queue: int, compile_: bool) -> tuple[subprocess.Popen, float]:
    cmd = [sys.executable, "-m", "nanokor.serve", "--ckpt", str(ckpt), "--port", str(port),
           "--max-queue", str(max_queue), "--log-level", "warning"] + ["--compile"] * compile_
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: pin(MODEL_CPU))
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc, time.perf_counter() - start
        except httpx.TransportError:
            time.sleep(0.1)


def request_body(question: str, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}


async def one_request(http: httpx.AsyncClient, body: dict) -> dict:
    """Send one streaming request; the reply's text, token count and timings, or its error."""
    sent = time.perf_counter()
    first = last = None
    text, tokens = [], 0
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"error": event["error"]["message"]}
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                for choice in event["choices"]:
                    if choice["delta"].get("content"):
                        last = time.perf_counter()
                        first = first or last
                        text.append(choice["delta"]["content"])
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if first is None:
        return {"error": "no text"}
    done = time.perf_counter()
    return {"text": "".join(text), "tokens": tokens, "ttft": first - sent,
            "tpot": (last - first) / max(tokens - 1, 1), "latency": done - sent}


async def run_level(url: str, questions: list[str], concurrency: int, max_tokens: int, timeout: float) -> dict:
    """Every question once, `concurrency` requests in flight at a time."""
    pending = list(enumerate(questions))
    results: list[dict | None] = [None] * len(questions)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        async def client():
            while pending:
                i, q = pending.pop(0)
                results[i] = await one_request(http, request_body(q, max_tokens))

        start = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.gather(*(client() for _ in range(concurrency))), timeout)
        except TimeoutError:
            pass
        wall = time.perf_counter() - start
    return {"results": [r or {"error": "cut off by --timeout"} for r in results], "wall": wall}


def percentiles(values) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}


def summarize(level: int, run: dict, reference: list[str] | None) -> dict:
    ok = [r for r in run["results"] if "text" in r]
    errors = [r["error"] for r in run["results"] if "error" in r]
    mixed = 0 if reference is None else sum(r["text"] != ref for r, ref in zip(run["results"], reference) if "text" in r)
    tokens = sum(r["tokens"] for r in ok)
    return {"concurrency": level, "requests": len(run["results"]), "errors": len(errors), "mixed_up": mixed,
            "error_examples": errors[:3], "wall_s": run["wall"], "requests_per_s": len(ok) / run["wall"],
            "tokens_per_s": tokens / run["wall"], "ttft_s": percentiles([r["ttft"] for r in ok]),
            "tpot_ms": {k: v and v * 1e3 for k, v in percentiles([r["tpot"] for r in ok]).items()}}


def engine_alone(ckpt: Path, questions: list[str], max_tokens: int) -> tuple[float, list[str]]:
    """Tokens/s of generate() itself, the same greedy replies one after another, and their text."""
    raw = load_checkpoint(ckpt)
    model, tokenizer = build_model(raw), build_tokenizer(raw)
    texts, tokens = [], 0
    pin(MODEL_CPU)  # where the server's model runs (idle now)
    try:
        start = time.perf_counter()
        for q in questions:
            ids, _ = render(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True)
            out = [t.item() for t in generate(model, torch.tensor([ids]), max_tokens, temperature=0)]
            tokens += len(out)
            stream = StreamDecoder(tokenizer)  # sample.py's text (tokenizer.decode differs on invalid UTF-8)
            texts.append("".join(stream.push(t) for t in out) + stream.flush())
        return tokens / (time.perf_counter() - start), texts
    finally:
        pin(CLIENT_CPU)


def main():
    args = parse_args()
    torch.set_num_threads(1)
    pin(CLIENT_CPU)
    questions = [f"{i}번 질문입니다. 한국의 {TOPICS[i % len(TOPICS)]}에 대해 알려 주세요." for i in range(args.prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else make_checkpoint(args, Path(tmp) / "chat.pt")
        port = free_port()
        proc, startup = start_server(ckpt, port, max(args.levels) + 8, args.compile)
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(run_level(url, questions[:2], 1, args.max_tokens, args.timeout))  # first-request costs
            engine_before, engine_texts = engine_alone(ckpt, questions, args.max_tokens)
            levels, reference = [], None
            for c in args.levels:
                run = asyncio.run(run_level(url, questions, c, args.max_tokens, args.timeout))
                levels.append(summarize(c, run, reference))
                if reference is None:
                    reference = [r.get("text") for r in run["results"]]
            engine_after, _ = engine_alone(ckpt, questions, args.max_tokens)
        finally:
            proc.terminate()
            proc.wait(30)
    engine = max(engine_before, engine_after)
    same_as_engine = sum(a == b for a, b in zip(reference, engine_texts))

    print(f"server start-up {startup:.1f} s{' (with compilation)' if args.compile else ''}; {args.prompts} greedy "
          f"streaming chat requests per level, {args.max_tokens} tokens each; engine alone: {engine:.0f} tokens/s "
          f"({engine_before:.0f} before, {engine_after:.0f} after); served-alone replies equal to the engine's: "
          f"{same_as_engine}/{args.prompts}")
    head = (f"{'clients':>7} {'requests':>8} {'errors':>6} {'mixed':>5} {'req/s':>7} {'tok/s':>7} {'vs engine':>9} "
            f"{'TTFT p50/p90/p99 (s)':>22} {'per token p50/p90/p99 (ms)':>27}")
    print(head)
    print("-" * len(head))
    for lv in levels:
        t, p = lv["ttft_s"], lv["tpot_ms"]
        fmt = lambda d, f: "/".join("-" if v is None else format(v, f) for v in d.values())  # noqa: E731
        print(f"{lv['concurrency']:>7} {lv['requests']:>8} {lv['errors']:>6} {lv['mixed_up']:>5} "
              f"{lv['requests_per_s']:>7.2f} {lv['tokens_per_s']:>7.0f} {lv['tokens_per_s'] / engine:>8.2f}x "
              f"{fmt(t, '.2f'):>22} {fmt(p, '.1f'):>27}")
    for lv in levels:
        if lv["errors"]:
            print(f"errors at {lv['concurrency']} clients, e.g.: {lv['error_examples']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "startup_s": startup,
                               "engine_tokens_per_s": engine, "served_alone_equal_engine": same_as_engine,
                               "torch": torch.__version__, "cpus": os.cpu_count(), "levels": levels}, indent=2) + "\n")
    print(f"wrote {out}")
    if any(lv["errors"] or lv["mixed_up"] for lv in levels) or same_as_engine < args.prompts:
        sys.exit(1)


if __name__ == "__main__":
    main()
