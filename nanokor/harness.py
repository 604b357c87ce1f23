"""lm-evaluation-harness tasks on a nanokor checkpoint (`python -m nanokor.evaluate --tasks ...`).

The checkpoint is exported to a temporary Hugging Face directory (nanokor/export.py) and scored by
lm-eval's own `hf` model through its Python API, so the numbers are lm-eval's. lm-eval is imported
only here, on the `--tasks` path (`pip install -e '.[eval]'`).

    python -m nanokor.evaluate --ckpt out/last.pt --tasks kobest_copa,haerae --limit 100
    python -m nanokor.evaluate --ckpt out-sft/last.pt --tasks kobest_copa --chat   # prompts as conversations

With --chat, lm-eval puts each prompt (and few-shot examples, as earlier turns) into a conversation and
renders it with the export's chat template (its `apply_chat_template`), which is nanokor's chat format:
the model answers as it does in chat.py.
"""

import json
import math
import re
import sys
import tempfile
from pathlib import Path

from nanokor.atomic import atomic_write
from nanokor.checkpoint import load_checkpoint
from nanokor.errors import EvalError
from nanokor.export import export


def run(args) -> int:
    lm_eval = _import_lm_eval()
    ckpt = load_checkpoint(args.ckpt)
    manager = _task_manager(args.tasks, args.include_path)
    out = Path(args.out) if args.out else Path(args.ckpt).with_name(f"lm-eval-{_file_name(args.tasks)}.json")
    dtype = str(args.dtype).removeprefix("torch.")
    if args.chat and not ckpt.get("chat", False):
        print(f"warning: {args.ckpt} is a base model, not fine-tuned to chat: --chat scores it on a format it never "
              "learned (a baseline for the chat model, not a measure of the base model).", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="nanokor-lm-eval-") as hf_dir:
        export(ckpt, hf_dir, chat=True if args.chat else None)  # --chat needs the template, base model or not
        model = _model(hf_dir, batch_size=args.batch_size, device=str(args.device), dtype=dtype,
                       max_length=ckpt["model_config"]["max_seq_len"])
        try:
            results = lm_eval.simple_evaluate(model=model, tasks=args.tasks, num_fewshot=args.num_fewshot,
                                              limit=args.limit, task_manager=manager, log_samples=False,
                                              apply_chat_template=args.chat, system_instruction=args.system)
        # `datasets` raises ConnectionError for a data set it can neither fetch nor find cached, and a
        # FileNotFoundError for one that does not exist (on the Hub or on disk).
        except (ConnectionError, FileNotFoundError) as e:
            raise EvalError(
                f"lm-eval could not get the data of {', '.join(args.tasks)} ({e}). Its tasks download their "
                "data sets from the Hugging Face Hub on first use and cache them: run once where the Hub is "
                "reachable (HF_HUB_OFFLINE and HF_DATASETS_OFFLINE unset), or define a task on local data and "
                "pass its directory with --include-path.") from None
    report = {"checkpoint": str(args.ckpt), "tasks": args.tasks, "include_path": args.include_path,
              "num_fewshot": args.num_fewshot, "limit": args.limit, "chat": args.chat, "system": args.system,
              "dtype": dtype,
              "lm_eval_version": lm_eval.__version__,
              **{k: results.get(k) for k in ("results", "groups", "n-shot", "n-samples", "versions")}}
    print(table(results["results"]))  # first: a long run's results are on screen even if the file fails
    try:
        atomic_write(out, (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    except OSError as e:
        raise EvalError(f"Cannot write the results to {out} ({e.strerror}). Pass a writable path with --out.") from None
    print(f"wrote {out}")
    return 0


def _import_lm_eval():
    try:
        import lm_eval
    except ImportError as e:
        raise EvalError(f"--tasks runs lm-evaluation-harness, which is not installed ({e}). Install it with "
                        "`pip install -e '.[eval]'` (lm-eval and accelerate).") from None
    return lm_eval


def _task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's task index, with unknown names refused before any slow work. Tasks that all come from
    --include-path are looked up there alone: indexing lm-eval's ~14,000 built-in task configs takes
    15 s on two cores."""
    from lm_eval.tasks import TaskManager

    if include_path:
        if not Path(include_path).is_dir():
            raise EvalError(f"--include-path {include_path} is not a directory; pass the directory that holds "
                            "your task YAML files.")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks and not Path(task).is_file()]
    if unknown:
        raise EvalError(f"Unknown lm-eval task {', '.join(unknown)}. lm-eval's Korean tasks include kobest "
                        "(kobest_boolq, kobest_copa, kobest_hellaswag, kobest_sentineg, kobest_wic), haerae, "
                        "kmmlu, click, kormedmcqa, kbl and belebele_kor_Hang; `lm-eval ls tasks` lists them all. "
                        "A task of your own: its YAML's directory with --include-path.")
    return manager


def _model(hf_dir: str, **kwargs):
    """lm-eval's `hf` model on the export, with BOS handled as nanokor trains: each document starts with
    one <s>."""
    from lm_eval.models.huggingface import HFLM

    class NanokorLM(HFLM):
        # The exported tokenizer begins every text with <s>. That is right for lm-eval's loglikelihood
        # (the context is encoded with it, the continuation is the rest) and generation. Rolling windows
        # (perplexity tasks) also put prefix_token_id (<s>) in front of the text, which would score a
        # spurious <s> after <s>: encode the text without its own there.
        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            own, self.add_bos_token = self.add_bos_token, False
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            finally:
                self.add_bos_token = own

    return NanokorLM(pretrained=hf_dir, **kwargs)


def table(results: dict) -> str:
    """task | metric | value | stderr, from simple_evaluate's per-task results."""
    rows = [("task", "metric", "value", "stderr")]
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr"):  # not a metric (alias, sample_len), or a metric's stderr
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append((metrics.get("alias", task), metric if filt == "none" else f"{metric} ({filt})",
                         _number(value), _number(stderr)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))).rstrip() for row in rows)


def _number(value) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4f}"
    return "" if value in (None, "N/A") else str(value)


def _file_name(tasks: list[str]) -> str:
    """The default results name: the tasks joined by '+' (file-name safe, and shortened when many)."""
    name = re.sub(r"[^\w.+-]", "_", "+".join(tasks))
    return name if len(name) <= 80 else f"{name[:60]}+{len(tasks)}-tasks"
