"""The optimizer: AdamW over the model's parameter groups (fused kernels on CUDA)."""

import torch

from nanokor.model import Transformer


def build_optimizer(model: Transformer, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    # The fused CUDA kernel updates all parameters in one launch; on CPU the default foreach path wins.
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(model.param_groups(weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)
