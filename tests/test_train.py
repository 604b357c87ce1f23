"""train.py on CPU, in one process: accumulation, exact resume, best-k, signals, kill -9, non-finite steps,
the tiny config's learning, and wandb's fallbacks. References are independent: a run with one big batch,
an uninterrupted run, the unigram entropy of the training tokens."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nanokor.checkpoint import CheckpointError, build_model, build_tokenizer, load_checkpoint
from nanokor.config import ConfigError, load_config, model_config
from nanokor.distributed import Env
from nanokor.engine import TorchEngine
from nanokor.errors import DataError, TrainingError
from nanokor.loader import TrainLoader
from nanokor.model import Transformer
from nanokor.shards import DataDir, read_shard
from nanokor.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_script", REPO / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

# A model small enough that a step takes milliseconds; eval and sample kept short too. Two settings keep
# runs that differ only in float rounding (another summation order under accumulation or DDP) close in
# weights: a realistic peak learning rate (4.4e-3, the embedding's too: embed_lr=0; far above it training
# is chaotic), and Adam's eps at
# 1e-6, not 1e-8, since g / (|g| + eps) turns rounding noise in near-zero gradient entries (~1e-9, e.g.
# embedding rows of rare tokens) into weight differences of up to lr.
TINY = ["--device=cpu", "--n_layer=2", "--n_head=2", "--d_model=32", "--d_ff=64", "--block_size=32",
        "--batch_size=4", "--eval_tokens=512", "--sample_tokens=4", "--warmup_steps=4", "--lr_factor=0.05",
        "--embed_lr=0", "--eps=1e-6", "--dropout=0", "--wandb_mode=disabled"]


def run(data_dir, out_dir, *args) -> dict:
    return train.main([*TINY, f"--data_dir={data_dir}", f"--out_dir={out_dir}", *args])


def strict_json(line: str):
    """json.loads that refuses NaN and Infinity, as strict JSON readers do."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON: {line}")
    return json.loads(line, parse_constant=refuse)


def train_records(out_dir) -> dict[int, dict]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return {r["step"]: r for r in map(strict_json, lines) if "loss" in r}


def weights(out_dir, name="last.pt") -> dict:
    return load_checkpoint(Path(out_dir) / name)["model"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_four_micro_batches_of_two_give_the_gradient_of_one_batch_of_eight(sample_data_dir):
    """The loop's micro-step, written out: the accumulated gradient is the one-big-batch gradient."""
    cfg = load_config([*TINY, "--label_smoothing=0.1"])
    vocab_size = Tokenizer.load(sample_data_dir / "tokenizer.model").vocab_size
    grads = []
    for cfg.batch_size, cfg.grad_accum in ((2, 4), (8, 1)):
        torch.manual_seed(0)
        model = Transformer(model_config(cfg, vocab_size))
        engine = TorchEngine(model, cfg, Env(0, 0, 1, torch.device("cpu")))
        loader = TrainLoader(DataDir(sample_data_dir), cfg.block_size, cfg.batch_size, seed=cfg.seed)
        for micro in range(cfg.grad_accum):
            x, y = loader.next_batch()
            with engine.grad_sync(last=micro == cfg.grad_accum - 1):
                _, loss = engine.model(x, y, label_smoothing=cfg.label_smoothing)
                engine.backward(loss)
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert max_diff(*grads) <= 1e-6
    assert max(g.abs().max().item() for g in grads[0].values()) > 1e-3  # not trivially zero


def test_accumulation_in_train_py_matches_one_big_batch(sample_data_dir, tmp_path):
    """The same through train.py (loader, schedule, clipping, AdamW) over four steps; gradient
    checkpointing on one side only, since recomputing activations must not change the result."""
    common = ["--max_steps=4", "--label_smoothing=0.1", "--optimizer=adamw"]
    run(sample_data_dir, tmp_path / "accum", "--batch_size=2", "--grad_accum=4", "--gradient_checkpointing", *common)
    run(sample_data_dir, tmp_path / "big", "--batch_size=8", "--grad_accum=1", *common)
    accum, big = train_records(tmp_path / "accum"), train_records(tmp_path / "big")
    for step in range(1, 5):  # Adam would hide a gradient scale error from the weights; the norm shows it
        assert accum[step]["loss"] == pytest.approx(big[step]["loss"], abs=1e-6)
        assert accum[step]["grad_norm"] == pytest.approx(big[step]["grad_norm"], rel=1e-5)
        assert accum[step]["tokens_seen"] == big[step]["tokens_seen"] == step * 8 * 32
    assert max_diff(weights(tmp_path / "accum"), weights(tmp_path / "big")) <= 1e-5


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bit_identical_and_keeps_the_best_k(sample_data_dir, tmp_path, optimizer):
    # Dropout makes the RNG state matter; eval every 2 steps gives several best-k candidates. The split
    # run first stops at max_steps=4, where a cooldown would already decay, so Noam runs without one.
    common = ["--dropout=0.1", "--eval_interval=2", "--keep_best=2", f"--optimizer={optimizer}", "--cooldown_frac=0"]
    run(sample_data_dir, tmp_path / "straight", "--max_steps=8", *common)
    run(sample_data_dir, tmp_path / "split", "--max_steps=4", *common)
    summary = run(sample_data_dir, tmp_path / "split", "--max_steps=8", "--init_from=resume", *common)
    assert summary["step"] == 8

    straight, split = train_records(tmp_path / "straight"), train_records(tmp_path / "split")
    assert sorted(split) == list(range(1, 9))  # the resumed run appended; nothing repeated or missing
    assert [straight[s]["loss"] for s in range(1, 9)] == [split[s]["loss"] for s in range(1, 9)]
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("straight", "split"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert sorted(a["optimizer"]) == sorted(b["optimizer"]) == sorted({"adamw", optimizer})
    for name in a["optimizer"]:  # Adam's moments, Muon's momentum buffers
        states = a["optimizer"][name]["state"].values(), b["optimizer"][name]["state"].values()
        for sa, sb in zip(*states):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (b["step"], b["tokens_seen"], b["loader"]) == (a["step"], a["tokens_seen"], a["loader"])

    # Best-k: the two lowest validation losses of steps 2, 4, 6, 8, as files and in best.json.
    lines = (tmp_path / "split" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    val = {r["step"]: r["val_loss"] for r in map(json.loads, lines) if "val_loss" in r}
    assert sorted(val) == [2, 4, 6, 8]
    expected = sorted(val, key=val.get)[:2]
    listed = json.loads((tmp_path / "split" / "best.json").read_text())
    assert [e["step"] for e in listed] == expected
    kept = sorted(p.name for p in (tmp_path / "split").glob("best-*.pt"))
    assert kept == sorted(f"best-{s:07d}.pt" for s in expected)
    assert b["best"] == listed and b["val"]["step"] == 8 and b["val"]["loss"] == pytest.approx(val[8])


def test_checkpoint_is_complete_for_sample_py(sample_data_dir, tmp_path):
    """The one compiled run, in bf16 autocast: last.pt must hold clean keys (no `_orig_mod.`), fp32 master
    weights, and everything sample.py reads."""
    run(sample_data_dir, tmp_path, "--max_steps=2", "--compile", "--dtype=bf16")
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    assert {t.dtype for t in ckpt["model"].values()} == {torch.float32}
    assert {"model_config", "model", "tokenizer", "train_config", "step", "tokens_seen", "optimizer", "loader",
            "rng", "best", "val"} <= ckpt.keys()
    assert ckpt["train_config"]["compile"] is True and ckpt["chat"] is False  # a base model, not a chat model
    model, tokenizer = build_model(ckpt), build_tokenizer(ckpt)
    assert tokenizer.sha256 == build_tokenizer({"tokenizer": (sample_data_dir / "tokenizer.model").read_bytes()}).sha256
    idx = torch.tensor([[tokenizer.bos_id] + tokenizer.encode("한국어")])
    assert model(idx)[0].shape == (1, idx.size(1), tokenizer.vocab_size)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "step_time", "mem_gb"} <= records[0].keys()
    assert any("val_bpb" in r for r in records) and any(isinstance(r.get("sample"), str) for r in records)
    assert json.loads((tmp_path / "config.json").read_text())["max_steps"] == 2


def test_non_finite_steps_are_skipped_then_the_run_aborts(sample_data_dir, tmp_path):
    run(sample_data_dir, tmp_path, "--max_steps=2")
    good = weights(tmp_path)
    # An absurd learning rate: step 3's update wrecks the weights, every later loss is NaN.
    with pytest.raises(TrainingError, match="3 consecutive steps .* last good checkpoint"):
        run(sample_data_dir, tmp_path, "--max_steps=50", "--eval_interval=2", "--init_from=resume",
            "--lr_factor=1e30", "--max_nonfinite=3")
    records = train_records(tmp_path)
    assert max(records) == 6 and records[6]["nonfinite_total"] == 3
    assert records[4]["loss"] is None and math.isfinite(records[3]["loss"])  # NaN is written as null
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2
    assert max_diff(weights(tmp_path), good) == 0.0


def test_resume_refuses_another_architecture_or_data_order_and_scratch_refuses_to_overwrite(sample_data_dir, tmp_path):
    run(sample_data_dir, tmp_path, "--max_steps=1")
    with pytest.raises(CheckpointError, match="d_model: checkpoint 32, config 64"):
        run(sample_data_dir, tmp_path, "--max_steps=2", "--init_from=resume", "--d_model=64")
    with pytest.raises(CheckpointError, match="seed"):
        run(sample_data_dir, tmp_path, "--max_steps=2", "--init_from=resume", "--seed=7")
    # ...and starting from scratch over an existing run would overwrite it: refused, files untouched.
    before = (tmp_path / "last.pt").stat().st_mtime_ns, (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(train.ConfigError, match="already holds a run.*--init_from=resume"):
        run(sample_data_dir, tmp_path, "--max_steps=2")
    assert before == ((tmp_path / "last.pt").stat().st_mtime_ns, (tmp_path / "metrics.jsonl").read_bytes())


def _start(args, tmp_path, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(predicate, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_saves_last_and_exits_cleanly(sample_data_dir, tmp_path, sig):
    proc = _start(["train.py", *TINY, f"--data_dir={sample_data_dir}", f"--out_dir={tmp_path}",
                   "--max_steps=100000", "--eval_interval=100000"], tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by signal" in out
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["step"] == max(train_records(tmp_path)) >= 3
    assert ckpt["loader"]["position"] == ckpt["step"] * 4


KILLED_MID_WRITE = """
import io, pathlib, sys, time, runpy, torch
real_save, marker = torch.save, pathlib.Path(sys.argv[1])
def save_half_then_hang(obj, f):  # write half a checkpoint, announce it, and wait for the kill
    buf = io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
    f.write(data[: len(data) // 2]); f.flush()
    marker.touch()
    time.sleep(600)
torch.save = save_half_then_hang
sys.argv = ["train.py", *sys.argv[2:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_last_pt(sample_data_dir, tmp_path):
    run(sample_data_dir, tmp_path, "--max_steps=2")
    before = weights(tmp_path)
    marker = tmp_path / "writing"
    proc = _start(["-c", KILLED_MID_WRITE, str(marker), *TINY, f"--data_dir={sample_data_dir}",
                   f"--out_dir={tmp_path}", "--max_steps=4", "--init_from=resume"], tmp_path)
    _wait_for(marker.exists, proc)
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.communicate(timeout=60)
    assert list(tmp_path.glob(".last.pt.tmp-*")), "the kill should have landed mid-write"
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["step"] == 2 and max_diff(ckpt["model"], before) == 0.0
    assert run(sample_data_dir, tmp_path, "--max_steps=3", "--init_from=resume")["step"] == 3
    assert not list(tmp_path.glob(".last.pt.tmp-*"))  # the half-written file is removed by the next owner


def unigram_entropy(data_dir) -> float:
    """Entropy (nats/token) of the training tokens' unigram distribution: the loss of a model that
    ignores context. Falling well below it means the model uses context."""
    tokens = np.concatenate([np.asarray(read_shard(p)) for p in DataDir(data_dir).shard_paths("train")])
    p = np.bincount(tokens).astype(np.float64) / tokens.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_tiny_config_learns_well_below_the_unigram_entropy(sample_data_dir, tmp_path):
    # config/tiny.py as shipped (Muon), stopped at half its steps to fit the test budget (~5.7 there, ~5.6 at the end),
    # evaluated once at the end and without its samples (other tests check those).
    summary = train.main([str(REPO / "config/tiny.py"), f"--data_dir={sample_data_dir}", f"--out_dir={tmp_path}",
                          "--max_steps=75", "--eval_interval=75", "--sample_tokens=0", "--wandb_mode=disabled"])
    entropy = unigram_entropy(sample_data_dir)
    assert summary["val"]["loss"] < entropy - 0.5, (summary["val"], entropy)
    vocab_size = load_checkpoint(tmp_path / "last.pt")["model_config"]["vocab_size"]
    assert train_records(tmp_path)[1]["loss"] > math.log(vocab_size) - 0.5  # starts near uniform


def test_wandb_without_a_key_falls_back_to_offline(sample_data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    with pytest.warns(UserWarning, match="no W&B API key"):
        run(sample_data_dir, tmp_path, "--max_steps=2", "--wandb_mode=online")
    assert list((tmp_path / "wandb").glob("offline-run-*")), "an offline run should have been written"


def test_a_resumed_run_logs_into_the_same_wandb_run(sample_data_dir, tmp_path, monkeypatch):
    import wandb

    inits = []

    class FakeRun:
        def log(self, *args, **kwargs):
            pass

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kwargs: inits.append(kwargs) or FakeRun())
    run(sample_data_dir, tmp_path, "--max_steps=1", "--wandb_mode=offline")
    run(sample_data_dir, tmp_path, "--max_steps=2", "--wandb_mode=offline", "--init_from=resume")
    first, resumed = inits
    assert first["id"] and resumed["id"] == first["id"] and resumed["resume"] == "allow"
    other = tmp_path / "another-run"
    run(sample_data_dir, other, "--max_steps=1", "--wandb_mode=offline")
    assert inits[2]["id"] != first["id"]


def test_resume_drops_a_metrics_line_torn_inside_a_hangul_character(sample_data_dir, tmp_path, capsys):
    run(sample_data_dir, tmp_path, "--max_steps=2", "--eval_interval=2", "--sample_prompt=한국어 문장은")
    metrics = tmp_path / "metrics.jsonl"
    whole = metrics.read_bytes()
    assert whole.endswith(b'"}\n') and "한국어".encode() in whole.splitlines()[-1]  # the eval sample, last
    cut = whole.rindex("한".encode()) + 1  # kill -9 mid-append: the line ends inside a 3-byte syllable
    metrics.write_bytes(whole[:cut])
    with pytest.raises(UnicodeDecodeError):
        metrics.read_text(encoding="utf-8")  # what made resume a traceback
    run(sample_data_dir, tmp_path, "--max_steps=3", "--eval_interval=2", "--init_from=resume")
    complete = whole[:whole.rindex(b"\n", 0, cut) + 1]
    after = metrics.read_bytes()
    assert after.startswith(complete)  # every complete line before the torn one, byte for byte
    assert sorted(train_records(tmp_path)) == [1, 2, 3]  # and every line parses
    assert "skipped 1 unreadable line(s)" in capsys.readouterr().err


def test_resume_at_or_past_max_steps_is_refused_and_leaves_the_run_as_it_was(sample_data_dir, tmp_path):
    run(sample_data_dir, tmp_path, "--max_steps=2")
    files = ("config.json", "metrics.jsonl", "last.pt")
    before = {name: (tmp_path / name).read_bytes() for name in files}
    for max_steps in (2, 1):  # was: exit 0 having trained nothing, and config.json rewritten with max_steps
        with pytest.raises(ConfigError, match=r"already at step 2, and max_steps is .*--max_steps=N with N > 2"):
            run(sample_data_dir, tmp_path, f"--max_steps={max_steps}", "--init_from=resume")
    assert before == {name: (tmp_path / name).read_bytes() for name in files}
    assert ConfigError.exit_code == 2
    with pytest.raises(ConfigError, match="holds no run to resume.*--init_from=scratch"):
        run(sample_data_dir, tmp_path / "empty", "--max_steps=2", "--init_from=resume")


def test_the_first_command_on_a_fresh_clone_prepares_the_sample_and_trains(sample_data_dir, tmp_path,
                                                                           monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/ here: a fresh clone, where data_dir's default is data/sample
    summary = train.main([*TINY, "--max_steps=1", "--out_dir=out"])
    assert summary["step"] == 1
    assert "preparing the embedded Korean sample" in capsys.readouterr().out
    made, reference = DataDir(tmp_path / "data/sample"), DataDir(sample_data_dir)  # prepare.py --dataset sample's
    assert made.meta["command"] == "python prepare.py --dataset sample"
    assert made.meta["shards"] == reference.meta["shards"] and made.tokenizer_sha == reference.tokenizer_sha
    for name in ("tokenizer.model", "train_000000.bin", "val_000000.bin"):
        assert (made.path / name).read_bytes() == (reference.path / name).read_bytes()
    # Other missing data keeps its error, and nothing is made for it.
    with pytest.raises(DataError, match="no meta.json"):
        train.main([*TINY, "--max_steps=1", "--out_dir=out2", "--data_dir=data/mine"])
    assert not (tmp_path / "data/mine").exists()


def test_evaluation_problems_stop_the_run_before_its_first_step(sample_data_dir, tmp_path):
    with pytest.raises(DataError, match="smaller than one global batch"):
        run(sample_data_dir, tmp_path, "--max_steps=50", "--eval_interval=50", "--eval_tokens=1")
    with pytest.raises(ConfigError, match="leaves no room to generate"):
        run(sample_data_dir, tmp_path, "--max_steps=50", "--eval_interval=50", "--sample_prompt=" + "한국어 " * 200)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "last.pt").exists()


def test_a_final_step_that_was_skipped_says_which_step_last_pt_holds(sample_data_dir, tmp_path, capsys):
    run(sample_data_dir, tmp_path, "--max_steps=2")
    run(sample_data_dir, tmp_path, "--max_steps=5", "--eval_interval=2", "--init_from=resume", "--lr_factor=1e30")
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2  # steps 4 and 5 were non-finite, so never saved
    out = capsys.readouterr().out
    assert "step 5 had a non-finite loss and was not saved" in out and "last.pt holds step 2" in out
