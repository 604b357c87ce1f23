"""bench/gpu_check.sh proves its plumbing on a CPU before a GPU is lent: the dry run runs every stage with
tiny shapes as the lent image would (no datasets, wandb, deepspeed or flash_attn), a failing stage stops
none of the others, and the results in $OUT stay complete and few (the device returns at most 8 files)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from nanokor.generate import Decoder
from nanokor.model import ModelConfig, Transformer

REPO = Path(__file__).resolve().parents[1]
DEVICE_MAX_FILES = 8


def gpu_check(out, *args, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def stage_names() -> list[str]:
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--list"], cwd=REPO, capture_output=True, text=True)
    return [line.split()[0] for line in proc.stdout.splitlines()]


def results(out) -> dict:
    return {s["name"]: s for s in json.loads((out / "results.json").read_text())["stages"]}


def returned_files(out) -> list:
    return [p for p in out.rglob("*") if p.is_file()]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    return out, gpu_check(out, "--dry-run")


def test_dry_run_runs_every_stage_and_returns_three_complete_files(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in returned_files(out)) == ["gpu_check.tar.gz", "results.json", "summary.md"]
    names, stages, summary = stage_names(), results(out), (out / "summary.md").read_text()
    assert len(names) >= 8 and list(stages) == names
    for name in names:
        assert stages[name]["status"] == "ok", (name, stages[name])
        assert f"| {name} | ok |" in summary and f"## {name}: ok" in summary
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        packed = set(tar.getnames())
    assert {f"gpu_check/{name}.log" for name in names} <= packed
    assert {"gpu_check/train-muon.metrics.jsonl", "gpu_check/decode-check.json", "gpu_check/sample-speed.json",
            "gpu_check/profile.json", "gpu_check/machine.json"} <= packed


def test_dry_run_stages_measure_what_the_gpu_run_will(dry_run):
    out, _ = dry_run
    stages = results(out)
    # As on the lent image: the four packages it lacks were absent, and everything ran without them.
    packages = stages["machine"]["figures"]["packages"]
    assert all(f"{name} absent" in packages for name in ("datasets", "wandb", "deepspeed", "flash_attn"))
    for name in ("train-muon", "train-adamw", "train-fsdp2", "train-ddp-1rank"):  # the loss fell, and the
        f = stages[name]["figures"]                                                 # GPU run's figures are there
        assert f["steps"] == 16 and f["loss, mean of the last 5"] < f["loss at step 1"] - 0.5
        assert f["step ms (median)"] > 0 and "MFU (median)" in f and f["val loss"] is not None
    # The engines' stages train the same run (fp32 here): FSDP2 with one rank, DDP with one, one process.
    fsdp, ddp, alone = (stages[name]["figures"] for name in ("train-fsdp2", "train-ddp-1rank", "train-muon"))
    for key in ("loss at step 1", "loss, mean of the last 5", "val loss"):
        assert abs(fsdp[key] - ddp[key]) <= 2e-3 and abs(ddp[key] - alone[key]) <= 2e-3, key
    muon = stages["muon-scaling"]["figures"]  # the partitioned optimizer with one rank is torch.optim.Muon
    assert muon["weights after 4 steps differ by (max)"] <= 2 ** -8 * muon["weights moved by (max)"]
    assert muon["one-process step ms, nanokor's Muon"] > 0 and muon["one-process step ms, torch.optim.Muon"] > 0
    assert all(muon[f"one-process step, {v} / plain"] > 0 for v in ("polar_express", "normuon", "cautious_wd"))
    replicated, partitioned = (float(v.rstrip("%")) for v in
                               muon["Muon's share at 64 ranks, replicated / partitioned"].split(" / "))
    assert partitioned < replicated
    check = stages["decode-check"]["figures"]
    assert check["dtype"] == "float32" and check["full forwards (no cache)"] == "64/64 tokens, ok"
    assert check["nanokor+cudagraph"] == check["nanokor+cudagraph under autocast"] == "skipped: no CUDA"
    speed = stages["sample-speed"]["figures"]
    assert {"batch 1, nanokor", "batch 8, nanokor", "batch 1, transformers", "batch 8, transformers"} <= set(speed)
    assert "MFU" in stages["profile"]["figures"] and "matmul ms" in stages["profile-plain-loss"]["figures"]


def test_a_failing_stage_stops_none_of_the_others(tmp_path):
    names = stage_names()
    injected = [name for name in names if name != "data"]  # data stays ok: the train stages need it
    proc = gpu_check(tmp_path, "--dry-run", GPU_CHECK_FAIL=",".join(injected))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert len(returned_files(tmp_path)) <= DEVICE_MAX_FILES
    stages, summary = results(tmp_path), (tmp_path / "summary.md").read_text()
    assert list(stages) == names and stages["data"]["status"] == "ok"
    for name in injected:  # each ran after a failure, failed on its own bad flag, and was recorded
        assert stages[name]["status"].startswith("FAIL"), stages[name]
        assert any("gpu-check-injected-failure" in line for line in stages[name]["log_tail"]), stages[name]
        assert f"## {name}: FAIL" in summary


def test_stages_are_skipped_when_unselected_unready_or_out_of_time(tmp_path):
    proc = gpu_check(tmp_path, "--dry-run", GPU_CHECK_ONLY="train-muon,profile", GPU_CHECK_SECONDS="10")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stages = results(tmp_path)
    assert stages["machine"]["status"] == stages["data"]["status"] == "skipped: not in GPU_CHECK_ONLY"
    assert stages["train-muon"]["status"] == "skipped: it needs data, which did not succeed"
    assert stages["profile"]["status"].startswith("skipped: out of time")


def test_a_run_stopped_mid_stage_leaves_complete_results(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_CHECK_ONLY": "data,train-muon"}
    proc = subprocess.Popen(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # stop it once data is recorded, while train-muon runs
            path = tmp_path / "results.json"
            if path.exists() and json.loads(path.read_text())["stages"][1]["status"] != "pending":
                break
            time.sleep(0.2)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stages = results(tmp_path)
    assert stages["data"]["status"] == "ok" and stages["train-muon"]["status"] == "pending"
    assert "| data | ok |" in (tmp_path / "summary.md").read_text()
    with tarfile.open(tmp_path / "gpu_check.tar.gz") as tar:
        assert "gpu_check/data.log" in tar.getnames()
    assert len(returned_files(tmp_path)) <= DEVICE_MAX_FILES


def load_sample_speed():
    spec = importlib.util.spec_from_file_location("sample_speed", REPO / "bench" / "sample_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def test_decode_check_passes_the_same_function_and_locates_a_wrong_one():
    ss = load_sample_speed()
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=97, n_layer=2, n_head=2, n_kv_head=1, d_model=32, d_ff=64, max_seq_len=128)
    model, broken = Transformer(config).eval(), Transformer(config).eval()
    broken.load_state_dict(model.state_dict())
    broken.layers[1].mlp.down_proj.weight.mul_(-1)  # a wrong path: same shapes, another function
    prompts = [torch.randint(0, 97, (2, 7)), torch.randint(0, 97, (2, 3))]
    refs = [ss.decode(model, p, 16, temperature=0) for p in prompts]
    # The KV cache against none: the same function, so every token agrees.
    assert ss.agreement(model, prompts, [ss.full_forwards(model, p, 16) for p in prompts], refs) == \
        {"status": "ok", "agree": 16, "of": 16}
    outs = [ss.decode(broken, p, 16, temperature=0) for p in prompts]
    result = ss.agreement(model, prompts, outs, refs)
    first = result["first_difference"]
    assert result["status"].startswith("DIFFERS") and result["agree"] < 16
    i, row, k = first["prompt"], first["row"], first["token"]
    assert torch.equal(outs[i][row, :k], refs[i][row, :k]) and outs[i][row, k] != refs[i][row, k]
    assert min(int(ss.shared_prefix(o, r).min()) for o, r in zip(outs, refs)) == k
    logits = model(torch.cat([prompts[i][row], refs[i][row, :k]])[None])[0][0, -1]
    top = logits.topk(2).values  # eager's margin where the paths part
    assert first["eager_top2_gap"] == pytest.approx(float(top[0] - top[1]))
    assert first["logit_scale"] == pytest.approx(float(logits.abs().max()))


@torch.no_grad()
def test_the_autocast_replay_check_runs_through(monkeypatch):
    # The check itself needs CUDA graphs; here its plumbing runs on a CPU with an eager decoder in the
    # graph decoder's place, which repeats its own tokens under the second autocast.
    ss = load_sample_speed()
    modes = []
    monkeypatch.setattr(ss, "Decoder", lambda model, mode: modes.append(mode) or Decoder(model, "eager"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, n_layer=1, n_head=2, d_model=32, d_ff=64, max_seq_len=128)).eval()
    prompts = [torch.randint(0, 97, (2, 5)), torch.randint(0, 97, (2, 3))]
    assert ss.graph_under_autocast(model, prompts, 12, device_type="cpu") == {"status": "ok", "agree": 12, "of": 12}
    assert modes == ["graph"]
