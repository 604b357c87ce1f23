"""Everything about running on more than one process, kept out of the model and out of the loop.

`init_distributed` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts NCCL on
CUDA or gloo on CPU; without it the run is a single process. `build_engine` then wraps the model in
one of two engines with the same small interface, so train.py has one loop for both:

    with engine.grad_sync(last_micro_step):  # DDP all-reduces gradients only on the last micro-step
        loss = engine.model(x, y, ...)[1]
        engine.backward(loss)
    grad_norm, applied = engine.step(lr)     # clip, AdamW; skipped when the gradient is not finite

`TorchEngine` is plain PyTorch (optionally compiled, DDP-wrapped under torchrun); `DeepSpeedEngine`
hands bf16, accumulation, clipping and the optimizer to `deepspeed.initialize`, which is imported
only on that path. `StopSignal` turns SIGINT/SIGTERM into a flag the loop checks after each step.
"""

import json
import math
import os
import shutil
import signal
import socket
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanokor.checkpoint import CheckpointError, check_architecture, load_checkpoint
from nanokor.config import ConfigError
from nanokor.optim import build_optimizer


@dataclass
class Env:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_distributed(device: str = "auto", single_process_group: bool = False) -> Env:
    """Join torchrun's process group, or stay a single process.

    single_process_group: start a world of one when torchrun is absent (DeepSpeed always needs a group).
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' was asked for, but PyTorch sees no CUDA GPU. Use --device=cpu (or auto), "
                          "or install a CUDA build of PyTorch.")
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if single_process_group and "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    if "RANK" not in os.environ:
        return Env(0, 0, 1, torch.device("cuda" if use_cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if use_cuda:
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
        dist.init_process_group("nccl", device_id=torch_device)
    else:
        torch_device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Env(rank, local_rank, world_size, torch_device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def gather_objects(obj) -> list:
    """obj from every rank, in rank order (on every rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class StopSignal:
    """SIGINT/SIGTERM set a flag instead of killing the process, so the loop can finish its step and
    save last.pt. torchrun passes both signals on to every worker (and SIGKILLs them ~30 s later by
    default), so each rank sees the flag; the loop all-reduces it so all ranks stop on the same step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False

    @contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum, frame):
        self.requested = True


def build_engine(model, cfg, env: Env, dtype: torch.dtype):
    """The engine for this run: DeepSpeed when cfg.deepspeed names a JSON config, else PyTorch (DDP)."""
    if cfg.deepspeed:
        return DeepSpeedEngine(model, cfg, env, dtype)
    return TorchEngine(model, cfg, env)


class TorchEngine:
    """Plain PyTorch: AdamW with fp32 master weights, optional torch.compile, DDP under torchrun."""

    def __init__(self, model, cfg, env: Env):
        self.module = model  # the bare Transformer: its state_dict has clean keys
        self.grad_accum, self.grad_clip = cfg.grad_accum, cfg.grad_clip
        self.optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
        self.ddp = DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None) \
            if env.distributed else None
        # Compile outside DDP: Dynamo then splits the graph at DDP's gradient buckets, so each bucket's
        # all-reduce overlaps the rest of the backward instead of waiting for all of it.
        wrapped = model if self.ddp is None else self.ddp
        self.model = torch.compile(wrapped) if cfg.compile else wrapped

    def grad_sync(self, last: bool):
        """DDP all-reduces gradients in backward; between micro-steps that is wasted traffic."""
        return nullcontext() if last or self.ddp is None else self.ddp.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()  # the accumulated gradient is the mean over micro-steps

    def step(self, lr: float) -> tuple[float, bool]:
        """Clip and update; a non-finite gradient norm (the same on every rank) skips the update."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip or float("inf")).item()
        applied = math.isfinite(norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    def checkpoint_state(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def save(self, out_dir, step: int, loop_state: dict) -> None:
        """Nothing beyond last.pt: the optimizer state travels inside it."""

    def resume(self, out_dir) -> dict:
        path = Path(out_dir) / "last.pt"
        ckpt = load_checkpoint(path)
        if ckpt.get("optimizer") is None:
            how = ("a DeepSpeed run: resume it with the same --deepspeed config" if "loader" in ckpt else
                   "no training run (it holds weights only)")
            raise CheckpointError(f"{path} cannot be resumed by plain PyTorch: it was written by {how}. Otherwise "
                                  "start fresh with --init_from=scratch or another --out_dir.")
        check_architecture(ckpt["model_config"], self.module.config, path)
        self.module.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        return ckpt


class DeepSpeedEngine:
    """DeepSpeed owns bf16, accumulation, clipping and the optimizer step; the loop still sets the lr.

    Engine checkpoints go to out_dir/deepspeed/step_N (the newest one is kept) with the loop state as
    client state; train.py also writes a consolidated nanokor last.pt for sample.py and export.
    """

    def __init__(self, model, cfg, env: Env, dtype: torch.dtype):
        try:
            import deepspeed
        except ImportError:
            raise ConfigError(f"--deepspeed={cfg.deepspeed} needs the deepspeed package, which is not installed. "
                              "Install the extra with `pip install -e '.[deepspeed]'`, or drop --deepspeed to "
                              "train with plain PyTorch / DDP.") from None
        ds_config = deepspeed_config(cfg, dtype)
        optimizer = None if "optimizer" in ds_config else build_optimizer(
            model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config,
            model_parameters=model.param_groups(cfg.weight_decay))
        if cfg.compile:
            self.engine.compile()
        self.model = self.engine
        self.module = self.engine.module

    def grad_sync(self, last: bool):
        return nullcontext()  # the engine counts micro-steps against gradient_accumulation_steps

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # DeepSpeed wants step() after every backward; this one only counts

    def step(self, lr: float) -> tuple[float, bool]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm), self.engine.was_step_applied()

    def checkpoint_state(self) -> dict:
        """Full fp32 weights, assembled from ZeRO's partitions (a collective: every rank calls it)."""
        from deepspeed.utils import safe_get_full_fp32_param

        full = {id(p): safe_get_full_fp32_param(p) for p in self.module.parameters()}
        weights = {name: (full[id(t)] if full.get(id(t)) is not None else t.detach()).float().cpu().clone()
                   for name, t in self.module.state_dict(keep_vars=True).items()}
        return {"model": weights, "optimizer": None}

    def save(self, out_dir, step: int, loop_state: dict) -> None:
        root = Path(out_dir) / "deepspeed"
        tag = f"step_{step:07d}"
        self.engine.save_checkpoint(str(root), tag=tag, client_state=loop_state)
        barrier()
        if dist.get_rank() == 0:  # keep the newest engine checkpoint only; `latest` names it
            for old in root.glob("step_*"):
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)

    def resume(self, out_dir) -> dict:
        root = Path(out_dir) / "deepspeed"
        last = Path(out_dir) / "last.pt"  # rank 0's consolidated copy of the same step
        if last.is_file():  # DeepSpeed's own load would fail on a shape mismatch with a bare traceback
            check_architecture(load_checkpoint(last, mmap=True)["model_config"], self.module.config, last)
        path, client_state = self.engine.load_checkpoint(str(root))
        if path is None:
            raise ConfigError(f"--init_from=resume found no DeepSpeed checkpoint under {root}. Resume with the "
                              "same --out_dir (and --deepspeed) as the run that wrote it, or start with "
                              "--init_from=scratch.")
        check_architecture(client_state["model_config"], self.module.config, path)
        return client_state


DS_AUTO = {  # DeepSpeed key path -> the TrainConfig it must agree with ("auto" in the JSON fills it in)
    ("train_micro_batch_size_per_gpu",): lambda cfg, dtype: cfg.batch_size,
    ("gradient_accumulation_steps",): lambda cfg, dtype: cfg.grad_accum,
    ("gradient_clipping",): lambda cfg, dtype: cfg.grad_clip,
    ("bf16", "enabled"): lambda cfg, dtype: dtype == torch.bfloat16,
}
DS_OPTIMIZER_AUTO = {  # optimizer params: "auto" takes the TrainConfig value (lr is overwritten each step)
    "lr": lambda cfg: cfg.lr, "weight_decay": lambda cfg: cfg.weight_decay,
    "betas": lambda cfg: [cfg.beta1, cfg.beta2], "eps": lambda cfg: cfg.eps,
}


def deepspeed_config(cfg, dtype: torch.dtype) -> dict:
    """Read the DeepSpeed JSON and make it agree with the loop: "auto" (or a missing key) takes the nanokor
    value; an explicit value that disagrees is an error, because the loop and the engine must count
    micro-steps, clip and cast alike."""
    path = Path(cfg.deepspeed)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist. Pass --deepspeed=config/ds_zero2.json or "
                          "another DeepSpeed JSON file.")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON ({e}). Fix the file.") from None
    for keys, wanted in DS_AUTO.items():
        parent = ds
        for key in keys[:-1]:
            parent = parent.setdefault(key, {})
        value = wanted(cfg, dtype)
        if parent.get(keys[-1], "auto") == "auto":
            parent[keys[-1]] = value
        elif parent[keys[-1]] != value:
            raise ConfigError(f"{path} sets {'.'.join(keys)} = {parent[keys[-1]]!r}, but the nanokor config implies "
                              f"{value!r}. Set it to \"auto\" in the JSON so nanokor fills it in, or change the "
                              "matching nanokor key (batch_size, grad_accum, grad_clip, dtype).")
    params = ds.get("optimizer", {}).get("params", {})
    for key, wanted in DS_OPTIMIZER_AUTO.items():
        if params.get(key) == "auto":
            params[key] = wanted(cfg)
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload != "none" and "optimizer" not in ds:
        raise ConfigError(f"{path} offloads the optimizer to {offload} but declares no optimizer. Add "
                          '"optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", '
                          '"betas": "auto", "eps": "auto"}} so DeepSpeed builds its CPU Adam.')
    if ds.get("train_batch_size") == "auto":
        del ds["train_batch_size"]  # DeepSpeed derives it from micro batch, accumulation and world size
    return ds
