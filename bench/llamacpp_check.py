"""llama.cpp against nanokor on one checkpoint and its GGUF files (bench/llamacpp_check.sh runs it).

    python bench/llamacpp_check.py --bin BUILD/bin --ckpt out/last.pt --text corpus.txt \
        --gguf "nanokor --gguf, f32=gguf/model-f32.gguf" --gguf "convert_hf_to_gguf.py, f32=conv.gguf"

For each GGUF:
  - tokenization: every non-empty line of the embedded sample through llama-tokenize (BOS added, as for a
    prompt) against BOS + nanokor's encode; then the whole --text file;
  - greedy: llama-completion --temp 0 against sample.py --temperature 0, on a few Korean prompts;
  - sampling defaults: the sampler parameters llama-completion takes from the GGUF when given none;
  - perplexity: llama-perplexity -c <block_size> on --text against nanokor's loss on the same windows.
    llama-perplexity tokenizes the file (one trailing newline dropped) with BOS in front, cuts it into
    len // n_ctx windows of n_ctx tokens, puts BOS in each window's first slot, and scores the
    predictions of positions n_ctx/2 .. n_ctx-2 (the second half, minus the last position, whose
    target lies in the next window). `perplexity_windows` builds those windows and targets, and
    nanokor.evaluate.evaluate_loss scores them.

For each chat GGUF (--chat-gguf, of --chat-ckpt), llama-server --jinja renders the GGUF's own chat
template for Korean conversations (with and without a system message, one and several turns):
  - the prompt: /apply-template's text, tokenized as the chat endpoint tokenizes it (BOS added, special
    tokens parsed), against nanokor's render(); a doubled BOS would show here;
  - the reply: /v1/chat/completions at temperature 0 against nanokor's greedy reply to the same ids
    (chat.py's, checked for the one-turn conversation), text and where it ended (<|im_end|> or the limit).
"""

import argparse
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from nanokor.chat_format import REPLY_STOP_IDS, render
from nanokor.checkpoint import build_model, build_tokenizer, load_checkpoint
from nanokor.generate import generate
from nanokor.corpus import SAMPLE_DIR
from nanokor.evaluate import evaluate_loss

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["한국의 역사는", "대한민국의 역사는", "세종대왕은", "물은 섭씨 100도에서", "수학에서 함수란"]
SYSTEM = {"role": "system", "content": "당신은 친절한 한국어 조수입니다."}
CONVERSATIONS = [
    [{"role": "user", "content": "한국의 수도는 어디인가요?"}],
    [SYSTEM, {"role": "user", "content": "세종대왕은 무엇을 만들었나요?"}],
    [SYSTEM, {"role": "user", "content": "안녕하세요!"}, {"role": "assistant", "content": "안녕하세요! 무엇을 도와드릴까요?"},
     {"role": "user", "content": "김치는 어떻게 만드나요?"}],
    [{"role": "user", "content": "물은 몇 도에서 끓나요?"}, {"role": "assistant", "content": "섭씨 100도에서 끓습니다."},
     {"role": "user", "content": "그럼 얼음은\n언제 녹나요?"}],
]
NO_ESCAPES = "--no-escape"  # llama.cpp turns "\n" etc. typed in a prompt into control characters by default


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", type=Path, required=True, help="llama.cpp's build/bin")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--gguf", action="append", required=True, help="'label=path', repeatable")
    p.add_argument("--chat-ckpt", help="a chat checkpoint, for the --chat-gguf files")
    p.add_argument("--chat-gguf", action="append", default=[], help="'label=path' of --chat-ckpt, repeatable")
    p.add_argument("--text", type=Path, required=True, help="text file for the perplexity check")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/llamacpp_check.json")
    return p.parse_args()


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace", **kw)  # a cut-off UTF-8 tail
    if proc.returncode:
        sys.exit(f"{' '.join(map(str, cmd[:3]))} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


RETRIES = {"runs": 0, "repeated": 0}


def run_logged(cmd: list, last_line: str) -> subprocess.CompletedProcess:
    """Run a llama.cpp tool whose output goes through its logger. The logger is a thread that llama.cpp
    leaks on purpose (its issue 22142), so a process can exit before the thread writes the last lines,
    text included (a few runs in a hundred here). A run whose log lacks `last_line` is repeated."""
    for _ in range(5):
        proc = run(cmd)
        RETRIES["runs"] += 1
        if last_line in proc.stderr:
            return proc
        RETRIES["repeated"] += 1
    sys.exit(f"{cmd[0]} never printed {last_line!r}:\n{proc.stderr[-3000:]}")


def llama_ids(args, gguf: Path, *source: str) -> list[int]:
    out = run([args.bin / "llama-tokenize", "-m", gguf, *source, "--ids", "--log-disable", NO_ESCAPES]).stdout
    return json.loads(out.strip().splitlines()[-1])


def sample_lines() -> list[str]:
    return [line for path in sorted(SAMPLE_DIR.glob("*.txt")) for line in path.read_text("utf-8").split("\n") if line]


def check_tokenization(args, gguf, tokenizer) -> dict:
    lines = sample_lines()
    mismatches = [line for line in lines if llama_ids(args, gguf, "-p", line) != [1, *tokenizer.encode(line)]]
    whole = llama_ids(args, gguf, "-f", args.text)  # llama-tokenize reads -f verbatim, trailing newline too
    return {"lines": len(lines), "lines_identical": len(lines) - len(mismatches), "first_mismatches": mismatches[:3],
            "text_file_identical": whole == [1, *tokenizer.encode(args.text.read_text("utf-8"))]}


def llama_complete(args, gguf, prompt: str, *flags) -> subprocess.CompletedProcess:
    cmd = [args.bin / "llama-completion", "-m", gguf, "-p", prompt, "-n", args.new_tokens, "-c", args.n_ctx,
           "-no-cnv", "--no-display-prompt", "--simple-io", "--no-warmup", "-t", args.threads, NO_ESCAPES, *flags]
    return run_logged(cmd, "total time =")  # the performance summary, logged after the text


def nanokor_greedy(args) -> dict:
    """sample.py's greedy continuations, prompt removed."""
    return {prompt: run([sys.executable, REPO / "sample.py", "--ckpt", args.ckpt, "--prompt", prompt, "--device",
                         "cpu", "--temperature", "0", "--max-new-tokens", args.new_tokens]).stdout
            .removeprefix(prompt).rstrip("\n") for prompt in PROMPTS}


def check_greedy(args, gguf, ours: dict) -> dict:
    theirs = {p: llama_complete(args, gguf, p, "--temp", "0").stdout.rstrip("\n") for p in PROMPTS}
    # With no sampling flags llama.cpp takes the GGUF's general.sampling.* values; its log says which.
    log = llama_complete(args, gguf, PROMPTS[0], "-s", "1").stderr
    params = re.search(r"top_k = .*?temp = [\d.]+", log, re.S)
    return {"prompts": len(PROMPTS), "identical": sum(ours[p] == theirs[p] for p in PROMPTS),
            "llama_cpp": theirs, "sampler_defaults": " ".join(params.group(0).split()) if params else None}


def perplexity_windows(tokens: list[int], n_ctx: int, bos: int):
    """(x, y) for llama-perplexity's windows: y is -1 (ignored) outside the scored positions."""
    first = n_ctx // 2
    for start in range(0, len(tokens) // n_ctx * n_ctx, n_ctx):
        x = torch.tensor([bos, *tokens[start + 1:start + n_ctx]])
        y = torch.full((n_ctx,), -1)
        y[first:n_ctx - 1] = torch.tensor(tokens[start + first + 1:start + n_ctx])
        yield x[None], y[None]


def check_perplexity(args, gguf, model, tokenizer, text: str) -> dict:
    n_ctx = args.n_ctx
    log = run_logged([args.bin / "llama-perplexity", "-m", gguf, "-f", args.text, "-c", n_ctx, "-b", n_ctx, "-t",
                      args.threads, NO_ESCAPES], "Final estimate").stderr
    theirs = float(re.search(r"Final estimate: PPL = ([\d.]+)", log).group(1))
    tokens = [tokenizer.bos_id, *tokenizer.encode(text)]
    scored = evaluate_loss(model, perplexity_windows(tokens, n_ctx, tokenizer.bos_id),
                           torch.tensor(tokenizer.token_bytes))
    return {"n_ctx": n_ctx, "windows": len(tokens) // n_ctx, "scored_tokens": scored["tokens"],
            "llama_cpp": theirs, "nanokor": scored["ppl"], "relative_difference": theirs / scored["ppl"] - 1}


def nanokor_chat(args) -> list[dict]:
    """nanokor's greedy reply to each conversation: its rendered ids, the reply and whether <|im_end|> ended it;
    the one-turn conversation's also through chat.py itself."""
    ckpt = load_checkpoint(args.chat_ckpt)
    model, tokenizer = build_model(ckpt), build_tokenizer(ckpt)
    out = []
    for messages in CONVERSATIONS:
        ids = render(tokenizer, messages, add_generation_prompt=True)[0]
        n = min(args.new_tokens, model.config.max_seq_len - len(ids))
        reply = [t.item() for t in generate(model, torch.tensor([ids]), n, temperature=0, stop_ids=REPLY_STOP_IDS)]
        ended = bool(reply) and reply[-1] in REPLY_STOP_IDS
        out.append({"ids": ids, "max_tokens": n, "reply": tokenizer.decode(reply[:-1] if ended else reply),
                    "ended": ended})
    one_turn = CONVERSATIONS[0][0]["content"]
    chat_py = run([sys.executable, REPO / "chat.py", "--ckpt", args.chat_ckpt, "--prompt", one_turn, "--device", "cpu",
                   "--temperature", "0", "--max-new-tokens", out[0]["max_tokens"]]).stdout
    out[0]["chat_py_identical"] = chat_py == out[0]["reply"] + "\n"
    return out


class LlamaServer:
    """llama-server on a free local port, with the GGUF's Jinja chat template, for the length of a `with`."""

    def __init__(self, args, gguf):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([str(c) for c in (
            args.bin / "llama-server", "-m", gguf, "--jinja", "-c", args.n_ctx, "-np", 1, "-t", args.threads,
            "--host", "127.0.0.1", "--port", self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self):
        for _ in range(600):
            try:
                if json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health").read())["status"] == "ok":
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    sys.exit(f"llama-server exited ({self.proc.returncode}):\n{self.proc.stderr.read()[-3000:]}")
            time.sleep(0.2)
        sys.exit("llama-server did not become ready in 2 minutes")

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(request, timeout=600).read())


def check_chat(args, gguf, ours: list[dict]) -> dict:
    rows = []
    with LlamaServer(args, gguf) as server:
        for messages, ref in zip(CONVERSATIONS, ours):
            prompt = server.post("/apply-template", {"messages": messages})["prompt"]
            ids = server.post("/tokenize", {"content": prompt, "add_special": True, "parse_special": True})["tokens"]
            answer = server.post("/v1/chat/completions", {"messages": messages, "temperature": 0,
                                                          "max_tokens": ref["max_tokens"]})
            choice = answer["choices"][0]
            rows.append({"ids_identical": ids == ref["ids"], "bos": ids[:2].count(1),
                         "prompt_tokens": answer["usage"]["prompt_tokens"], "reply": choice["message"]["content"],
                         "reply_identical": choice["message"]["content"] == ref["reply"],
                         "ended": choice["finish_reason"] == "stop"})
    return {"conversations": len(rows), "ids_identical": sum(r["ids_identical"] for r in rows),
            "prompt_tokens_identical": sum(r["prompt_tokens"] == len(ref["ids"]) for r, ref in zip(rows, ours)),
            "doubled_bos": sum(r["bos"] > 1 for r in rows), "replies_identical": sum(r["reply_identical"] for r in rows),
            "ended_alike": sum(r["ended"] == ref["ended"] for r, ref in zip(rows, ours)),
            "ended_at_im_end": sum(r["ended"] for r in rows), "llama_cpp": rows}


def main():
    args = parse_args()
    ckpt = load_checkpoint(args.ckpt)
    model, tokenizer = build_model(ckpt), build_tokenizer(ckpt)
    args.n_ctx = model.config.max_seq_len
    text = args.text.read_text("utf-8").removesuffix("\n")  # as llama-perplexity's -f reads it
    ours = nanokor_greedy(args)
    results = {"ckpt": str(args.ckpt), "model": model.config.architecture(), "nanokor_greedy": ours, "gguf": {},
               "llama_cpp_runs": RETRIES}
    for spec in args.gguf:
        label, path = spec.rsplit("=", 1)
        results["gguf"][label] = {"tokenization": check_tokenization(args, path, tokenizer),
                                  "greedy": check_greedy(args, path, ours),
                                  "perplexity": check_perplexity(args, path, model, tokenizer, text)}
    print("\n| GGUF | sample lines tokenized identically | text file | greedy text identical | "
          "PPL llama.cpp | PPL nanokor | difference |\n|---|---:|---|---:|---:|---:|---:|")
    for label, r in results["gguf"].items():
        t, g, p = r["tokenization"], r["greedy"], r["perplexity"]
        same_file = "identical" if t["text_file_identical"] else "differs"
        print(f"| {label} | {t['lines_identical']}/{t['lines']} | {same_file} | {g['identical']}/{g['prompts']} | "
              f"{p['llama_cpp']:.4f} | {p['nanokor']:.4f} | {100 * p['relative_difference']:+.4f}% |")
    first = next(iter(results["gguf"].values()))
    print(f"\nperplexity: {first['perplexity']['windows']} windows of {first['perplexity']['n_ctx']} tokens, "
          f"{first['perplexity']['scored_tokens']:,} scored; llama.cpp's sampler defaults from the GGUF: "
          f"{first['greedy']['sampler_defaults']}")
    print(f"llama-completion / llama-perplexity runs: {RETRIES['runs']}, repeated for a truncated log: "
          f"{RETRIES['repeated']}")
    if args.chat_gguf:
        chat = nanokor_chat(args)
        results["chat"] = {"ckpt": str(args.chat_ckpt), "nanokor": chat, "gguf": {}}
        for spec in args.chat_gguf:
            label, path = spec.rsplit("=", 1)
            results["chat"]["gguf"][label] = check_chat(args, path, chat)
        print("\n| chat GGUF (llama-server --jinja) | prompts tokenized as render() | doubled BOS | "
              "greedy replies identical | ended alike (<|im_end|> or the limit) |\n|---|---:|---:|---:|---:|")
        for label, r in results["chat"]["gguf"].items():
            n = r["conversations"]
            print(f"| {label} | {r['ids_identical']}/{n} | {r['doubled_bos']}/{n} | {r['replies_identical']}/{n} | "
                  f"{r['ended_alike']}/{n} |")
        print(f"\n{len(CONVERSATIONS)} Korean conversations (system message or not, one to two user turns); nanokor's "
              f"replies ended at <|im_end|>: {sum(c['ended'] for c in chat)}/{len(chat)}; chat.py's one-turn reply "
              f"identical to nanokor's: {chat[0]['chat_py_identical']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
