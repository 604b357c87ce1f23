"""train.py under torchrun with two gloo processes, against a single process on the same global batch:
plain DDP with AdamW and with Muon (partitioned), FSDP2 with Muon (saved, resumed exactly, resumed by one
process), its gradients and NorMuon's sharded row state through a checkpoint, DeepSpeed ZeRO-2 with the
optimizer offloaded to CPU (saved, then resumed), and ZeRO-3 (parameters partitioned) against ZeRO-2 on
the same steps."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from nanokor.checkpoint import CheckpointError, build_model, load_checkpoint
from nanokor.config import load_config, model_config
from nanokor.distributed import Env
from nanokor.engine import FSDPEngine
from nanokor.model import Transformer
from test_train import TINY, max_diff, run, train_records

REPO = Path(__file__).resolve().parents[1]


# Newton-Schulz in fp32 on every machine, so that these comparisons do not depend on whether the CPU has bf16
# units (optim.ns_dtype's auto): in bf16 a last-bit difference of the reduced gradient rounds the other way
# by 2^-8 and five iterations grow it, 5e-3 in the weights after 4 steps of the FSDP test below.
NS_FP32 = ["--muon_ns_dtype=fp32"]


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
    common = ["--max_steps=4", "--grad_accum=2", "--eval_interval=2", f"--optimizer={optimizer}", *NS_FP32]
    # The Muon run starts where data/sample is missing (a fresh clone): rank 0 prepares it while rank 1
    # waits, and the data must be exactly prepare.py --dataset sample's for the comparison below to hold.
    fresh = optimizer == "muon"
    proc = torchrun(None if fresh else sample_data_dir, tmp_path / "ddp", "--batch_size=2", *common,
                    cwd=tmp_path if fresh else REPO)
    assert "2 x cpu, fp32, DDP" in proc.stdout
    assert proc.stdout.count("reading the embedded Korean sample") == fresh  # one rank prepared, once
    run(sample_data_dir, tmp_path / "single", "--batch_size=4", *common)
    # Muon's last-bit differences of another summation order: ~1e-4 per step, against Muon steps of ~1e-2
    # per weight, which is what ranks that each used their own gradient would be off by; and AdamW's
    # normalized step can flip sign on an embedding entry whose gradient is near eps.
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


def test_fsdp_on_two_processes_matches_one_process_resumes_exactly_and_at_another_world_size(sample_data_dir,
                                                                                             tmp_path):
    # The default recipe (Muon for the block matrices, AdamW for the rest) on FSDP2, per-rank batch 2 x 2 ranks
    # x grad_accum 2, against one process with batch 4 on the same global batch. Each half of a split run stops
    # at its own max_steps, so Noam runs without a cooldown.
    common = ["--grad_accum=2", "--eval_interval=2", "--cooldown_frac=0", *NS_FP32, "--engine=fsdp"]
    proc = torchrun(sample_data_dir, tmp_path / "fsdp", "--batch_size=2", "--max_steps=4", *common)
    assert "2 x cpu, fp32, FSDP2" in proc.stdout
    torchrun(sample_data_dir, tmp_path / "split", "--batch_size=2", "--max_steps=2", *common)
    shutil.copytree(tmp_path / "split", tmp_path / "one")
    (tmp_path / "split" / "fsdp" / ".step_0000003.partial").mkdir()  # what a save killed midway leaves
    proc = torchrun(sample_data_dir, tmp_path / "split", "--batch_size=2", "--max_steps=4", "--init_from=resume", *common)
    assert "resumed from" in proc.stdout
    run(sample_data_dir, tmp_path / "single", "--batch_size=4", "--max_steps=4", *common[:-1])

    # Exact resume: the split run is the straight one, bit for bit.
    fsdp, split, single = (train_records(tmp_path / d) for d in ("fsdp", "split", "single"))
    assert [split[s]["loss"] for s in range(1, 5)] == [fsdp[s]["loss"] for s in range(1, 5)]
    assert [split[s]["grad_norm"] for s in range(1, 5)] == [fsdp[s]["grad_norm"] for s in range(1, 5)]
    last = {d: load_checkpoint(tmp_path / d / "last.pt") for d in ("fsdp", "split", "single")}
    assert all(torch.equal(last["fsdp"]["model"][k], last["split"]["model"][k]) for k in last["fsdp"]["model"])
    assert sorted(p.name for p in (tmp_path / "split" / "fsdp").iterdir()) == ["step_0000004"]  # newest only, no leftover

    # Against one process: FSDP2 reduce-scatters the mean gradient (fp32 rounding apart, ~1e-7, which the
    # logged norm shows at 1e-5: CPU fp32 norms of the shards round differently), which Muon's Newton-Schulz
    # and AdamW's normalized step grow to ~1e-4, as under DDP (the same tolerance; measured: 7e-4).
    assert [fsdp[s]["loss"] for s in range(1, 5)] == pytest.approx([single[s]["loss"] for s in range(1, 5)], abs=2e-4)
    assert [fsdp[s]["grad_norm"] for s in range(1, 5)] == pytest.approx([single[s]["grad_norm"] for s in range(1, 5)],
                                                                       rel=1e-4)
    assert max_diff(last["fsdp"]["model"], last["single"]["model"]) <= 2e-3
    assert val_losses(tmp_path / "fsdp") == pytest.approx(val_losses(tmp_path / "single"), abs=2e-4)
    assert last["fsdp"]["optimizer"] is None  # it lives in fsdp/step_N, sharded
    build_model(last["fsdp"])  # full weights: sample.py, export and evaluate read it as any checkpoint

    # The 2-rank checkpoint of step 2, resumed by one process on the same global batch: DCP reshards it.
    proc = subprocess.run([sys.executable, "train.py", *TINY, f"--data_dir={sample_data_dir}",
                           f"--out_dir={tmp_path / 'one'}", "--batch_size=4", "--max_steps=4", "--init_from=resume",
                           *common], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RNG states for 2 processes" in proc.stderr
    one = train_records(tmp_path / "one")
    assert [one[s]["loss"] for s in (3, 4)] == pytest.approx([fsdp[s]["loss"] for s in (3, 4)], abs=2e-4)
    assert max_diff(load_checkpoint(tmp_path / "one" / "last.pt")["model"], last["fsdp"]["model"]) <= 2e-3

    # Resuming with the other engine is refused, naming the one that wrote the run.
    with pytest.raises(CheckpointError, match="written by a --engine=fsdp run"):
        run(sample_data_dir, tmp_path / "fsdp", "--batch_size=2", "--max_steps=6", "--init_from=resume", *common[:-1])


def _fsdp_gradient_worker(rank: int, world: int, store: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for dtype in ("fp32", "bf16"):
            _check_fsdp_gradients(rank, world, dtype)
    finally:
        dist.destroy_process_group()


def _check_fsdp_gradients(rank: int, world: int, dtype: str):
    cfg = load_config(["--device=cpu", "--n_layer=2", "--n_head=2", "--d_model=32", "--d_ff=64", "--block_size=16",
                       "--grad_accum=2", f"--dtype={dtype}"])
    vocab, batch = 512, 2 * world  # the global batch; each rank takes its 2 rows
    data = torch.randint(0, vocab, (cfg.grad_accum, batch, cfg.block_size + 1), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(rank)  # each rank initializes its own weights, as train.py seeds it: the engine must start
    engine = FSDPEngine(Transformer(model_config(cfg, vocab)), cfg, Env(rank, rank, world, torch.device("cpu")))
    seen = set()  # the dtype of the weights the blocks compute with
    engine.module.layers[0].mlp.up_proj.register_forward_hook(lambda m, i, o: seen.add(m.weight.dtype))
    for micro in range(cfg.grad_accum):
        x, y = data[micro, 2 * rank:2 * rank + 2, :-1], data[micro, 2 * rank:2 * rank + 2, 1:]
        with engine.grad_sync(last=micro == cfg.grad_accum - 1):
            with engine.autocast():
                loss = engine.model(x, y, loss_only=True)[1]
            engine.backward(loss)
        if micro == 0:  # neither resharded nor reduce-scattered between micro-steps: whole tensors, no DTensor
            assert not any(isinstance(t, DTensor) for p in engine.module.parameters() for t in (p, p.grad))
    got = {n: p.grad.full_tensor() for n, p in engine.module.named_parameters()}
    assert {p.dtype for p in engine.module.parameters()} == {torch.float32}  # fp32 master weights
    assert seen == {torch.bfloat16 if dtype == "bf16" else torch.float32}

    torch.manual_seed(0)  # rank 0's weights, in one process, on the whole global batch, in fp32
    reference = Transformer(model_config(cfg, vocab))
    for micro in range(cfg.grad_accum):
        (reference(data[micro, :, :-1], data[micro, :, 1:], loss_only=True)[1] / cfg.grad_accum).backward()
    for name, p in reference.named_parameters():
        if dtype == "fp32":  # the mean, not the sum (pytorch issue 162338), to fp32 rounding
            assert (got[name] - p.grad).abs().max() <= 2e-6 * p.grad.abs().max(), name
        else:  # bf16 weights and activations: ~1% of the gradient
            assert (got[name] - p.grad).norm() <= 0.05 * p.grad.norm(), name


def _fsdp_row_state_worker(rank: int, world: int, store: str, ckpt: str):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        cfg = load_config(["--device=cpu", "--n_layer=1", "--n_head=2", "--d_model=32", "--d_ff=64", "--block_size=8",
                           "--normuon_beta2=0.9", "--muon_cautious_wd=true"])
        env = Env(rank, rank, world, torch.device("cpu"))
        engines = [FSDPEngine(Transformer(model_config(cfg, 64)), cfg, env) for _ in range(2)]
        x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(rank))
        engines[0].backward(engines[0].model(x[:, :-1], x[:, 1:], loss_only=True)[1])
        engines[0].step(1)
        muon = engines[0].optimizer.optimizers["muon"]
        rows = {n: muon.state[p]["normuon_buffer"] for n, p in engines[0].module.named_parameters() if p in muon.state}
        assert rows and all(isinstance(v, DTensor) and v.to_local().abs().sum() > 0 for v in rows.values())
        dcp.save(engines[0]._state_dict(), checkpoint_id=ckpt)
        sd = engines[1]._state_dict()  # a fresh engine, as a resume builds it
        dcp.load(sd, checkpoint_id=ckpt)
        set_state_dict(engines[1].module, engines[1]._optimizers(), model_state_dict=sd["model"],
                       optim_state_dict=sd["optimizer"])
        loaded = engines[1].optimizer.optimizers["muon"]
        for n, p in engines[1].module.named_parameters():
            if n in rows:
                assert torch.equal(loaded.state[p]["normuon_buffer"].full_tensor(), rows[n].full_tensor()), n
    finally:
        dist.destroy_process_group()


def test_fsdp_checkpoints_carry_normuons_row_state(tmp_path):
    """NorMuon's per-row second moment lives sharded with its matrix's rows (a DTensor), so DCP saves it
    with the momentum and a resume gets it back."""
    mp.start_processes(_fsdp_row_state_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "ckpt")), nprocs=2,
                       start_method="fork")


@pytest.mark.parametrize("world", [2])
def test_fsdp_gradients_are_the_one_process_gradients(world, tmp_path):
    """FSDP2's sharded gradients, reassembled, against one process's on the same global batch, after two
    micro-steps without a sync between them, in fp32 and with bf16 weights (MixedPrecisionPolicy)."""
    mp.start_processes(_fsdp_gradient_worker, args=(world, str(tmp_path / "store")), nprocs=world, start_method="fork")
