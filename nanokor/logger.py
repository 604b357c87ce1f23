"""Run logging behind one small interface: `info`, `log`, `step`, `close`.

Rank 0 gets a `Logger`: a tqdm bar (loss, lr, tokens/s), `metrics.jsonl` in the output directory
(one strict-JSON object per line, always written; a non-finite number is written as null) and wandb
when asked for; a resumed run continues the same wandb run, whose id is kept in `wandb_run_id`.
Every other rank gets a `NullLogger`, so the loop never asks "am I rank 0?" before logging.

`read_metrics` is how everything else reads metrics.jsonl back (resume, plots, benchmarks). Lines are
appended, so a kill -9, a full disk or a lost node mid-append leaves a torn last line, possibly cut
inside a Hangul character (invalid UTF-8): it is skipped with a note, never an error, and the complete
lines around it are kept; a resumed run rewrites the file without it before appending.

wandb never stops a run: without the package or an API key it falls back (offline, or off), and an
online start that cannot reach the server within its timeout falls back to offline.
"""

import json
import math
import os
import re
import sys
import uuid
import warnings
from pathlib import Path

from tqdm import tqdm

from nanokor.atomic import atomic_write
from nanokor.errors import ConfigError, TrainingError
from nanokor.rundir import RunDir


class Logger:
    def __init__(self, run: RunDir, cfg, start_step: int, run_config: dict):
        self.path = run.metrics
        _drop_records_after(self.path, start_step)  # a resumed run rewrites the steps it repeats
        try:
            self.file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise TrainingError(f"Cannot write {self.path} ({e.strerror}). Make it a writable file (or remove it), "
                                "or train into another --out_dir.") from None
        self.wandb = start_wandb(run, cfg, run_config, resuming=start_step > 0)
        self.total, self.start_step = cfg.max_steps, start_step
        self.bar = None  # opened at the first step, so the start-up messages print above it

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def info(self, message: str) -> None:
        tqdm.write(message)

    def log(self, record: dict) -> None:
        """One line of metrics.jsonl (and a wandb row): plain numbers and strings, keyed by step."""
        # NaN and Infinity are not JSON: strict readers (jq, JavaScript, most non-Python tools) reject them.
        strict = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.file.write(json.dumps(strict, ensure_ascii=False, allow_nan=False) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def step(self, record: dict) -> None:
        self.log(record)
        if self.bar is None:  # redraw at most once a second on a terminal; in a log file, rarely
            self.bar = tqdm(total=self.total, initial=self.start_step, unit="step", dynamic_ncols=True,
                            mininterval=1.0 if sys.stderr.isatty() else 30.0)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_sec']:,.0f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


class NullLogger:
    """What ranks other than 0 log: nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def info(self, message: str) -> None:
        pass

    def log(self, record: dict) -> None:
        pass

    def step(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def make_logger(run: RunDir, cfg, is_master: bool, start_step: int, run_config: dict):
    return Logger(run, cfg, start_step, run_config) if is_master else NullLogger()


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl (a run's, or a copy of one), in file order. Lines that are not a
    whole JSON object (a torn last line, a damaged one) are skipped with a note on stderr."""
    return [record for _, record in _lines(Path(path).read_bytes(), path) if record is not None]


def _drop_records_after(path: Path, step: int) -> None:
    """Keep the records up to `step`, each line as it was; torn or damaged lines go too, and the file
    ends in a newline again, so the next record starts a line of its own."""
    if not path.is_file():
        return
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TrainingError(f"Cannot read {path} ({e.strerror}). Make it a readable file, or move it aside to "
                            "start the log afresh.") from None
    kept = b"".join(raw for raw, record in _lines(data, path)
                    if record is not None and _step(record) is not None and _step(record) <= step)
    if kept != data:
        atomic_write(path, kept)


def _lines(data: bytes, path) -> list[tuple[bytes, dict | None]]:
    """Each non-blank line as (its bytes with one newline, its record or None where the line is not a
    whole JSON object). Split as bytes, so a cut through a multi-byte character spoils that line alone;
    a note says how many lines could not be read, and whether the last was torn."""
    lines = [(raw.rstrip(b"\r\n") + b"\n", _parse_record(raw)) for raw in data.splitlines(keepends=True)
             if raw.strip()]
    bad = [i for i, (_, record) in enumerate(lines) if record is None]
    if bad:
        torn = ", the last one torn (a write cut short, as by kill -9)" if bad[-1] == len(lines) - 1 else ""
        print(f"note: skipped {len(bad)} unreadable line(s) of {path}{torn}.", file=sys.stderr)
    return lines


def _step(record: dict) -> int | float | None:
    step = record.get("step", 0)
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else None


def _parse_record(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError and JSONDecodeError alike
        return None
    return record if isinstance(record, dict) else None


def start_wandb(run: RunDir, cfg, run_config: dict, resuming: bool = False):
    """A wandb run, or None. auto = online when an API key is configured, else offline; the WANDB_MODE
    environment variable decides for auto when it is set. A resumed run logs into the run it continues."""
    mode = cfg.wandb_mode
    if mode == "auto" and os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        mode = os.environ["WANDB_MODE"]
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        if mode == "auto":
            warnings.warn("wandb_mode=auto: wandb is not installed, so this run logs to metrics.jsonl only.")
            return None
        raise ConfigError(f"wandb_mode={mode} needs the wandb package: `pip install wandb`, or pass "
                          "--wandb_mode=disabled (metrics.jsonl is written either way).") from None
    if mode in ("auto", "online") and not wandb.login(prompt=False, verify=False):
        if mode == "online":  # without a key wandb would prompt, and a prompt in a training job is a hang
            warnings.warn("wandb_mode=online but no W&B API key is configured (`wandb login` or WANDB_API_KEY); "
                          "logging offline instead. Upload later with `wandb sync`.")
        mode = "offline"
    elif mode == "auto":
        mode = "online"
    run_id = wandb_run_id(run, resuming)
    for attempt in ([mode, "offline"] if mode == "online" else [mode]):
        try:
            return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=run_config,
                              dir=str(run), mode=attempt, id=run_id, resume="allow",
                              settings=wandb.Settings(init_timeout=30))
        except Exception as e:  # network and service errors come in many types; none may end the run
            warnings.warn(f"wandb could not start in {attempt} mode ({type(e).__name__}: {e}).")
    return None


def wandb_run_id(run: RunDir, resuming: bool) -> str:
    """The wandb id of the run: the saved one when resuming, else a fresh one, saved."""
    path = run.wandb_id
    if resuming and path.is_file():
        saved = path.read_bytes().decode("utf-8", "replace").strip()
        if re.fullmatch(r"[\w-]{1,64}", saved):
            return saved
        warnings.warn(f"{path} does not hold a wandb run id ({saved[:40]!r}); this run logs to a new wandb run.")
    run_id = uuid.uuid4().hex[:12]
    atomic_write(path, (run_id + "\n").encode())
    return run_id
