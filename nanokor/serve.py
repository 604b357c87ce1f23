"""Serve a checkpoint over an OpenAI-compatible HTTP API, with a Korean chat page at /.

    pip install -e ".[serve]"
    python -m nanokor.serve --ckpt out-sft/last.pt                  # http://127.0.0.1:8000/
    python -m nanokor.serve --ckpt out/last.pt --host 0.0.0.0 --port 8080 --api-key SECRET --compile

The model loads (and with --compile, compiles its decoding step) before the server binds, so the port
answers, /health included, only once requests can be served. One thread generates (serve_worker.py);
requests wait in a bounded queue (--max-queue), and a full queue answers 503 at once. The API is in
serve_api.py, the page in nanokor/static/chat.html.
"""

import argparse
import importlib.util
import logging
import os
import sys
import time

from nanokor.checkpoint import build_model, build_tokenizer, load_checkpoint
from nanokor.device import DTYPES, resolve_device, resolve_dtype
from nanokor.errors import ServeError, exit_on_error
from nanokor.export_spec import SAMPLING
from nanokor.generate import Decoder
from nanokor.serve_worker import GenerationWorker

log = logging.getLogger("nanokor.serve")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py, e.g. out-sft/last.pt")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: this machine only; 0.0.0.0 serves the network: set --api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("NANOKOR_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ requests (default: $NANOKOR_API_KEY; none)")
    p.add_argument("--model-name", default="nanokor", help="the model id clients name in requests")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for the generation thread; beyond, 503 at once")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    how = p.add_mutually_exclusive_group()
    how.add_argument("--compile", action="store_true",
                     help="decode with a compiled step (as sample.py --compile), compiled for greedy and the default "
                          "sampling at start-up; other settings compile on first use")
    how.add_argument("--cuda-graph", action="store_true", help="(CUDA) replay the decoding step as a CUDA graph")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    if not 1 <= args.max_queue <= 100_000:
        p.error(f"--max-queue {args.max_queue}: need 1 to 100000")
    try:
        args.device = resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))
    if args.cuda_graph and args.device.type != "cuda":
        p.error(f"--cuda-graph needs a CUDA device, not {args.device}; on a CPU use --compile")
    args.dtype = resolve_dtype(args.dtype, args.device)
    return args


def require_serve_extra() -> None:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ServeError(f"The server needs the 'serve' extra, and {' and '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not installed. Install it with "
                         "`pip install -e \".[serve]\"` (or `pip install fastapi uvicorn`).")


def load_served(ckpt_path, *, device="cpu", dtype=None, mode="eager", max_queue=64, name="nanokor"):
    """The checkpoint's model on `device`, behind a GenerationWorker (not started), as a ServedModel."""
    from nanokor.serve_api import ServedModel

    ckpt = load_checkpoint(ckpt_path)
    model = build_model(ckpt).to(device, dtype)
    tokenizer = build_tokenizer(ckpt)
    worker = GenerationWorker(Decoder(model, mode), tokenizer, max_queue=max_queue)
    return ServedModel(name=name, tokenizer=tokenizer, context=model.config.max_seq_len,
                       chat_trained=ckpt.get("chat") is True, worker=worker, created=int(os.path.getmtime(ckpt_path)))


def warm_up(served) -> None:
    """Compile the decoding step for greedy replies and the default sampling, in every cache bucket, so
    the first requests do not wait for the compiler."""
    samplings = [dict(temperature=0.0), dict(temperature=SAMPLING["temperature"])]
    log.info("compiling the decoding step (greedy and temperature %s, every cache length)...", SAMPLING["temperature"])
    log.info("compiled in %.0f s", served.worker.warm_up(samplings))


def describe(served) -> str:
    if not served.tokenizer.has_chat_tokens:
        return "a base model without chat tokens: /v1/completions only (chat requests get 400)"
    if not served.chat_trained:
        return ("a base model with chat tokens, not chat-trained: chat replies are served, each with the header "
                "X-Nanokor-Warning")
    return "a chat model"


def main(argv=None) -> int:
    args = parse_args(argv)
    require_serve_extra()
    import uvicorn

    from nanokor.serve_api import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    start = time.perf_counter()
    mode = "compile" if args.compile else "graph" if args.cuda_graph else "eager"
    served = load_served(args.ckpt, device=args.device, dtype=args.dtype, mode=mode, max_queue=args.max_queue,
                         name=args.model_name)
    if args.compile:
        warm_up(served)
    log.info("loaded %s in %.1f s: %r is %s", args.ckpt, time.perf_counter() - start, served.name, describe(served))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("serving %s without --api-key: anyone who can reach this address can use the model", args.host)
    log.info("chat page: http://%s:%d/   API: http://%s:%d/v1", args.host, args.port, args.host, args.port)
    uvicorn.run(create_app(served, api_key=args.api_key), host=args.host, port=args.port,
                log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(exit_on_error(main))
    except KeyboardInterrupt:
        sys.exit(130)
