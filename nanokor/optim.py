"""The optimizer (AdamW over the model's parameter groups) and the learning-rate schedules.

Schedules are plain functions of the optimizer step, counted from 1 (the first update is step 1), so
the loop sets `lr = schedule(step)` before every update, on the PyTorch and the DeepSpeed path alike,
and a resumed run continues the curve from its saved step with nothing else to restore.
"""

import math
from functools import partial
from typing import Callable

import torch

from nanokor.model import Transformer


def build_optimizer(model: Transformer, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    # The fused CUDA kernel updates all parameters in one launch; on CPU the default foreach path wins.
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(model.param_groups(weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)


def noam_lr(step: int, d_model: int, warmup: int, factor: float = 1.0) -> float:
    """Vaswani et al. (2017), eq. 3: factor * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5).

    Linear warmup to a peak of factor / sqrt(d_model * warmup) at step = warmup, then decay as
    1/sqrt(step). Wider models get smaller steps, which is why d_model appears at all.
    """
    step = max(step, 1)
    return factor * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


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
        return partial(noam_lr, d_model=cfg.d_model, warmup=cfg.warmup_steps, factor=cfg.lr_factor)
    if cfg.schedule == "cosine":
        return partial(cosine_lr, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps, max_steps=cfg.max_steps)
    return partial(wsd_lr, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps, max_steps=cfg.max_steps,
                   decay_frac=cfg.decay_frac)
