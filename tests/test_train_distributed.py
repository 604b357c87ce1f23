"""train.py under torchrun with two gloo processes, against a single process on the same global batch:
plain DDP with AdamW and with Muon, DeepSpeed ZeRO-2 with the optimizer offloaded to CPU (saved, then
resumed), and ZeRO-3 (parameters partitioned) against ZeRO-2 on the same steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanokor.checkpoint import build_model, load_checkpoint
from test_train import TINY, max_diff, run, train_records

REPO = Path(__file__).resolve().parents[1]


def torchrun(data_dir, out_dir, *args, timeout=600, cwd=REPO):
    """Two CPU processes; the timeout leaves room for DeepSpeed's one-time C++ op build. data_dir None
    leaves train.py's default (data/sample, under cwd)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train.py"),
           *TINY, *([f"--data_dir={data_dir}"] if data_dir else []), f"--out_dir={out_dir}", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ddp_on_two_processes_matches_one_process_on_the_global_batch(sample_data_dir, tmp_path, optimizer):
    # Per-rank batch 2 x 2 ranks = 8 sequences per step with grad_accum 2, as one process with batch 4.
    # Muon orthogonalizes the all-reduced gradient, so every rank takes the single process's step.
    common = ["--max_steps=4", "--grad_accum=2", "--eval_interval=2", f"--optimizer={optimizer}"]
    # The Muon run starts where data/sample is missing (a fresh clone): rank 0 prepares it while rank 1
    # waits, and the data must be exactly prepare.py --dataset sample's for the comparison below to hold.
    fresh = optimizer == "muon"
    proc = torchrun(None if fresh else sample_data_dir, tmp_path / "ddp", "--batch_size=2", *common,
                    cwd=tmp_path if fresh else REPO)
    assert "2 x cpu, fp32, DDP" in proc.stdout
    assert proc.stdout.count("reading the embedded Korean sample") == fresh  # one rank prepared, once
    run(sample_data_dir, tmp_path / "single", "--batch_size=4", *common)
    # torch.optim.Muon orthogonalizes in bfloat16, where the last-bit differences of another summation
    # order can round the other way: ~1e-4 per step, against Muon steps of ~1e-2 per weight, which is
    # what ranks that each used their own gradient would be off by.
    tol = 1e-5 if optimizer == "adamw" else 2e-3
    assert max_diff(load_checkpoint(tmp_path / "ddp" / "last.pt")["model"],
                    load_checkpoint(tmp_path / "single" / "last.pt")["model"]) <= tol
    ddp, single = train_records(tmp_path / "ddp"), train_records(tmp_path / "single")
    assert [ddp[s]["loss"] for s in range(1, 5)] == pytest.approx([single[s]["loss"] for s in range(1, 5)],
                                                                 abs=tol / 10)
    assert ddp[4]["tokens_seen"] == 4 * 8 * 32
    assert val_losses(tmp_path / "ddp") == pytest.approx(val_losses(tmp_path / "single"), abs=tol / 10)


def val_losses(out_dir) -> list[float]:
    lines = (out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r["val_loss"] for r in map(json.loads, lines) if "val_loss" in r]


def test_deepspeed_zero2_cpu_offload_saves_resumes_and_matches_plain_adamw(sample_data_dir, tmp_path):
    ds = ["--deepspeed=config/ds_zero2.json", "--optimizer=adamw", "--cooldown_frac=0", "--batch_size=2", "--grad_accum=2",
          "--eval_interval=2"]
    torchrun(sample_data_dir, tmp_path / "ds", "--max_steps=2", *ds)
    engine_dir = tmp_path / "ds" / "deepspeed"
    assert (engine_dir / "latest").read_text().strip() == "step_0000002"
    proc = torchrun(sample_data_dir, tmp_path / "ds", "--max_steps=4", "--init_from=resume", *ds)
    assert "resumed from" in proc.stdout and "DeepSpeed" in proc.stdout
    assert sorted(p.name for p in engine_dir.glob("step_*")) == ["step_0000004"]  # only the newest is kept
    with pytest.raises(AssertionError, match="d_model: checkpoint 32, config 64"):  # named, before DeepSpeed loads
        torchrun(sample_data_dir, tmp_path / "ds", "--max_steps=6", "--init_from=resume", "--d_model=64", *ds)

    # The reference: plain PyTorch AdamW, one process, the same global batch, four uninterrupted steps.
    run(sample_data_dir, tmp_path / "ref", "--optimizer=adamw", "--cooldown_frac=0", "--batch_size=4", "--grad_accum=2",
        "--eval_interval=2", "--max_steps=4")
    ds_ckpt = load_checkpoint(tmp_path / "ds" / "last.pt")
    assert ds_ckpt["step"] == 4 and ds_ckpt["optimizer"] is None  # the optimizer lives in the engine checkpoint
    assert max_diff(ds_ckpt["model"], load_checkpoint(tmp_path / "ref" / "last.pt")["model"]) <= 1e-4
    got, want = train_records(tmp_path / "ds"), train_records(tmp_path / "ref")
    assert [got[s]["loss"] for s in range(1, 5)] == pytest.approx([want[s]["loss"] for s in range(1, 5)], abs=1e-5)
    build_model(ds_ckpt)  # a complete nanokor checkpoint: sample.py and export can use it


def test_deepspeed_zero3_trains_saves_resumes_and_matches_zero2(sample_data_dir, tmp_path):
    # Both halves of a split run stop at their own max_steps, so Noam runs without a cooldown.
    ds = ["--optimizer=adamw", "--cooldown_frac=0", "--batch_size=2", "--grad_accum=2", "--eval_interval=2"]
    torchrun(sample_data_dir, tmp_path / "z3", "--max_steps=2", "--deepspeed=config/ds_zero3.json", *ds)
    proc = torchrun(sample_data_dir, tmp_path / "z3", "--max_steps=4", "--init_from=resume",
                    "--deepspeed=config/ds_zero3.json", *ds)
    assert "DeepSpeed ZeRO-3" in proc.stdout and "resumed from" in proc.stdout
    torchrun(sample_data_dir, tmp_path / "z2", "--max_steps=4", "--deepspeed=config/ds_zero2.json", *ds)
    z3, z2 = load_checkpoint(tmp_path / "z3" / "last.pt"), load_checkpoint(tmp_path / "z2" / "last.pt")
    # The consolidated last.pt holds full tensors, not rank 0's partition: it loads into a whole model.
    model = build_model(z3)
    assert all(z3["model"][k].shape == v.shape for k, v in model.state_dict().items())
    assert z3["step"] == 4 and max_diff(z3["model"], z2["model"]) <= 1e-4
    got, want = train_records(tmp_path / "z3"), train_records(tmp_path / "z2")
    assert [got[s]["loss"] for s in range(1, 5)] == pytest.approx([want[s]["loss"] for s in range(1, 5)], abs=1e-5)


def test_deepspeed_refuses_muon_by_naming_the_fix():
    """The default optimizer is Muon, which the DeepSpeed path does not run: refused before any setup."""
    from nanokor.config import ConfigError, load_config, model_config
    from nanokor.distributed import Env
    from nanokor.engine import build_engine
    from nanokor.model import Transformer

    cfg = load_config(["--deepspeed=config/ds_zero2.json", "--d_model=32", "--n_head=2", "--n_layer=1", "--d_ff=64"])
    with pytest.raises(ConfigError, match="pass --optimizer=adamw"):
        build_engine(Transformer(model_config(cfg, vocab_size=64)), cfg,
                     Env(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))
