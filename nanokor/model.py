"""The nanokor decoder: a Llama-style transformer in one file.

Read top to bottom: config, RMSNorm, rotary embedding, attention (flash-attn / SDPA / math),
SwiGLU MLP, block, model, KV cache. Module and parameter names follow Hugging Face's
`LlamaForCausalLM` exactly, so exporting is a key rename (`embed_tokens` -> `model.embed_tokens`)
and `transformers` can serve as the reference implementation in tests. No training code lives
here: the model is a plain `nn.Module` that knows nothing about DDP, DeepSpeed or optimizers.
"""

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:  # flash-attn is optional (CUDA only); SDPA is the fallback everywhere.
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None

ATTENTION_BACKENDS = ("auto", "flash", "sdpa", "math")
POSITION_ENCODINGS = ("rope", "sinusoidal")


RUNTIME = {"runtime": True}  # a field that says how the model runs or starts, not what its weights mean


@dataclass
class ModelConfig:
    # ---- the architecture: checkpoints save it, a resume must match it, export translates it ----
    vocab_size: int = 32000
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0  # 0 means n_head (plain multi-head attention); fewer gives GQA
    d_model: int = 768
    d_ff: int = 3072
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    position: str = "rope"  # rope | sinusoidal (the classic absolute baseline, for ablations)
    qk_norm: bool = False  # RMSNorm (with a learned gain) of each head's queries and keys, before RoPE: Qwen3's
    # ---- runtime: free to differ between training, a resume and inference ----
    dropout: float = field(default=0.0, metadata=RUNTIME)
    attention: str = field(default="auto", metadata=RUNTIME)  # auto | flash | sdpa | math
    gradient_checkpointing: bool = field(default=False, metadata=RUNTIME)
    init_std: float = field(default=0.02, metadata=RUNTIME)
    zero_init: bool = field(default=False, metadata=RUNTIME)  # o_proj and down_proj start at zero
    head_init_scale: float = field(default=1.0, metadata=RUNTIME)  # an untied LM head's init std / init_std

    def __post_init__(self):
        problems = [f"{key} must be positive, got {getattr(self, key)}" for key in
                    ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "max_seq_len") if getattr(self, key) <= 0]
        if self.n_kv_head < 0:
            problems.append(f"n_kv_head must be positive (or 0 for n_head), got {self.n_kv_head}")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0 or self.init_std < 0 or self.rope_theta <= 0 or self.head_init_scale < 0:
            problems.append("norm_eps and rope_theta must be positive and init_std and head_init_scale not negative")
        if problems:
            raise ValueError("Invalid model config: " + "; ".join(problems) + ".")
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.d_model % self.n_head:
            problems.append(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        elif (self.d_model // self.n_head) % 2:
            problems.append("the head dimension d_model / n_head must be even for rotary embeddings")
        if self.n_head % self.n_kv_head:
            problems.append(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.attention not in ATTENTION_BACKENDS:
            problems.append(f"attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}")
        if self.position not in POSITION_ENCODINGS:
            problems.append(f"position must be one of {POSITION_ENCODINGS}, got {self.position!r}")
        if self.attention == "flash" and flash_attn_func is None:
            problems.append("attention='flash' needs the flash-attn package (pip install -e '.[flash]' on a "
                            "CUDA machine); use attention='auto' or 'sdpa' to fall back to PyTorch's SDPA")
        if problems:
            raise ValueError("Invalid model config: " + "; ".join(problems) + ".")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def architecture(self) -> dict:
        """The architecture fields and their values: what a checkpoint stores as `model_config`."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("runtime")}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """From a checkpoint's `model_config`. Runtime fields that older checkpoints also stored are
        dropped: the model runs with this machine's defaults (a flash-attn run loads where SDPA is all
        there is)."""
        runtime = {f.name for f in fields(cls) if f.metadata.get("runtime")}
        known = {f.name for f in fields(cls)} - runtime
        unknown = set(d) - known - runtime
        if unknown:
            raise ValueError(f"Unknown model config keys {sorted(unknown)}; valid keys: {sorted(known)}.")
        return cls(**{k: v for k, v in d.items() if k in known})


class RMSNormFunction(torch.autograd.Function):
    """y = x * rstd * w with rstd = (mean(x^2) + eps)^-1/2, for fp32 x, with a backward of few passes:

        dw = sum_n rstd_n dy_n x_n          dx = rstd (dy w - x rstd^2 (dy x . w) / D)

    Both sums over dy * x are matrix-vector products, so the backward reads the activations six times
    and the forward three, fewer than autograd's graph of F.rms_norm's pieces: forward + backward over
    16 x 256 x 256 on one CPU core takes 3.3 ms against 8.5. Eager only: compiled, Inductor fuses the
    plain form better still.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        rstd = (torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_() / x.size(-1) + eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).mul_(weight)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        d = x.size(-1)
        dyx = (dy * x).reshape(-1, d)  # dy may come permuted (the k of grouped-query attention)
        grad_w = rstd.view(1, -1) @ dyx
        coef = rstd.square() * (dyx @ weight).view(rstd.shape) / d
        grad_x = (dy * weight).addcmul_(x, coef, value=-1).mul_(rstd)
        return grad_x, grad_w.view(weight.shape), None


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale; computed in fp32 like Llama for bf16 stability."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # the common fp32 path: no casts
            if torch.compiler.is_compiling():  # Inductor fuses the plain form into fewer passes still
                return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
            return RMSNormFunction.apply(x, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_len, head_dim) in Llama's rotate-half layout (frequencies repeated)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1) for the halves x1, x2 of the last dim;
    sign=-1 rotates by minus the angles. Written as one product and two in-place half updates, since
    the tables repeat their frequencies (sin[..., :D/2] == sin[..., D/2:])."""
    half = x.size(-1) // 2
    out, s = x * cos, sin[..., :half]
    out[..., :half].addcmul_(x[..., half:], s, value=-sign)
    out[..., half:].addcmul_(x[..., :half], s, value=sign)
    return out


class Rotary(torch.autograd.Function):
    """Rotary embedding with its own backward, the rotation by minus the angles: three ops each way,
    where autograd's graph of chunk, neg, cat, two products and a sum takes six forward and more
    backward, and keeps x for it (the tables are all this keeps). Forward + backward over
    16 x 256 x 4 x 64 on one CPU core: 2.8 ms against 5.1."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotate(grad, cos, sin, sign=-1), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (B, T, H, D) by position; cos/sin are (T, 1, D)."""
    return Rotary.apply(x, cos.to(x.dtype), sin.to(x.dtype))


def sinusoidal_positions(max_len: int, dim: int) -> torch.Tensor:
    """The original Transformer's absolute encoding: sin on even, cos on odd dimensions."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    pe = torch.zeros(max_len, dim)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq)
    return pe


class KVCache:
    """Keys and values of every layer for incremental decoding: prefill once, then one token a step.

    One (B, n_kv_head, max_len, head_dim) tensor per layer for keys and one for values, the layout SDPA
    reads without copies. `pos` counts the tokens already cached; the model advances it after each
    forward. New entries are written with index_copy_ at explicit positions: under torch.compile that
    stays an in-place write of the new rows, where a slice assignment made the compiled step copy the
    whole cache, so each token cost time in proportion to max_len.

    static=True fixes every shape of a one-token step, so one compiled graph (and one CUDA graph) serves
    every step: `pos` is a tensor on the device, the step's attention reads the whole buffer through a
    mask of the positions filled so far, and the buffers keep their addresses (marked so for
    torch.compile's CUDA graphs). Longer chunks (the prefill, always eager) and eager decoding read the
    filled prefix alone, with plain causal attention when the cache was empty.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype, static: bool = False):
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.static = static
        self.pos = torch.zeros((), dtype=torch.long, device=device) if static else 0
        if static:
            for t in (*self.k, *self.v, self.pos):
                torch._dynamo.mark_static_address(t)

    def positions(self, T: int, device) -> torch.Tensor:
        """Positions (T,) of the next T tokens."""
        return torch.arange(T, device=device) + self.pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write (B, n_kv_head, T, D) keys/values at `pos`; return the keys and values attention reads and
        its mask (T, keys), True where allowed, or None where the new tokens are the last T of those keys
        (causal attention aligned bottom-right)."""
        positions = self.positions(k.size(2), k.device)
        self.k[layer].index_copy_(2, positions, k)
        self.v[layer].index_copy_(2, positions, v)
        if self.static and k.size(2) == 1:  # the compiled or captured step: every shape fixed
            return self.k[layer], self.v[layer], torch.arange(self.max_len, device=k.device) <= positions[:, None]
        end = int(self.pos) + k.size(2)  # eager, e.g. a prefill: reading pos costs one sync per forward
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end], None

    def keep(self, n: int, source: "KVCache | None" = None) -> None:
        """Keep the first n cached positions (copied from `source`, another cache of the same batch and
        dtype, if given): the next forward writes after them. Entries past n are never read again."""
        if source is not None:
            for dst, src in zip((*self.k, *self.v), (*source.k, *source.v)):
                dst[:, :, :n].copy_(src[:, :, :n])
        if self.static:
            self.pos.fill_(n)
        else:
            self.pos = n


def causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Boolean mask (q_len, kv_len), True where attention is allowed; queries are the last q_len keys."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return torch.arange(kv_len, device=device)[None, :] <= q_pos


def math_attention(q, k, v, dropout_p: float = 0.0, mask: torch.Tensor | None = None):
    """The readable reference: softmax(q k^T / sqrt(d) + mask) v, causal unless a mask is given.
    Returns output and weights."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    if mask is None:
        mask = causal_mask(q.size(-2), k.size(-2), q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return F.dropout(weights, dropout_p) @ v, weights


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.backend = config.attention
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.d_model, config.n_head * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_head * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_head * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.d_model, bias=False)
        self.qk_norm = config.qk_norm
        if config.qk_norm:  # Qwen3's q_norm / k_norm: one gain per head dimension, shared by the heads
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, layer: int = 0, need_weights: bool = False):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm:
            # Before the rotation, as Qwen3 does: RoPE keeps each head's norm, so the normalisation is the same
            # either way, but a learned gain that is not symmetric in the rotated pairs is not.
            # Back to q's dtype: under bf16 autocast the fp32 gain would make them fp32 (and v, the cache bf16).
            q, k = self.q_norm(q).to(q.dtype), self.k_norm(k).to(k.dtype)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        dropout_p = self.dropout if self.training else 0.0

        if self._use_flash(q, kv_cache, need_weights):
            y = flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)  # (B, T, H, D), GQA native
            return self.o_proj(y.reshape(B, T, -1)), None

        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        mask = None
        if kv_cache is not None:
            k, v, mask = kv_cache.update(layer, k, v)
        weights = None
        if self.backend == "math" or need_weights:
            y, weights = math_attention(q, self._repeat_kv(k), self._repeat_kv(v), dropout_p, mask)
        else:
            y = self._sdpa(q, k, v, dropout_p, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), weights

    def _sdpa(self, q, k, v, dropout_p, mask):
        gqa = {"enable_gqa": True} if self.n_kv_head != self.n_head else {}  # SDPA shares k/v heads itself
        if mask is None and q.size(2) == k.size(2):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, **gqa)
        # Against a cache: SDPA's is_causal aligns top-left, so pass the mask (one new token may see
        # everything cached and needs none).
        if mask is None and q.size(2) > 1:
            mask = causal_mask(q.size(2), k.size(2), q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, **gqa)

    def _use_flash(self, q, kv_cache, need_weights) -> bool:
        return (self.backend in ("auto", "flash") and flash_attn_func is not None and q.is_cuda
                and q.dtype in (torch.float16, torch.bfloat16) and kv_cache is None and not need_weights)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        """Share each key/value head across n_head / n_kv_head query heads (grouped-query attention)."""
        n_rep = self.n_head // self.n_kv_head
        if n_rep == 1:
            return x
        B, H, T, D = x.shape
        return x[:, :, None].expand(B, H, n_rep, T, D).reshape(B, H * n_rep, T, D)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@torch.library.custom_op("nanokor::linear_cross_entropy", mutates_args=())
def _loss_and_gradients(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor,
                        smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of x @ w^T against targets (ignore_index=-1, optional label smoothing), with
    the gradients for x and w computed in the same pass, one chunk of rows at a time.

    The plain path writes the (N, vocab) fp32 logits, their log-softmax, a zero-filled gradient and
    the gradient of the logits: five passes over the largest tensor of the step, all memory-bound.
    Here each chunk's logits are exponentiated, normalised and turned into their gradient
    (softmax - (1 - eps) onehot - eps / V) in place while they are still in cache, then consumed by
    the two gradient matmuls. A chunk holds about as many logits as x has elements, so memory stays at
    the size of the activations whatever the vocabulary.

    A custom op, so torch.compile calls it as it is instead of tracing the loop: traced, each chunk's
    in-place accumulation into grad_w became a fresh buffer plus a copy of all of grad_w (92 ms of a
    2.1 s CPU step at bench/model_speed.py's shape), and compiling took longer.
    """
    n, vocab = x.size(0), w.size(0)
    chunk = 1 << max(0, math.ceil(math.log2(max(1, n * x.size(1) // vocab))))
    valid = targets >= 0
    count = valid.sum().clamp(min=1)
    grad_x, grad_w = torch.empty_like(x), torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    total = torch.zeros((), dtype=torch.float64, device=x.device)  # the mean of many terms, exactly
    with torch.autocast(x.device.type, enabled=False):
        for start in range(0, n, chunk):
            xc, tc = x[start:start + chunk], targets[start:start + chunk].clamp(min=0)[:, None]
            z = (xc @ w.T).float()
            z -= z.amax(-1, keepdim=True)  # logits shifted by their max: exp cannot overflow
            loss = -z.gather(1, tc).squeeze(1)
            if smoothing:
                loss = (1 - smoothing) * loss - smoothing * z.mean(-1)
            z.exp_()
            norm = z.sum(-1, keepdim=True)
            loss += norm.log().squeeze(1)  # log-sum-exp of the shifted logits
            weight = (valid[start:start + chunk] / count)[:, None]
            total += (loss.double() * valid[start:start + chunk]).sum() / count
            z *= weight / norm  # the softmax, already scaled by each row's weight in the mean
            if smoothing:
                z -= weight * (smoothing / vocab)
            z.scatter_add_(1, tc, weight * (smoothing - 1))
            dz = z.to(x.dtype)
            torch.mm(dz, w, out=grad_x[start:start + chunk])
            if dz.dtype == torch.float32:
                grad_w.addmm_(dz.T, xc)
            else:  # bf16 products, summed in fp32 over the chunks
                grad_w += (dz.T @ xc).float()
    return total.float(), grad_x, grad_w.to(w.dtype)


@_loss_and_gradients.register_fake
def _(x, w, targets, smoothing):
    return x.new_empty((), dtype=torch.float32), torch.empty_like(x), torch.empty_like(w)


class LinearCrossEntropy(torch.autograd.Function):
    """The loss of `_loss_and_gradients`, whose backward scales the gradients it computed already."""

    @staticmethod
    def forward(ctx, x, w, targets, smoothing: float):
        loss, grad_x, grad_w = _loss_and_gradients(x, w, targets, smoothing)
        ctx.save_for_backward(grad_x, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss, None, None


def linear_cross_entropy(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0):
    """`LinearCrossEntropy` in the precision autocast would compute the LM head in."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    return LinearCrossEntropy.apply(x, w, targets, smoothing)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, kv_cache=None, layer=0, need_weights=False):
        h, weights = self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, layer, need_weights)
        x = x + self.dropout(h)
        x = x + self.dropout(self.mlp(self.post_attention_layernorm(x)))
        return x, weights


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.dropout = nn.Dropout(config.dropout)
        # Position tables are derived from the config, so they are not saved in the state dict.
        if config.position == "rope":
            cos, sin = rope_cos_sin(config.head_dim, config.max_seq_len, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.register_buffer("abs_pos", sinusoidal_positions(config.max_seq_len, config.d_model),
                                 persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        """Normal(0, init_std) everywhere and the norms' gains at 1; residual output projections shrunk by
        1/sqrt(2 * n_layer) so the residual stream's variance does not grow with depth (GPT-2 / nanoGPT),
        or zero with zero_init (modded-nanogpt: each block starts as the identity); an untied LM head at
        init_std * head_init_scale (small: the first logits are nearly uniform)."""
        c = self.config
        for name, p in self.named_parameters():
            if p.dim() == 1:  # every vector is a norm's gain
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, 0.0 if c.zero_init else c.init_std / math.sqrt(2 * c.n_layer))
            elif name == "lm_head.weight":  # untied: a tied head is embed_tokens.weight, named once
                nn.init.normal_(p, 0.0, c.init_std * c.head_init_scale)
            else:
                nn.init.normal_(p, 0.0, c.init_std)

    def forward(self, idx, targets=None, *, kv_cache: KVCache | None = None,
                label_smoothing: float = 0.0, reduction: str = "mean", last_only: bool = False,
                loss_only: bool = False):
        """Logits (B, T, vocab) and, with targets, the cross-entropy (ignore_index=-1).

        loss_only=True (training: the mean loss, gradients on) never materialises the logits and returns
        None for them: `linear_cross_entropy` computes the loss and its gradients a chunk of rows at a time.
        reduction='none' returns per-token losses of shape (B, T), which bits per byte needs.
        With a kv_cache, idx continues the cached sequence and the cache advances by T.
        last_only=True returns the last position's logits alone, (B, 1, vocab): all that generation
        needs after a prefill, where the LM head over a whole long prompt would cost as much as a layer.
        """
        if last_only and targets is not None:
            raise ValueError("last_only=True computes one position's logits; a loss needs all of them.")
        x = self._hidden_states(idx, kv_cache)
        if loss_only and targets is not None and reduction == "mean" and torch.is_grad_enabled():
            return None, linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.reshape(-1),
                                              label_smoothing)
        logits = self.lm_head(x[:, -1:] if last_only else x)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, label_smoothing=label_smoothing, reduction=reduction)
        return logits, loss.view(targets.shape) if reduction == "none" else loss

    def _hidden_states(self, idx, kv_cache=None, attention_maps: list | None = None):
        T = idx.size(1)
        if kv_cache is None or not kv_cache.static:  # a static cache's length, checked when made, bounds it
            start = kv_cache.pos if kv_cache is not None else 0
            if start + T > self.config.max_seq_len:
                raise ValueError(f"Sequence of {start + T} tokens exceeds the model's max_seq_len "
                                 f"({self.config.max_seq_len}); shorten the input or the generation length.")
        # Rows of the position tables: a slice, or an index where the cache says where the tokens go.
        rows = slice(0, T) if kv_cache is None else kv_cache.positions(T, idx.device)
        x = self.embed_tokens(idx)
        cos = sin = None
        if self.config.position == "rope":
            cos, sin = self.rope_cos[rows, None], self.rope_sin[rows, None]
        else:
            x = x + self.abs_pos[rows].to(x.dtype)
        x = self.dropout(x)
        need_weights = attention_maps is not None
        for i, block in enumerate(self.layers):
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, w = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x, w = block(x, cos, sin, kv_cache, i, need_weights)
            if need_weights:
                attention_maps.append(w)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.norm(x)

    @torch.no_grad()
    def attention_maps(self, idx) -> list[torch.Tensor]:
        """Per-layer attention weights (B, n_head, T, T) for inspection, computed by the math backend."""
        maps = []
        self._hidden_states(idx, attention_maps=maps)
        return maps

    def make_kv_cache(self, batch_size: int, max_len: int | None = None, dtype=None, static: bool = False) -> KVCache:
        max_len = max_len or self.config.max_seq_len
        if max_len > self.config.max_seq_len:
            raise ValueError(f"A KV cache of {max_len} positions exceeds the model's max_seq_len "
                             f"({self.config.max_seq_len}); make it at most that long.")
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, p.device, dtype or p.dtype, static)

    # ---- accounting -------------------------------------------------------------------------

    def num_params(self, include_embedding: bool = True) -> int:
        """Unique parameters (a tied LM head is counted once)."""
        n = sum(p.numel() for p in self.parameters())
        if not include_embedding:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N for the matmuls (N counts every matmul weight, the LM head
        included even when tied, but not the embedding lookup) plus 12 * L * d * T for attention
        scores and values (PaLM appendix B; the causal half is not discounted)."""
        c = self.config
        T = seq_len or c.max_seq_len
        n_matmul = self.num_params(include_embedding=False)
        if c.tie_embeddings:
            n_matmul += self.lm_head.weight.numel()
        return 6 * n_matmul + 12 * c.n_layer * c.d_model * T
