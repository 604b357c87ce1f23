"""Evaluation: validation loss, perplexity and bits per byte (pure cross-entropy, never smoothed).

Bits per byte divides the summed loss (in bits) by the UTF-8 bytes of the predicted tokens, so models
with different tokenizers compare fairly. Like nanochat, tokens that stand for no text (special and
control ids, byte length 0) are left out of both sums.

The command line scores a checkpoint on any local text, tokenized with the checkpoint's tokenizer, or
runs lm-evaluation-harness tasks on it (nanokor/harness.py):

    python -m nanokor.evaluate --ckpt out/last.pt --data-files 'texts/*.txt' --max-tokens 200000
    python -m nanokor.evaluate --ckpt out/last.pt --tasks kobest_copa,haerae
"""

import argparse
import json
import math
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from nanokor import harness
from nanokor.atomic import atomic_write
from nanokor.checkpoint import build_model, build_tokenizer, load_checkpoint
from nanokor.corpus import normalize, open_corpus
from nanokor.device import DTYPES, resolve_device, resolve_dtype
from nanokor.errors import EvalError, exit_on_error
from nanokor.flags import number, positive_int


@torch.no_grad()
def evaluate_loss(model, batches, token_bytes: torch.Tensor, autocast=nullcontext) -> dict:
    """Mean loss, perplexity and bits per byte over `batches` of (x, y), summed across DDP ranks.

    token_bytes: (vocab,) UTF-8 byte length of each token id, on the same device as the batches.
    """
    was_training = model.training
    model.eval()
    device = token_bytes.device
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # nats, tokens, nats with bytes, bytes
    for x, y in batches:
        with autocast():
            _, loss = model(x, y, reduction="none")
        loss = loss.double()
        valid = y >= 0
        nbytes = token_bytes[y.clamp(min=0)] * valid
        has_bytes = nbytes > 0
        totals += torch.stack([loss[valid].sum(), valid.sum().double(),
                               loss[has_bytes].sum(), nbytes.sum().double()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    model.train(was_training)
    nats, tokens, nats_with_bytes, nbytes = totals.tolist()
    if tokens == 0:
        raise ValueError("No validation tokens were scored; the validation split or token budget is empty.")
    mean = nats / tokens
    return {"loss": mean, "ppl": math.exp(min(mean, 700.0)), "bpb": nats_with_bytes / (math.log(2) * nbytes)
            if nbytes else float("nan"), "tokens": int(tokens), "bytes": int(nbytes)}


# ---- command line ----------------------------------------------------------------------------

def windows(docs, tokenizer, seq_len: int, max_tokens: int | None):
    """(x, y) rows of seq_len from the documents framed as in training (<s> text </s>), laid end to
    end. Consecutive rows share one token, so every token after the first is a target exactly once;
    the last row is padded with ignored targets (-1). Stops once max_tokens targets are taken."""
    buf, budget = [], max_tokens if max_tokens is not None else float("inf")
    for doc in docs:
        buf += [tokenizer.bos_id, *tokenizer.encode(doc), tokenizer.eos_id]
        while len(buf) > seq_len and budget > 0:
            n = min(seq_len, budget)
            yield buf[:n], buf[1:n + 1]
            buf, budget = buf[seq_len:], budget - n
        if budget <= 0:
            return
    if len(buf) > 1 and budget > 0:
        n = min(len(buf) - 1, budget)
        yield buf[:n], buf[1:n + 1]


def batches(rows, batch_size: int, seq_len: int, device, pad_id: int, progress):
    """Stack rows into (B, seq_len) tensors; short rows are padded (inputs with pad, targets with -1)."""
    def flush(chunk):
        x = torch.full((len(chunk), seq_len), pad_id, dtype=torch.long)
        y = torch.full((len(chunk), seq_len), -1, dtype=torch.long)
        for i, (xs, ys) in enumerate(chunk):
            x[i, :len(xs)], y[i, :len(ys)] = torch.tensor(xs), torch.tensor(ys)
        progress.update(sum(len(ys) for _, ys in chunk))
        return x.to(device), y.to(device)

    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == batch_size:
            yield flush(chunk)
            chunk = []
    if chunk:
        yield flush(chunk)


def token_budget(text: str) -> int | None:
    """--max-tokens: a positive count, or 'all' (None)."""
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text.replace(",", "").replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token budget: pass a positive number such as "
                                         "200000, or 'all' to score every token")
    return value


def task_limit(text: str) -> int | float:
    """--limit: a count of examples per task, or a fraction of them below 1."""
    try:
        value = float(text)
    except ValueError:
        value = 0
    if not 0 < value < math.inf:  # nan and inf too
        raise argparse.ArgumentTypeError(f"{text!r} is not a limit: pass a number of examples such as 100, "
                                         "or a fraction such as 0.1")
    return int(value) if value >= 1 else value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanokor.evaluate",
                                description="Loss, perplexity and bits per byte of a checkpoint on any text, "
                                            "or lm-evaluation-harness tasks on it.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py, e.g. out/last.pt")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data-files", nargs="+",
                      help="globs of .txt (blank-line separated documents), .jsonl or .parquet files")
    what.add_argument("--tasks", type=lambda s: [t.strip() for t in s.split(",") if t.strip()],
                      help="lm-eval tasks, comma-separated (e.g. kobest_copa,haerae); needs the eval extra")
    text = p.add_argument_group("text (--data-files)")
    text.add_argument("--text-column", default="text", help="jsonl field / parquet column holding the text")
    text.add_argument("--max-tokens", type=token_budget, default=1_000_000,
                      help="token budget: score at most this many tokens (default 1,000,000), or 'all'")
    text.add_argument("--seq-len", type=positive_int, help="tokens per row (default: the model's max_seq_len)")
    tasks = p.add_argument_group("lm-eval (--tasks)")
    tasks.add_argument("--limit", type=task_limit, help="examples per task (a count, or a fraction below 1)")
    tasks.add_argument("--num-fewshot", type=number(int, 0, text="need 0 or more"),
                       help="few-shot examples (default: each task's own)")
    tasks.add_argument("--include-path", help="a directory of task YAML files of your own, e.g. on local data")
    tasks.add_argument("--chat", action="store_true",
                       help="render each prompt as a conversation in the chat format (lm-eval's apply_chat_template; "
                            "few-shot examples become earlier turns): for chat (SFT) checkpoints")
    tasks.add_argument("--system", help="with --chat: a system message that starts every conversation")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="autocast dtype (lm-eval: the weights' dtype); auto = bfloat16 on GPUs that support "
                        "it, else float32")
    p.add_argument("--out", help="JSON results path (default beside the checkpoint: eval-<data name>.json, "
                                 "or lm-eval-<tasks>.json)")
    args = p.parse_args(argv)
    if args.tasks == []:
        p.error("--tasks needs at least one task name, e.g. --tasks kobest_copa")
    if (args.chat or args.system is not None) and not args.tasks:
        p.error("--chat and --system apply to lm-eval tasks; add --tasks")
    if args.system is not None and not (args.chat and args.system.strip()):
        p.error("--system needs --chat and some text: it is the system message of each conversation")
    try:
        args.device = resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))
    args.dtype = resolve_dtype(args.dtype, args.device)
    return exit_on_error(harness.run if args.tasks else run, args)


def run(args) -> int:
    device, dtype = args.device, args.dtype
    ckpt = load_checkpoint(args.ckpt)
    model, tokenizer = build_model(ckpt).to(device), build_tokenizer(ckpt)
    seq_len = args.seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise EvalError(f"--seq-len {seq_len} exceeds the model's max_seq_len ({model.config.max_seq_len}); "
                        "pass a smaller --seq-len or leave it out.")
    corpus = open_corpus(data_files=args.data_files, text_column=args.text_column)
    out = Path(args.out) if args.out else Path(args.ckpt).with_name(f"eval-{corpus.name}.json")
    docs = (normalize(d) for d in corpus.documents() if d.strip())
    budget = args.max_tokens
    autocast = partial(torch.autocast, device.type, dtype=dtype) if dtype != torch.float32 else nullcontext
    token_bytes = torch.as_tensor(tokenizer.token_bytes, device=device)
    with tqdm(total=budget, unit="tok", unit_scale=True, desc="scoring", dynamic_ncols=True) as progress:
        pairs = windows(docs, tokenizer, seq_len, budget)
        try:
            result = evaluate_loss(model, batches(pairs, args.batch_size, seq_len, device, tokenizer.pad_id,
                                                  progress), token_bytes, autocast)
        except ValueError:  # evaluate_loss: nothing was scored
            raise EvalError(f"{', '.join(args.data_files)} holds no text to score (every document is empty). "
                            f"Check the files, or --text-column (now {args.text_column!r}).") from None

    report = {"checkpoint": str(args.ckpt), "data_files": args.data_files, "files": corpus.info["files"],
              "text_column": args.text_column, **result, "seq_len": seq_len, "max_tokens": budget,
              "tokenizer_sha256": tokenizer.sha256, "dtype": str(dtype).removeprefix("torch."),
              "read_problems": dict(corpus.counts)}
    try:
        atomic_write(out, (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    except OSError as e:
        raise EvalError(f"Cannot write the results to {out} ({e.strerror}). Pass a writable path with --out.") from None
    rows = [("checkpoint", str(args.ckpt)), ("data", f"{', '.join(args.data_files)} ({len(corpus.info['files'])} "
            "files)"), ("tokens scored", f"{result['tokens']:,}"), ("bytes scored", f"{result['bytes']:,}"),
            ("loss (nats/token)", f"{result['loss']:.4f}"), ("perplexity", f"{result['ppl']:.2f}"),
            ("bits per byte", f"{result['bpb']:.4f}")]
    if corpus.counts:  # e.g. a jsonl line cut short: skipped, and said so rather than only in the JSON
        rows.append(("skipped in reading", ", ".join(f"{k} {v:,}" for k, v in sorted(corpus.counts.items()))))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
