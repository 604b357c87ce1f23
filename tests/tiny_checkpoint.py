"""A tiny checkpoint for the sample/export/evaluate/plot tests (a helper, not a test module).

The weights are random but drawn with a large init_std, so logits are spread out (top-1 leads
top-2 by about 1 nat) and greedy decoding picks varied tokens with no near-ties: comparisons with
transformers then test the math, not rounding. Training it instead would cost tens of seconds on
two busy CPU cores for nothing the tests check.
"""

from pathlib import Path

import torch

from nanokor.checkpoint import save_checkpoint
from nanokor.model import ModelConfig, Transformer

TINY = dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=160, max_seq_len=128, init_std=0.3)


def tiny_model(vocab_size: int, seed: int = 0, random_gains: bool = False, **overrides) -> Transformer:
    """random_gains: every norm's gain drawn from U(0.5, 1.5) instead of 1, so an export that dropped a
    gain, or applied it in another place (a q/k norm after RoPE instead of before), would show."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=vocab_size, **{**TINY, **overrides})).eval()
    if random_gains:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.uniform_(0.5, 1.5)
    return model


def make_checkpoint(path: Path, tokenizer, *, chat: bool = False, **overrides) -> Path:
    """Save a tiny model for `tokenizer` as a nanokor checkpoint at `path` (overrides: tiny_model's);
    chat=True marks it as SFT marks its checkpoints (a chat model) without training it."""
    model = tiny_model(tokenizer.vocab_size, **overrides)
    save_checkpoint({"model_config": model.config.architecture(), "model": model.state_dict(),
                     "tokenizer": tokenizer.model_bytes, "train_config": {}, **({"chat": True} if chat else {})},
                    path)
    return path
