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

Each group has its own peak learning rate, stored as `lr_scale`, its ratio to the schedule's peak:
the loop sets `lr = schedule(step)` and every group follows at its own scale. The schedule's peak
(`lr` for cosine and wsd, computed for Noam) is the AdamW rate; `embed_lr` (when set) is the
embedding's peak and `muon_lr` the Muon matrices'.

Schedules are plain functions of the optimizer step, counted from 1 (the first update is step 1), so a
resumed run continues the curve from its saved step with nothing else to restore.
"""

import math
from functools import partial
from typing import Callable

import torch

from nanokor.errors import CheckpointError
from nanokor.muon import Muon

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
        group = {"name": name, "params": params, "weight_decay": decay[name], "lr_scale": scale[name]}
        if name == "matrices" and cfg.optimizer == "muon":
            groups["muon"].append({**group, "lr_scale": cfg.muon_lr / peak_lr})
        else:
            groups["adamw"].append(group)
    return {k: v for k, v in groups.items() if v}


class Optimizers:
    """The run's optimizers behind one interface: step, zero_grad, set_lr, state_dict, load_state_dict.

    The state dict is {optimizer name: its state}, so a checkpoint says which optimizers wrote it and a
    resume with another `optimizer` is refused with a message instead of failing inside torch.
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr * group["lr_scale"]

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
            opt.load_state_dict(state[name])


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
    return Optimizers(optimizers)


def muon(groups: list[dict], cfg) -> torch.optim.Optimizer:
    """torch.optim.Muon's step (Nesterov momentum, five Newton-Schulz steps, and the shape scaling
    sqrt(max(1, rows/cols)) of Keller Jordan's original), its Newton-Schulz work partitioned across the
    ranks of DDP or FSDP2 (nanokor/muon.py)."""
    return Muon(groups, lr=cfg.muon_lr, momentum=cfg.muon_momentum, nesterov=True, adjust_lr_fn="original")


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


def make_schedule(cfg) -> Callable[[int], float]:
    """The learning rate as a function of the step, as the TrainConfig `cfg` chooses it."""
    if cfg.schedule == "noam":
        return partial(noam_cooldown_lr, d_model=cfg.d_model, warmup=cfg.warmup_steps, factor=cfg.lr_factor,
                       max_steps=cfg.max_steps, frac=cfg.cooldown_frac)
    if cfg.schedule == "cosine":
        return partial(cosine_lr, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps, max_steps=cfg.max_steps)
    return partial(wsd_lr, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps, max_steps=cfg.max_steps,
                   decay_frac=cfg.decay_frac)


def schedule_peak(cfg) -> float:
    """The schedule's highest value, to which every group's `lr_scale` is relative."""
    if cfg.schedule == "noam":
        return noam_lr(cfg.warmup_steps, cfg.d_model, cfg.warmup_steps, cfg.lr_factor)
    return cfg.lr
