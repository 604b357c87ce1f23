"""Evaluation: validation loss, perplexity and bits per byte (pure cross-entropy, never smoothed).

Bits per byte divides the summed loss (in bits) by the UTF-8 bytes of the predicted tokens, so models
with different tokenizers compare fairly. Like nanochat, tokens that stand for no text (special and
control ids, byte length 0) are left out of both sums.
"""

import math
from contextlib import nullcontext

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_loss(model, batches, token_bytes: torch.Tensor, autocast=nullcontext) -> dict:
    """Mean loss, perplexity and bits per byte over `batches` of (x, y), summed across DDP ranks.

    token_bytes: (vocab,) UTF-8 byte length of each token id, on the same device as the batches.
    """
    was_training = model.training
    model.eval()
    device = token_bytes.device
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # nats, tokens, nats with bytes, bytes
    for x, y in batches:
        with autocast():
            _, loss = model(x, y, reduction="none")
        loss = loss.double()
        valid = y >= 0
        nbytes = token_bytes[y.clamp(min=0)] * valid
        has_bytes = nbytes > 0
        totals += torch.stack([loss[valid].sum(), valid.sum().double(),
                               loss[has_bytes].sum(), nbytes.sum().double()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    model.train(was_training)
    nats, tokens, nats_with_bytes, nbytes = totals.tolist()
    if tokens == 0:
        raise ValueError("No validation tokens were scored; the validation split or token budget is empty.")
    mean = nats / tokens
    return {"loss": mean, "ppl": math.exp(min(mean, 700.0)), "bpb": nats_with_bytes / (math.log(2) * nbytes)
            if nbytes else float("nan"), "tokens": int(tokens), "bytes": int(nbytes)}
