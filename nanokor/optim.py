"""The optimizers (AdamW, or Muon for the block matrices with AdamW for the rest) and the schedules.

Which tensor gets which optimizer is decided in one place, `param_groups`:

    optimizer="adamw"  every tensor with AdamW: the block matrices and an untied LM head decay, the
                       embedding and the norms do not;
    optimizer="muon"   the 2-D weights inside the blocks (q/k/v/o, gate/up/down) with Muon
                       (torch.optim.Muon's step: momentum, then Newton-Schulz orthogonalization of the
                       update, scaled by sqrt(max(1, rows/cols)) so every shape moves its weights alike;
                       nanokor/muon.py splits the orthogonalization across ranks); the
                       embedding, the LM head and the norms with AdamW, since an orthogonalized update
                       means nothing for a lookup table, a vector, or the logits' own scale.

Each group has its own peak learning rate, stored as `lr_scale`, its ratio to the schedule's peak,
and its own peak weight decay, `weight_decay_peak`. Every step the engine calls
`Optimizers.set_step(step)`, and `Hyperparameters` sets each group's values for that step: the
learning rate of its optimizer's schedule times `lr_scale` (Muon may cool down over its own fraction of
the run), Muon's momentum (optionally warmed up), and the weight decay times the weight-decay
schedule. The schedule's peak (`lr` for cosine and wsd, computed for Noam) is the AdamW rate;
`embed_lr` (when set) is the embedding's peak and `muon_lr` the Muon matrices'.

Schedules are plain functions of the optimizer step, counted from 1 (the first update is step 1), so a
resumed run continues every curve from its saved step with nothing else to restore.
"""

import math
from functools import partial
from typing import Callable

import torch

from nanokor.errors import CheckpointError
from nanokor.muon import Muon, newton_schulz, polar_express

OPTIMIZERS = ("adamw", "muon")


def param_groups(model: torch.nn.Module, cfg, peak_lr: float) -> dict[str, list[dict]]:
    """{optimizer name: its param groups}, each group named, with its weight decay and `lr_scale`.

    A tied LM head is the embedding tensor: it appears once, in the embedding group, at the head's
    rate `lr` (the logits are where its gradient comes from), without decay.
    """
    tied = model.lm_head.weight is model.embed_tokens.weight
    named = {"embedding": [], "head": [], "norms": [], "matrices": []}
    for name, p in model.named_parameters():  # each tensor once, a tied head under embed_tokens
        if not p.requires_grad:
            continue
        if name == "embed_tokens.weight":
            named["embedding"].append(p)
        elif name == "lm_head.weight":
            named["head"].append(p)
        elif p.dim() < 2:
            named["norms"].append(p)
        else:
            named["matrices"].append(p)
    scale = {"embedding": cfg.embed_lr / peak_lr if cfg.embed_lr and not tied else 1.0,
             "head": 1.0, "norms": 1.0, "matrices": 1.0}
    decay = {"embedding": 0.0, "head": cfg.weight_decay, "norms": 0.0, "matrices": cfg.weight_decay}
    groups: dict[str, list[dict]] = {"adamw": [], "muon": []}
    for name, params in named.items():
        if not params:
            continue
        group = {"name": name, "params": params, "weight_decay": decay[name], "weight_decay_peak": decay[name],
                 "lr_scale": scale[name]}
        if name == "matrices" and cfg.optimizer == "muon":
            groups["muon"].append({**group, "lr_scale": cfg.muon_lr / peak_lr})
        else:
            groups["adamw"].append(group)
    return {k: v for k, v in groups.items() if v}


class Hyperparameters:
    """Every per-step value the optimizers take, as plain functions of the step:

        lr            each optimizer's schedule (`make_schedule`; Muon's may cool down over its own
                      `muon_cooldown_frac`) times the group's `lr_scale`;
        momentum      Muon's, warmed up linearly from `muon_momentum_start` to `muon_momentum` over the
                      first `muon_momentum_warmup` steps (modded-nanogpt, nanochat);
        weight_decay  the group's `weight_decay_peak` times `weight_decay_schedule`'s factor: constant,
                      linear or cosine to 0 at max_steps, or the group's own learning-rate curve / its peak.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.peak = schedule_peak(cfg)
        self.schedules = {name: make_schedule(cfg, name) for name in OPTIMIZERS}

    def apply(self, groups: dict[str, list[dict]], step: int) -> None:
        """Set the values for `step` in {optimizer name: its param groups}."""
        for name, param_groups in groups.items():
            lr = self.schedules[name](step)
            decay = self.weight_decay_factor(step, lr)
            for group in param_groups:
                group["lr"] = lr * group["lr_scale"]
                group["weight_decay"] = group["weight_decay_peak"] * decay
                if name == "muon":
                    group["momentum"] = self.muon_momentum(step)

    def muon_momentum(self, step: int) -> float:
        cfg = self.cfg
        if step >= cfg.muon_momentum_warmup:
            return cfg.muon_momentum
        return cfg.muon_momentum_start + (cfg.muon_momentum - cfg.muon_momentum_start) * step / cfg.muon_momentum_warmup

    def weight_decay_factor(self, step: int, lr: float) -> float:
        kind, progress = self.cfg.weight_decay_schedule, min(step / self.cfg.max_steps, 1.0)
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "lr":  # decay and rate anneal together: the decoupled step lr * wd falls as lr^2
            return lr / self.peak
        return 1.0


class Optimizers:
    """The run's optimizers behind one interface: step, zero_grad, set_step, state_dict, load_state_dict.

    The state dict is {optimizer name: its state}, so a checkpoint says which optimizers wrote it and a
    resume with another `optimizer` is refused with a message instead of failing inside torch.
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], hyperparameters: Hyperparameters):
        self.optimizers = optimizers
        self.hyperparameters = hyperparameters

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def set_step(self, step: int) -> None:
        """Learning rates, Muon's momentum and the weight decay for optimizer step `step` (from 1)."""
        self.hyperparameters.apply({name: opt.param_groups for name, opt in self.optimizers.items()}, step)

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict, where="the checkpoint") -> None:
        saved = sorted(state) if isinstance(state, dict) and "state" not in state else ["adamw (nanokor 0.1)"]
        if saved != sorted(self.optimizers):
            raise CheckpointError(f"{where} holds the state of {' + '.join(saved)}, but this run's optimizer is "
                                  f"{' + '.join(sorted(self.optimizers))}. Resume with the optimizer the run was "
                                  "started with (--optimizer=adamw or --optimizer=muon), or start a new run in "
                                  "another --out_dir.")
        for name, opt in self.optimizers.items():
            built = opt.param_groups
            opt.load_state_dict(state[name])
            for fresh, loaded in zip(built, opt.param_groups):  # keys that older checkpoints lack
                for key in ("lr_scale", "weight_decay_peak"):
                    loaded.setdefault(key, fresh[key])


def build_optimizer(model: torch.nn.Module, cfg) -> Optimizers:
    """AdamW, or Muon + AdamW, over `param_groups`, with the config's hyperparameters."""
    peak = schedule_peak(cfg)
    groups = param_groups(model, cfg, peak)
    optimizers = {}
    for name, group in groups.items():
        if name == "adamw":
            # The fused kernel, on CUDA and CPU alike: on one CPU core at bench/model_speed.py's shape a step
            # takes 14 ms against 52 for torch's default per-tensor loop there and 64 for foreach.
            optimizers[name] = torch.optim.AdamW(group, lr=peak, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                                 fused=True)
        else:
            optimizers[name] = muon(group, cfg)
    return Optimizers(optimizers, Hyperparameters(cfg))


def muon(groups: list[dict], cfg) -> torch.optim.Optimizer:
    """torch.optim.Muon's step (Nesterov momentum, five Newton-Schulz steps, and the shape scaling
    sqrt(max(1, rows/cols)) of Keller Jordan's original), its Newton-Schulz work partitioned across the
    ranks of DDP or FSDP2 (nanokor/muon.py); with the config's optional variants (muon_ns, normuon_beta2,
    muon_cautious_wd), measured and left off by recipe v2."""
    dtype = ns_dtype(cfg.muon_ns_dtype, groups[0]["params"][0].device)
    orthogonalize = {"jordan": newton_schulz, "polar_express": polar_express}[cfg.muon_ns]
    return Muon(groups, lr=cfg.muon_lr, momentum=cfg.muon_momentum, nesterov=True, adjust_lr_fn="original",
                ns_dtype=dtype, orthogonalize=partial(orthogonalize, dtype=dtype), normuon_beta2=cfg.normuon_beta2,
                cautious_wd=cfg.muon_cautious_wd)


def ns_dtype(choice: str, device: torch.device) -> torch.dtype:
    """What Newton-Schulz computes in. torch.optim.Muon uses bf16, which GPUs and CPUs with bf16 units
    (AVX-512 BF16, AMX) run fast; a CPU without them emulates bf16 matmul (on a 2-core AVX2 EPYC, 0.7
    GFLOP/s against 34 in fp32), which made Muon 2/3 of a CPU step at bench/recipe_quality.py's shape.
    fp32 there costs nothing in quality: the update is rounded to bf16 either way."""
    if choice == "auto":
        native = device.type != "cpu" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
        choice = "bf16" if native else "fp32"
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[choice]


# ---- schedules ------------------------------------------------------------------------------------

def noam_lr(step: int, d_model: int, warmup: int, factor: float = 1.0) -> float:
    """Vaswani et al. (2017), eq. 3: factor * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5).

    Linear warmup to a peak of factor / sqrt(d_model * warmup) at step = warmup, then decay as
    1/sqrt(step). Wider models get smaller steps, which is why d_model appears at all.
    """
    step = max(step, 1)
    return factor * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


def cooldown(step: int, max_steps: int, frac: float) -> float:
    """Multiplier for a linear cooldown over the last n = round(frac * max_steps) steps: 1 before them,
    then n/(n+1), (n-1)/(n+1), ..., 1/(n+1) at max_steps, so the last update is small but not zero."""
    n = round(frac * max_steps)
    start = max_steps - n  # the last step at full rate
    if n == 0 or step <= start:
        return 1.0
    return max(max_steps + 1 - step, 0) / (n + 1)


def noam_cooldown_lr(step: int, d_model: int, warmup: int, factor: float, max_steps: int, frac: float) -> float:
    """Noam, then the linear cooldown: a finite run ends at a small learning rate instead of a third of
    its peak (Noam alone never anneals)."""
    return noam_lr(step, d_model, warmup, factor) * cooldown(step, max_steps, frac)


def cosine_lr(step: int, lr: float, min_lr: float, warmup: int, max_steps: int) -> float:
    """Linear warmup to lr, then half a cosine down to min_lr at max_steps (flat afterwards)."""
    if step < warmup:
        return lr * step / warmup
    progress = min((step - warmup) / max(max_steps - warmup, 1), 1.0)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def wsd_lr(step: int, lr: float, min_lr: float, warmup: int, max_steps: int, decay_frac: float) -> float:
    """Warmup-stable-decay (Hu et al., 2024): linear warmup, a long plateau at lr, then a linear
    decay to min_lr over the last decay_frac of the run. The plateau's checkpoints can be branched
    into short decays, so one long run serves many budgets."""
    decay_start = max_steps - round(decay_frac * max_steps)
    if step < warmup:
        return lr * step / warmup
    if step <= decay_start:
        return lr
    progress = min((step - decay_start) / max(max_steps - decay_start, 1), 1.0)
    return lr + (min_lr - lr) * progress


def make_schedule(cfg, optimizer: str = "adamw") -> Callable[[int], float]:
    """The learning rate as a function of the step, as the TrainConfig `cfg` chooses it: the AdamW rate
    (the one train.py logs), or with optimizer="muon" the curve Muon's groups follow, which differs only
    in Noam's cooldown when `muon_cooldown_frac` is set."""
    if cfg.schedule == "noam":
        frac = cfg.muon_cooldown_frac if optimizer == "muon" and cfg.muon_cooldown_frac >= 0 else cfg.cooldown_frac
        return partial(noam_cooldown_lr, d_model=cfg.d_model, warmup=cfg.warmup_steps, factor=cfg.lr_factor,
                       max_steps=cfg.max_steps, frac=frac)
    if cfg.schedule == "cosine":
        return partial(cosine_lr, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps, max_steps=cfg.max_steps)
    return partial(wsd_lr, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps, max_steps=cfg.max_steps,
                   decay_frac=cfg.decay_frac)


def schedule_peak(cfg) -> float:
    """The schedule's highest value, to which every group's `lr_scale` is relative."""
    if cfg.schedule == "noam":
        return noam_lr(cfg.warmup_steps, cfg.d_model, cfg.warmup_steps, cfg.lr_factor)
    return cfg.lr
