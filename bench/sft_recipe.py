"""The SFT recipe's defaults, chosen by measurement: learning rate (as a fraction of pretraining's peaks)
and epochs, by the loss on held-out assistant tokens of conversations never trained on.

    python bench/sft_recipe.py                                  # base model, then the 4 x 3 sweep
    python bench/sft_recipe.py --scales 0.1,0.3 --epochs 1,2    # a part of it

1. A base model is pretrained with train.py on the shared Korean corpus (prepared once with a 4,096-piece
   BPE and the validation file held out, as bench/recipe_quality.py does with 8,192), nanokor's default
   recipe at a small shape (the quickstart's: 4 layers, d_model 128, 4 heads, d_ff 384; 256-token rows,
   batch 16) for --base-tokens tokens.
2. A SYNTHETIC Korean SFT set is built from the corpus's real text, since the 80 shipped conversations are
   too few to measure on: passages of consecutive sentences with tasks whose answer is in the text --
   "continue this passage" (the next sentence), "copy the first sentence", "copy the last sentence", and
   a two-turn "continue, then one sentence more". Training conversations come from the corpus's train
   files, held-out ones from its validation file, which neither the base model nor SFT ever sees.
   It measures how well SFT teaches a format and its stop (<|im_end|>) and keeps the base model's
   Korean, not what a real instruction set teaches; it is labelled synthetic wherever it is quoted.
3. prepare.py --chat writes it as chat shards (the held-out file via --val-files), and train.py runs
   SFT from the base checkpoint (--init_from) for every learning-rate scale x epoch count: AdamW head,
   Muon matrices and the embedding at `scale` x their pretraining peaks, a short warmup, then a linear
   decay to 0 over the run (wsd, decay_frac 1). Each run is scored once at its end on every held-out
   conversation: loss and bits per byte over assistant tokens only. The base model before SFT is scored
   the same way.

Runs go two at a time, each pinned to its own core with one thread. Runs are kept in --work and not
repeated. Prints a table and writes bench/results/sft_recipe.json.
"""

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

from nanokor.atomic import atomic_write
from pinned import cached, run_all, run_pinned, save

REPO = Path(__file__).resolve().parents[1]
SHAPE = ["--n_layer=4", "--d_model=128", "--n_head=4", "--d_ff=384", "--block_size=256", "--batch_size=16",
         "--grad_accum=1", "--device=cpu", "--dtype=fp32", "--compile=false", "--dropout=0", "--keep_best=0",
         "--wandb_mode=disabled",
         "--qk_norm=false", "--beta1=0.9", "--eps=1e-8"]  # the defaults before recipe v2, as measured (README)
# nanokor's default recipe (bench/recipe_quality.py's "muon"): the head's Noam peak 0.679 / sqrt(128 * 50) =
# 8.5e-3, Muon 0.02, the embedding 0.2.
PRETRAIN = ["--optimizer=muon", "--schedule=noam", "--warmup_steps=50", "--lr_factor=0.679", "--cooldown_frac=0.4",
            "--muon_lr=0.02", "--embed_lr=0.2", "--weight_decay=0.1", "--sample_tokens=0", "--eval_tokens=1048576"]
HEAD_PEAK, MUON_PEAK, EMBED_PEAK = 0.679 / math.sqrt(128 * 50), 0.02, 0.2
VOCAB = 4096
ROWS_PER_STEP = 16
SENTENCE = re.compile(r"(?<=[가-힣][.!?])\s+|\n")  # after a Hangul syllable's full stop, or a line break
TASKS = ("continue", "first", "last", "two-turn")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="../shared/data/korean_corpus",
                   help="train-*.parquet and validation-*.parquet, relative to the repository root unless absolute")
    p.add_argument("--base-tokens", type=float, default=1e6, help="pretraining tokens of the base model")
    p.add_argument("--train-conversations", type=int, default=500)
    p.add_argument("--scales", default="0.03,0.1,0.3,1", help="SFT peaks as fractions of pretraining's")
    p.add_argument("--epochs", default="1,2,3")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--cores", default="0,1",
                   help="one run per core, at the same time; 'any,any' runs two unpinned (a machine others share)")
    p.add_argument("--work", default="bench/results/sft_runs")
    p.add_argument("--out", default="bench/results/sft_recipe.json")
    return p.parse_args()


def sentences(doc: str) -> list[str | None]:
    """The document's sentences in order; None for one shorter than 10 or longer than 160 characters, which
    no window takes."""
    return [s if 10 <= len(s) <= 160 else None for s in (s.strip() for s in SENTENCE.split(doc)) if s]


def conversations(docs: list[str], n: int, rng: random.Random, per_doc: int) -> list[dict]:
    """Up to n synthetic conversations, tasks in turn, from up to per_doc windows of five consecutive
    sentences (not overlapping) of each document."""
    out, task = [], 0
    for doc in docs:
        sents = sentences(doc)
        windows = [i for i in range(0, len(sents) - 4, 5) if all(sents[i:i + 5])]
        for i in rng.sample(windows, min(per_doc, len(windows))):
            passage, after = sents[i:i + 3], sents[i + 3:i + 5]
            kind = TASKS[task % len(TASKS)]
            task += 1
            text = " ".join(passage)
            if kind == "continue":
                messages = [("user", f"다음 글에 이어질 문장을 한 문장 써 주세요.\n\n{text}"), ("assistant", after[0])]
            elif kind == "first":
                messages = [("user", f"다음 글의 첫 문장을 그대로 옮겨 주세요.\n\n{text}"), ("assistant", passage[0])]
            elif kind == "last":
                messages = [("user", f"다음 글의 마지막 문장을 그대로 옮겨 주세요.\n\n{text}"), ("assistant", passage[-1])]
            else:
                messages = [("user", f"다음 글을 이어서 써 주세요.\n\n{text}"), ("assistant", after[0]),
                            ("user", "한 문장만 더 써 주세요."), ("assistant", after[1])]
            out.append({"messages": [{"role": r, "content": c} for r, c in messages], "task": kind})
            if len(out) == n:
                return out
    return out


def build_sft_set(corpus: Path, work: Path, n_train: int, seed: int) -> tuple[Path, Path]:
    import pyarrow.parquet as pq

    train_file, val_file = work / "sft-train.jsonl", work / "sft-val.jsonl"
    if train_file.is_file() and val_file.is_file():
        return train_file, val_file
    rng = random.Random(seed)
    # SFT's training passages come from the last train file, read from its end; the held-out ones from the
    # validation file, which neither pretraining nor SFT reads.
    train_docs = pq.read_table(sorted(corpus.glob("train-*.parquet"))[-1]).column("text").to_pylist()[::-1]
    val_docs = pq.read_table(sorted(corpus.glob("validation-*.parquet"))[0]).column("text").to_pylist()
    work.mkdir(parents=True, exist_ok=True)
    for path, convs in ((train_file, conversations(train_docs, n_train, rng, 2)),
                        (val_file, conversations(val_docs, 10 ** 6, rng, 4))):
        atomic_write(path, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs).encode())
    return train_file, val_file


def final_eval(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_time" in r]
    val = [r for r in records if "val_loss" in r][-1]
    return {"steps": len(steps), "val_loss": val["val_loss"], "val_bpb": val["val_bpb"],
            "final_train_loss": steps[-1]["loss"], "train_seconds": sum(r["step_time"] for r in steps)}


def sft_job(args, scale: float, epochs: int, rows: int, chat_dir: Path, base: Path) -> dict:
    steps = max(1, math.ceil(epochs * rows / ROWS_PER_STEP))
    flags = [*SHAPE, f"--data_dir={chat_dir}", f"--init_from={base}", f"--seed={args.seed}", f"--max_steps={steps}",
             f"--eval_interval={steps}", "--eval_tokens=1073741824", "--sample_tokens=0", "--optimizer=muon",
             "--schedule=wsd", "--decay_frac=1.0", "--min_lr=0", f"--warmup_steps={max(1, steps // 20)}",
             f"--lr={scale * HEAD_PEAK:.6g}", f"--muon_lr={scale * MUON_PEAK:.6g}", f"--embed_lr={scale * EMBED_PEAK:.6g}",
             "--weight_decay=0"]
    return {"scale": scale, "epochs": epochs, "steps": steps, "flags": flags,
            "dir": Path(args.work) / f"sft-x{scale:g}-e{epochs}"}


def train(job: dict, core: str) -> dict:
    out = job["dir"]
    if (result := cached(out, job["flags"])) is not None:
        return result
    t0 = time.time()
    run_pinned([sys.executable, "train.py", *job["flags"], f"--out_dir={out}"], core)
    result = {**{k: v for k, v in job.items() if k != "dir"}, **final_eval(out), "wall_seconds": time.time() - t0}
    save(out, result)
    print(f"  x{job['scale']:<5g} {job['epochs']} epoch(s), {job['steps']} steps: held-out loss {result['val_loss']:.4f}, "
          f"bpb {result['val_bpb']:.4f}", flush=True)
    return result


def score_base(base: Path, chat_dir: Path) -> dict:
    """The base model before SFT, on the same held-out assistant tokens."""
    sys.path.insert(0, str(REPO))
    from nanokor.checkpoint import build_model, load_checkpoint
    from nanokor.evaluate import evaluate_loss
    from nanokor.loader import ChatValBatches
    from nanokor.shards import DataDir

    import torch

    data = DataDir(chat_dir)
    model = build_model(load_checkpoint(base))
    val = ChatValBatches(data, 256, 16, None)
    try:
        result = evaluate_loss(model, val, torch.as_tensor(data.tokenizer.token_bytes))
    finally:
        val.close()
    return {"val_loss": result["loss"], "val_bpb": result["bpb"], "tokens": result["tokens"]}


def main():
    args = parse_args()
    corpus = Path(args.corpus) if Path(args.corpus).is_absolute() else REPO / args.corpus
    work, cores = REPO / args.work, args.cores.split(",")
    base_data, base_dir = REPO / "data/bench-sft", work / "base"
    if not (base_data / "meta.json").is_file():
        run_pinned([sys.executable, "prepare.py", "--data-files", str(corpus / "train-*.parquet"), "--val-files",
                    str(corpus / "validation-*.parquet"), "--vocab-size", str(VOCAB), "--out", str(base_data)])
    base_steps = round(args.base_tokens / (16 * 256))
    base_flags = [*SHAPE, *PRETRAIN, f"--data_dir={base_data}", f"--seed={args.seed}", f"--max_steps={base_steps}",
                  f"--eval_interval={base_steps}"]
    if (pretrained := cached(base_dir, base_flags)) is None:
        print(f"base model: {base_steps} steps of 4,096 tokens on {base_data.name}", flush=True)
        run_pinned([sys.executable, "train.py", *base_flags, f"--out_dir={base_dir}"], cores[0])
        save(base_dir, pretrained := {"flags": base_flags, **final_eval(base_dir)})
    base = base_dir / "last.pt"
    print(f"base model: held-out text {pretrained['val_bpb']:.4f} bits per byte", flush=True)

    train_file, val_file = build_sft_set(corpus, work, args.train_conversations, args.seed)
    chat_dir = work / "sft-chat"
    if not (chat_dir / "meta.json").is_file():
        run_pinned([sys.executable, "prepare.py", "--chat", "--data-files", str(train_file), "--val-files", str(val_file),
                    "--tokenizer", str(base_data / "tokenizer.model"), "--context", "256", "--out", str(chat_dir)])
    meta = json.loads((chat_dir / "meta.json").read_text())
    rows = rows_per_epoch(chat_dir)
    print(f"SFT set (synthetic, from the corpus's text): {meta['splits']['train']['conversations']} train / "
          f"{meta['splits']['val']['conversations']} held-out conversations, {meta['left_out']['total']} left out; "
          f"{rows} rows of 257 tokens an epoch", flush=True)

    base_score = score_base(base, chat_dir)
    scales = [float(s) for s in args.scales.split(",")]
    epochs = [int(e) for e in args.epochs.split(",")]
    jobs = [sft_job(args, s, e, rows, chat_dir, base) for e in epochs for s in scales]
    results = run_all(jobs, cores, train)
    print_table(base_score, results, scales, epochs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps({"shape": SHAPE, "pretrain": PRETRAIN, "base_tokens": args.base_tokens,
                                  "peaks": {"head": HEAD_PEAK, "muon": MUON_PEAK, "embed": EMBED_PEAK},
                                  "sft_set": {"synthetic": True, "tasks": TASKS, "splits": meta["splits"],
                                              "rows_per_epoch": rows},
                                  "base": base_score, "runs": results}, indent=2).encode() + b"\n")
    print(f"wrote {out}")


def rows_per_epoch(chat_dir: Path) -> int:
    sys.path.insert(0, str(REPO))
    from nanokor.loader import ChatLoader
    from nanokor.shards import DataDir

    loader = ChatLoader(DataDir(chat_dir), 256, 1)
    try:
        return len(loader._epoch(0))
    finally:
        loader.close()


def print_table(base: dict, results: list[dict], scales: list[float], epochs: list[int]) -> None:
    best = min(results, key=lambda r: r["val_loss"])
    print(f"\nheld-out assistant-token loss (bits per byte) after SFT; base model before SFT: {base['val_loss']:.4f} "
          f"({base['val_bpb']:.4f}) on {base['tokens']:,} tokens")
    print(f"{'lr scale':>8} | " + " | ".join(f"{e} epoch{'s' if e > 1 else ' '}       " for e in epochs))
    print("-" * (11 + 21 * len(epochs)))
    for s in scales:
        cells = []
        for e in epochs:
            r = next(r for r in results if r["scale"] == s and r["epochs"] == e)
            mark = "*" if r is best else " "
            cells.append(f"{r['val_loss']:.4f} ({r['val_bpb']:.3f}){mark}")
        print(f"{s:>8g} | " + " | ".join(cells))
    print(f"(* lowest; lr scale multiplies the pretraining peaks: head {HEAD_PEAK:.2e}, Muon {MUON_PEAK}, "
          f"embedding {EMBED_PEAK})")


if __name__ == "__main__":
    main()
