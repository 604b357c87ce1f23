"""Benchmark runs side by side, each pinned to its own core with one thread, so that machine noise hits
the runs being compared alike; each run's result cached in its directory, keyed by its flags, so an
interrupted benchmark continues where it stopped. Used by recipe_quality.py and sft_recipe.py."""

import json
import os
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from nanokor.atomic import atomic_write

REPO = Path(__file__).resolve().parents[1]


def run_pinned(cmd: list[str], core: str | None = None) -> subprocess.CompletedProcess:
    """`cmd` in the repository, on one thread, on `core` (None or "any": wherever the OS puts it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = (["taskset", "-c", core] if core and core != "any" else []) + cmd
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def cached(out: Path, flags: list[str]) -> dict | None:
    """The result a run with exactly these flags left in `out`, or None (then `out` is cleared for it)."""
    done = out / "result.json"
    if done.is_file() and json.loads(done.read_text())["flags"] == flags:
        return json.loads(done.read_text())
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return None


def save(out: Path, result: dict) -> None:
    atomic_write(out / "result.json", (json.dumps(result, indent=2) + "\n").encode())  # never torn by a Ctrl-C


def run_all(jobs: list, cores: list[str], train: Callable[[object, str], dict]) -> list[dict]:
    """train(job, core) for the jobs in order, one per core at a time (the pool hands the next job to the
    first free core)."""
    free = list(cores)

    def work(job):
        core = free.pop(0)
        try:
            return train(job, core)
        finally:
            free.append(core)

    with ThreadPoolExecutor(len(cores)) as pool:
        return list(pool.map(work, jobs))
