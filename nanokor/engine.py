"""Engines: how a model is trained on this hardware, behind one interface the loop never looks past.

    engine = build_engine(model, cfg, env)   # places the model, builds its optimizer once
    with engine.autocast():                  # the precision the engine computes in
        with engine.grad_sync(last_micro_step):  # DDP all-reduces gradients only on the last micro-step
            loss = engine.model(x, y, ...)[1]
            engine.backward(loss)
    grad_norm, applied = engine.step(step)   # the step's lr, momentum, decay; clip, update (skipped when
                                             # the gradient is not finite)
    engine.save(run, state, extras)          # last.pt (and the engine's own checkpoint); every rank calls it
    state = engine.resume(run)               # weights and optimizer back; returns the LoopState

`TorchEngine` is plain PyTorch: AdamW or Muon over fp32 master weights, bf16 autocast, optional
torch.compile, DDP under torchrun (`engine="ddp"`, the default). `FSDPEngine` (`engine="fsdp"`) is the
same loop over PyTorch's FSDP2: weights, gradients and optimizer state sharded across the ranks, Muon
included. `DeepSpeedEngine` (`deepspeed=<json>`) hands bf16, accumulation, clipping and the optimizer to
`deepspeed.initialize` (ZeRO-2 or ZeRO-3), which is imported only on that path. Another engine is one
more class with these methods and an entry in `engine_class`. `engine_class(cfg).needs_process_group`
tells train.py, before anything runs, whether a single process must still start a process group
(DeepSpeed and FSDP2 always need one). How Muon's work is split across ranks is the optimizer's
business (nanokor/muon.py), under every engine.
"""

import json
import math
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from nanokor.checkpoint import LoopState, check_architecture, load_checkpoint, load_training, rng_state, save_training
from nanokor.device import resolve_dtype
from nanokor.distributed import Env, all_reduce_sum, barrier, broadcast_from_master, gather_objects
from nanokor.errors import CheckpointError, ConfigError
from nanokor.optim import Hyperparameters, build_optimizer, param_groups, schedule_peak
from nanokor.rundir import RunDir


def engine_class(cfg) -> type:
    """The engine for this config: DeepSpeed when cfg.deepspeed names a JSON config, else cfg.engine's."""
    return DeepSpeedEngine if cfg.deepspeed else {"ddp": TorchEngine, "fsdp": FSDPEngine}[cfg.engine]


def build_engine(model, cfg, env: Env):
    return engine_class(cfg)(model, cfg, env)


class TorchEngine:
    """Plain PyTorch: the model's fp32 weights, bf16 autocast when asked, DDP under torchrun."""

    needs_process_group = False

    def __init__(self, model, cfg, env: Env):
        self.env, self.dtype = env, resolve_dtype(cfg.dtype, env.device)
        self.module = model.to(env.device)  # the bare Transformer: its state_dict has clean keys
        self.grad_accum, self.grad_clip = cfg.grad_accum, cfg.grad_clip
        self.optimizer = build_optimizer(model, cfg)
        self.ddp = DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None) \
            if env.distributed else None
        self.name = "DDP" if self.ddp is not None else "single process"
        # Compile outside DDP: Dynamo then splits the graph at DDP's gradient buckets, so each bucket's
        # all-reduce overlaps the rest of the backward instead of waiting for all of it.
        wrapped = model if self.ddp is None else self.ddp
        self.model = torch.compile(wrapped) if cfg.compile else wrapped

    def autocast(self):
        """bf16 autocast over the fp32 master weights; fp32 runs as is."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.dtype)

    def grad_sync(self, last: bool):
        """DDP all-reduces gradients in backward; between micro-steps that is wasted traffic."""
        return nullcontext() if last or self.ddp is None else self.ddp.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()  # the accumulated gradient is the mean over micro-steps

    def step(self, step: int) -> tuple[float, bool]:
        """Set the optimizers' values for optimizer step `step` (learning rates, Muon's momentum, weight
        decay), clip and update; a non-finite gradient norm (the same on every rank) skips the update. The
        gradients are complete here (all-reduced by DDP), so every optimizer, Muon's orthogonalization
        included, sees the same gradient on every rank and the ranks stay identical."""
        self.optimizer.set_step(step)
        norm = self.clip_grad_norm()
        applied = math.isfinite(norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    def clip_grad_norm(self) -> float:
        """The gradient's norm, after scaling it down to grad_clip if it is larger (0: never)."""
        return torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip or float("inf")).item()

    def save(self, run: RunDir, state: LoopState, extras: dict) -> None:
        """last.pt, with the optimizer state inside it; gathers every rank's RNG state (a collective)."""
        state.rng = gather_objects(rng_state())
        if self.env.is_master:
            save_training(run.last, state, self.module.config, self.module.state_dict(),
                          self.optimizer.state_dict(), extras)
        barrier()

    def resume(self, run: RunDir) -> LoopState:
        ckpt, state = load_training(run.last, self.module.config)
        if ckpt["optimizer"] is None:
            flag = _engine_flag(ckpt)
            raise CheckpointError(f"{run.last} was written by a {flag} run, whose optimizer state lives in the "
                                  f"engine's own checkpoint under {run}; resume it with {flag} (and the rest of its "
                                  "command), or start fresh with --init_from=scratch or another --out_dir.")
        self.module.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"], run.last)
        return state


def _engine_flag(ckpt: dict) -> str:
    """The flag that selects the engine which wrote a training checkpoint."""
    written = ckpt.get("train_config", {})
    if written.get("deepspeed"):
        return f"--deepspeed={written['deepspeed']}"
    return f"--engine={written.get('engine', 'ddp')}"  # checkpoints from before the key: DDP


class FSDPEngine(TorchEngine):
    """PyTorch FSDP2 (`fully_shard`, as torchtitan uses it): each block, and at the root the embedding,
    head and final norm, is a unit whose parameters, gradients and optimizer state are sharded by rows
    across the ranks; a unit's whole weights are gathered just before it runs and freed after it.
    Memory per rank for weights, gradients and optimizer state falls as 1/world_size, so models larger
    than one GPU train with the default recipe: Muon's matrices stay sharded and each matrix's owner
    gathers it whole for its Newton-Schulz (nanokor/muon.py), AdamW updates its shards.

    In bf16, the weights are gathered and computed in bf16 and the gradients reduced in fp32, while
    the sharded master weights and the optimizer state stay fp32 (MixedPrecisionPolicy); autocast
    stays on for the ops it keeps in fp32. Between micro-steps the gradients are neither reduced nor
    resharded (set_requires_gradient_sync, set_reshard_after_backward): they accumulate whole, in fp32,
    and are reduce-scattered once, on the last micro-step, as DDP all-reduces once. That costs one
    unsharded fp32 gradient per rank while accumulating; with grad_accum=1 nothing is held whole.

    Checkpoints: torch.distributed.checkpoint writes every rank's shards (weights and optimizer) to
    out_dir/fsdp/step_N (written under a temporary name, renamed when complete; the previous one is
    kept until last.pt names the new one), and rank 0 writes a last.pt of full fp32 weights, so
    sample.py, export and evaluate read it as any other. A resume reads the shards back at any world
    size: torch.distributed.checkpoint reshards them.
    """

    needs_process_group = True  # a device mesh, even for one process

    def __init__(self, model, cfg, env: Env):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.env, self.dtype = env, resolve_dtype(cfg.dtype, env.device)
        self.grad_accum, self.grad_clip, self.optimizer_name = cfg.grad_accum, cfg.grad_clip, cfg.optimizer
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.dtype == torch.bfloat16 else MixedPrecisionPolicy()
        for unit in (*model.layers, model):  # the blocks first: the root shards what is left
            for p in unit.parameters():
                if not isinstance(p, DTensor):  # as DDP starts: every rank takes rank 0's initial weights
                    p.data = broadcast_from_master(p.data.to(env.device))
            if cfg.compile and unit is not model:  # each block compiled in place, before sharding (torchtitan)
                unit.compile()
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        self.module = self.model = model  # FSDP2 keeps the module and its parameter names
        self.optimizer = build_optimizer(model, cfg)
        self.name = "FSDP2"

    def grad_sync(self, last: bool):
        self.module.set_requires_gradient_sync(last)
        self.module.set_reshard_after_backward(last)
        return nullcontext()

    def clip_grad_norm(self) -> float:
        """clip_grad_norm_ over the shards: each rank's sum of squares, summed across the ranks."""
        grads = [p.grad.to_local() for p in self.module.parameters() if p.grad is not None]
        total = all_reduce_sum(torch.stack(torch._foreach_norm(grads)).square().sum()).sqrt()
        if self.grad_clip:
            torch._foreach_mul_(grads, (self.grad_clip / (total + 1e-6)).clamp(max=1.0))  # as clip_grad_norm_
        return total.item()

    def save(self, run: RunDir, state: LoopState, extras: dict) -> None:
        """The sharded checkpoint of this step, then rank 0's last.pt naming it; every rank calls it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state.rng = gather_objects(rng_state())
        path = run.fsdp_checkpoint(state.step)
        partial = path.with_name(f".{path.name}.partial")
        if self.env.is_master:
            shutil.rmtree(partial, ignore_errors=True)
        barrier()
        dcp.save(self._state_dict(), checkpoint_id=partial)
        weights = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        barrier()
        if self.env.is_master:
            shutil.rmtree(path, ignore_errors=True)
            os.replace(partial, path)
            save_training(run.last, state, self.module.config, weights, None, extras)
            # Older steps, and what a save killed midway left (its hidden .partial directory).
            for old in [*run.fsdp.glob("step_*"), *run.fsdp.glob(".step_*.partial")]:
                if old != path:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()

    def resume(self, run: RunDir) -> LoopState:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        ckpt, state = load_training(run.last, self.module.config, mmap=True)
        path, flag = run.fsdp_checkpoint(state.step), _engine_flag(ckpt)
        if flag != "--engine=fsdp":
            raise CheckpointError(f"{run.last} was written by a {flag} run, not by FSDP2. Resume it with {flag} (and "
                                  "the rest of its command), or start fresh with --init_from=scratch or another "
                                  "--out_dir.")
        if not path.is_dir():
            raise CheckpointError(f"{run.last} is step {state.step}, whose FSDP2 checkpoint {path} is missing (it "
                                  "holds the sharded optimizer state). Restore that directory, or start fresh with "
                                  "--init_from=scratch or another --out_dir.")
        saved = ckpt["train_config"]["optimizer"]
        if saved != self.optimizer_name:
            raise CheckpointError(f"{path} holds the state of optimizer={saved!r}, but this run's is "
                                  f"{self.optimizer_name!r}. Resume with --optimizer={saved}, or start a new run in "
                                  "another --out_dir.")
        sd = self._state_dict()
        dcp.load(sd, checkpoint_id=path)
        set_state_dict(self.module, self._optimizers(), model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
        return state

    def _optimizers(self) -> list:
        return list(self.optimizer.optimizers.values())

    def _state_dict(self) -> dict:
        """The sharded weights and optimizer state, keyed by parameter name (what DCP reshards by)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(self.module, self._optimizers())
        return {"model": model, "optimizer": optimizer}


class DeepSpeedEngine:
    """DeepSpeed owns bf16, accumulation, clipping and the optimizer step; nanokor still sets the lr and
    the weight decay each step.

    Engine checkpoints go to out_dir/deepspeed/step_N (the newest one is kept) with the loop state as
    client state; rank 0 also writes a consolidated fp32 last.pt, so sample.py and export work the same.
    """

    needs_process_group = True

    def __init__(self, model, cfg, env: Env):
        try:
            import deepspeed
        except ImportError:
            raise ConfigError(f"--deepspeed={cfg.deepspeed} needs the deepspeed package, which is not installed. "
                              "Install the extra with `pip install -e '.[deepspeed]'`, or drop --deepspeed to "
                              "train with plain PyTorch / DDP.") from None
        if cfg.optimizer != "adamw":
            raise ConfigError(f"optimizer={cfg.optimizer!r} runs on the PyTorch engine (one process or DDP under "
                              "torchrun); the DeepSpeed path trains with the AdamW its JSON config declares. Drop "
                              "--deepspeed, or pass --optimizer=adamw with it (and AdamW's rates: config/guide.py's "
                              "lr_factor=1.0 and embed_lr=0 are the classic ones).")
        self.env, self.dtype = env, resolve_dtype(cfg.dtype, env.device)
        ds_config = deepspeed_config(cfg, self.dtype)
        self.stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        self.name = f"DeepSpeed ZeRO-{self.stage}"
        groups = param_groups(model, cfg, schedule_peak(cfg))["adamw"]
        self.hyperparameters = Hyperparameters(cfg)
        optimizer = None if "optimizer" in ds_config else build_optimizer(model, cfg).optimizers["adamw"]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, model_parameters=groups)
        if cfg.compile:
            self.engine.compile()
        self.model = self.engine
        self.module = self.engine.module

    def autocast(self):
        return nullcontext()  # DeepSpeed casts the model itself

    def grad_sync(self, last: bool):
        return nullcontext()  # the engine counts micro-steps against gradient_accumulation_steps

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # DeepSpeed wants step() after every backward; this one only counts

    def step(self, step: int) -> tuple[float, bool]:
        self.hyperparameters.apply({"adamw": self.optimizer.param_groups}, step)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm), self.engine.was_step_applied()

    def save(self, run: RunDir, state: LoopState, extras: dict) -> None:
        """DeepSpeed's own checkpoint (optimizer partitions; the newest is kept), then rank 0's consolidated
        last.pt. Assembling the full weights from ZeRO's partitions is a collective: every rank calls it."""
        from deepspeed.utils import safe_get_full_fp32_param

        state.rng = gather_objects(rng_state())
        client_state = {**vars(state), "model_config": self.module.config.architecture()}
        tag = f"step_{state.step:07d}"
        self.engine.save_checkpoint(str(run.deepspeed), tag=tag, client_state=client_state)
        barrier()
        if self.env.is_master:
            for old in run.deepspeed.glob("step_*"):
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        full = {id(p): safe_get_full_fp32_param(p) for p in self.module.parameters()}
        weights = {name: (full[id(t)] if full.get(id(t)) is not None else t.detach()).float().cpu().clone()
                   for name, t in self.module.state_dict(keep_vars=True).items()}
        if self.env.is_master:
            save_training(run.last, state, self.module.config, weights, None, extras)
        barrier()

    def resume(self, run: RunDir) -> LoopState:
        if run.last.is_file():  # DeepSpeed's own load would fail on a shape mismatch with a bare traceback
            check_architecture(load_checkpoint(run.last, mmap=True)["model_config"], self.module.config, run.last)
        path, client_state = self.engine.load_checkpoint(str(run.deepspeed), tag=resume_tag(run.deepspeed))
        if path is None:
            raise ConfigError(f"--init_from=resume found no DeepSpeed checkpoint under {run.deepspeed}. Resume with "
                              "the same --out_dir (and --deepspeed) as the run that wrote it, or start with "
                              "--init_from=scratch.")
        check_architecture(client_state["model_config"], self.module.config, path)
        return LoopState.from_checkpoint(client_state)


def resume_tag(ds_dir: Path) -> str | None:
    """The DeepSpeed checkpoint to resume: the one `latest` names. DeepSpeed writes that file in place after
    each save, so a kill can leave it empty or torn; then the oldest step_* directory, the one a kill
    during the next save leaves whole (the older is deleted only once the newer is complete and `latest`
    names it). None when there is none: DeepSpeed's own load then reports no checkpoint."""
    try:
        tag = (ds_dir / "latest").read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        tag = ""
    if tag and (ds_dir / tag).is_dir():
        return tag
    saved = sorted(p.name for p in ds_dir.glob("step_*") if p.is_dir())
    return saved[0] if saved else None


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
