"""Generate Korean text from a checkpoint, streamed token by token.

    python sample.py --ckpt out/last.pt
    python sample.py --ckpt out/last.pt --prompt "한국의 역사는" --max-new-tokens 200 --top-p 0.9
    echo "옛날 옛적에" | python sample.py --ckpt out/last.pt --prompt-file -

The checkpoint carries the model config and the tokenizer, so nothing else is needed. Without a
prompt the model starts from BOS alone (unconditional sampling). Notes go to stderr,
the text to stdout.
"""

import argparse
import sys

import torch

from nanokor.checkpoint import build_model, build_tokenizer, load_checkpoint
from nanokor.device import DTYPES, resolve_device, resolve_dtype
from nanokor.errors import PromptError, exit_on_error, exit_streaming
from nanokor.flags import number, positive_int, seed
from nanokor.generate import Decoder, StreamDecoder, encode_prompt, generate, room_to_generate


def add_generation_args(p: argparse.ArgumentParser, max_new_tokens: int = 200) -> None:
    """How text is generated: length, sampling, seed, device and decoding path (chat.py's flags too)."""
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens)
    p.add_argument("--temperature", type=number(float, 0, text="need >= 0 (0 = greedy)"), default=0.8)
    p.add_argument("--top-k", type=number(int, 0, text="need >= 0 (0 = off)"), default=None,
                   help="sample among the k likeliest tokens (0 or unset: all, as in the exported generation_config)")
    p.add_argument("--top-p", type=number(float, 0, 1, low_open=True, text="need 0 < p <= 1"), default=None)
    p.add_argument("--repetition-penalty", type=number(float, 0, low_open=True, text="need > 0 (1 = off)"),
                   default=1.0)
    p.add_argument("--seed", type=seed(64), default=1337)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto = bfloat16 on GPUs that support it, else float32")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--compile", action="store_true",
                     help="decode with a compiled step over a static KV cache: compiling costs ~20 s on a CPU, "
                          "then each token at batch 1 is ~2x faster than eager; worth it for long or many samples")
    how.add_argument("--cuda-graph", action="store_true",
                     help="(CUDA) replay the eager step as a captured CUDA graph: no compilation, no per-op "
                          "Python dispatch")


def resolve_generation_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The device and dtype resolved, args.decode_mode set (a Decoder mode), bad combinations refused."""
    args.top_k = args.top_k or None  # 0 means off, as llama.cpp and transformers read it
    try:
        args.device = resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))
    if args.cuda_graph and args.device.type != "cuda":
        p.error(f"--cuda-graph captures a CUDA graph and needs a CUDA device, not {args.device}; on a CPU use "
                "--compile for the fast path")
    args.dtype = resolve_dtype(args.dtype, args.device)
    args.decode_mode = "compile" if args.compile else "graph" if args.cuda_graph else "eager"
    return args


def sampling_of(args: argparse.Namespace) -> dict:
    """generate()'s sampling keywords from the flags."""
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "repetition_penalty": args.repetition_penalty}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py, e.g. out/last.pt")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text to continue (default: none, sample from BOS)")
    src.add_argument("--prompt-file", help="UTF-8 file holding the prompt, '-' for stdin (trailing newlines dropped)")
    p.add_argument("--num-samples", type=positive_int, default=1)
    add_generation_args(p)
    return resolve_generation_args(p, p.parse_args(argv))


def read_prompt(args) -> str | None:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is None:
        return None
    name = "stdin" if args.prompt_file == "-" else args.prompt_file
    try:
        raw = sys.stdin.buffer.read() if args.prompt_file == "-" else open(args.prompt_file, "rb").read()
    except OSError as e:
        raise PromptError(f"Cannot read the prompt file {name}: {e.strerror}. Check the path given to "
                          "--prompt-file.") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"The prompt in {name} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                          f"{e.start}). Korean text saved by older tools is often CP949/EUC-KR; convert it "
                          f"with `iconv -f cp949 -t utf-8 {name} > prompt.txt` and pass that file.") from None
    return text.removeprefix("\ufeff").rstrip("\n")


def fit_length(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> int:
    """The number of tokens to generate so prompt + generation fits the model's context; says so when
    that is fewer than asked for."""
    n = room_to_generate(prompt_len, max_new_tokens, max_seq_len)
    if n < max_new_tokens:
        print(f"note: generating {n} tokens instead of --max-new-tokens {max_new_tokens}: the prompt "
              f"({prompt_len} tokens) plus the generation must fit the model's context of {max_seq_len}.",
              file=sys.stderr)
    return n


def main(argv=None) -> int:
    """The command: its exit code, with a NanokorError as one paragraph on stderr."""
    return exit_on_error(sample, parse_args(argv))


def sample(args) -> int:
    ckpt = load_checkpoint(args.ckpt)
    model = build_model(ckpt).to(args.device, args.dtype)
    tokenizer = build_tokenizer(ckpt)
    text = read_prompt(args)
    ids = encode_prompt(tokenizer, text)
    max_new = fit_length(len(ids), args.max_new_tokens, model.config.max_seq_len)

    decoder = Decoder(model, args.decode_mode)
    idx = torch.tensor([ids], device=args.device)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    out = sys.stdout
    if hasattr(out, "reconfigure"):  # Korean text is UTF-8 whatever the locale (LANG=C would fail)
        out.reconfigure(encoding="utf-8")
    stream = StreamDecoder(tokenizer)
    for i in range(args.num_samples):
        if i:
            out.write("\n" + "-" * 40 + "\n")
        out.write(text or "")
        tokens = generate(decoder, idx, max_new, **sampling_of(args), stop_ids=tokenizer.eos_id, generator=generator)
        for token in tokens:
            out.write(stream.push(token.item()))
            out.flush()
        out.write(stream.flush() + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(exit_streaming(main))
