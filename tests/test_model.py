"""The decoder against independent references: transformers' Llama (and Qwen3 for qk_norm), explicit math,
and formulas."""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from nanokor.export import hf_config
from nanokor.export_spec import hf_state_dict
from nanokor.device import estimate_mfu, peak_flops
from nanokor.model import ModelConfig, Transformer, apply_rope, flash_attn_func, rope_cos_sin

PARITY_CONFIGS = {
    "mha-untied": dict(vocab_size=512, n_layer=2, n_head=4, n_kv_head=4, d_model=64, d_ff=176),
    "gqa-tied-odd-vocab": dict(vocab_size=1013, n_layer=3, n_head=4, n_kv_head=2, d_model=64, d_ff=160,
                               tie_embeddings=True, rope_theta=500000.0),
    "mqa-theta-1e6": dict(vocab_size=777, n_layer=2, n_head=6, n_kv_head=1, d_model=96, d_ff=200,
                          rope_theta=1e6, norm_eps=1e-6),
    "qk-norm-gqa": dict(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=176, qk_norm=True),
}


def random_gains(model: Transformer) -> Transformer:
    """Norm gains away from 1, different for the two halves RoPE pairs: a q/k norm applied after the
    rotation instead of before it (Qwen3's order) would then compute different logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=301, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, max_seq_len=64)
    return ModelConfig(**{**base, **overrides})


def hf_twin(model: Transformer):
    """transformers' model of the architecture the export names (Llama, or Qwen3 for qk_norm), with the
    same weights."""
    fields = hf_config(model.config)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**fields))
    assert type(hf).__name__ == fields["architectures"][0]
    hf.config._attn_implementation = "eager"  # the plainest reference path
    result = hf.load_state_dict(hf_state_dict(model), strict=False)
    expected_missing = ["lm_head.weight"] if model.config.tie_embeddings else []
    assert result.missing_keys == expected_missing and not result.unexpected_keys
    return hf.eval()


@pytest.mark.parametrize("name", PARITY_CONFIGS)
def test_logits_and_loss_match_transformers_llama(name):
    torch.manual_seed(0)
    model = random_gains(Transformer(ModelConfig(max_seq_len=128, **PARITY_CONFIGS[name])).eval())
    hf = hf_twin(model)
    idx = torch.randint(0, model.config.vocab_size, (2, 100))
    # nanokor takes pre-shifted targets; -1 marks the last position, which has no next token.
    targets = torch.cat([idx[:, 1:], torch.full((2, 1), -1)], dim=1)
    with torch.no_grad():
        logits, loss = model(idx, targets)
        ref = hf(input_ids=idx, labels=idx)
    assert (logits - ref.logits).abs().max().item() <= 1e-4
    assert abs(loss.item() - ref.loss.item()) <= 1e-5


@pytest.mark.parametrize("name", ["mha-untied", "gqa-tied-odd-vocab", "qk-norm-gqa"])
def test_gradients_match_transformers_llama_in_fp32(name):
    """The hand-written backwards (RMSNorm, rotary, the fused head + loss) against autograd through
    transformers' own Llama (Qwen3 for qk_norm): every parameter's gradient."""
    torch.manual_seed(0)
    model = random_gains(Transformer(ModelConfig(max_seq_len=128, **PARITY_CONFIGS[name])))
    hf = hf_twin(model)
    idx = torch.randint(0, model.config.vocab_size, (2, 64))
    targets = torch.cat([idx[:, 1:], torch.full((2, 1), -1)], dim=1)
    model(idx, targets, loss_only=True)[1].backward()
    hf(input_ids=idx, labels=idx).loss.backward()
    ours = dict(model.named_parameters())
    for hf_name, p in hf.named_parameters():
        grad = ours[hf_name.removeprefix("model.")].grad
        assert (grad - p.grad).abs().max().item() <= 1e-4 * p.grad.abs().max().item(), hf_name


@pytest.mark.parametrize("shape, permuted", [((16, 64), False), ((2, 9, 48), False), ((2, 9, 3, 16), True)])
def test_rmsnorm_backward_matches_float64_autograd_of_the_formula(shape, permuted):
    """permuted: the gradient arrives with (B, H, T, D) strides, as k_norm's does under grouped-query
    attention (its view(-1, D) failed there)."""
    from nanokor.model import RMSNormFunction
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(shape[-1], dtype=torch.float64) + 0.5).requires_grad_()
    dy = torch.randn(*shape, dtype=torch.float64)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    ref_dx, ref_dw = torch.autograd.grad(ref, (x, w), dy)
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y = RMSNormFunction.apply(xf, wf, 1e-5)
    dyf = dy.float().transpose(1, 2).contiguous().transpose(1, 2) if permuted else dy.float()
    dx, dw = torch.autograd.grad(y, (xf, wf), dyf)
    for got, want in ((y, ref), (dx, ref_dx), (dw, ref_dw)):
        assert (got.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_rotary_backward_is_the_inverse_rotation_of_the_rotate_half_formula():
    cos, sin = rope_cos_sin(16, 12, 10000.0)
    cos, sin = cos[:, None].double(), sin[:, None].double()
    x = torch.randn(3, 12, 2, 16, dtype=torch.float64, requires_grad=True)
    dy = torch.randn_like(x)
    x1, x2 = x.chunk(2, dim=-1)
    ref = x * cos + torch.cat((-x2, x1), dim=-1) * sin  # Llama's rotate_half form
    y = apply_rope(x, cos, sin)
    assert torch.allclose(y, ref, atol=1e-12)
    assert torch.allclose(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(ref, x, dy)[0], atol=1e-12)


def test_sdpa_and_math_backends_agree_forward_and_backward():
    torch.manual_seed(0)
    sdpa = Transformer(tiny(attention="sdpa"))
    ref = Transformer(tiny(attention="math"))
    ref.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 301, (3, 50))
    results = []
    for model in (sdpa, ref):
        logits, loss = model(idx, idx)
        loss.backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    (la, ga), (lb, gb) = results
    assert torch.allclose(la, lb, atol=1e-5)
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-6, rtol=1e-4), n


@pytest.mark.parametrize("attention", ["sdpa", "math"])
@pytest.mark.parametrize("position", ["rope", "sinusoidal"])
def test_causality_future_tokens_do_not_change_past_logits(attention, position):
    torch.manual_seed(0)
    model = Transformer(tiny(attention=attention, position=position)).eval()
    idx = torch.randint(0, 301, (1, 40))
    t = 20
    changed = idx.clone()
    changed[0, t + 1:] = (changed[0, t + 1:] + 7) % 301
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    assert torch.allclose(a[0, :t + 1], b[0, :t + 1], atol=1e-6)
    assert not torch.allclose(a[0, t + 1:], b[0, t + 1:], atol=1e-3)


def test_rope_scores_depend_only_on_relative_offset():
    torch.manual_seed(0)
    head_dim = 32
    cos, sin = rope_cos_sin(head_dim, 256, 10000.0)
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)

    def score(m, n):
        qm = apply_rope(q.view(1, 1, 1, -1), cos[m:m + 1, None].double(), sin[m:m + 1, None].double())
        kn = apply_rope(k.view(1, 1, 1, -1), cos[n:n + 1, None].double(), sin[n:n + 1, None].double())
        return (qm * kn).sum().item()

    for m, n in [(5, 2), (40, 9), (100, 100), (3, 70)]:
        for shift in (1, 17, 120):
            assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-4)
    assert abs(score(10, 0) - score(10, 5)) > 1e-3  # a different offset gives a different score


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("overrides", [dict(), dict(n_kv_head=1), dict(position="sinusoidal"), dict(attention="math"),
                                       dict(qk_norm=True)])
def test_kv_cache_decoding_reproduces_full_forward(overrides, static):
    torch.manual_seed(0)
    model = random_gains(Transformer(tiny(**overrides)).eval())
    idx = torch.randint(0, 301, (2, 30))
    with torch.no_grad():
        full = model(idx)[0]
        cache = model.make_kv_cache(batch_size=2, static=static)
        if static:  # garbage where nothing was written yet: the mask must keep attention off it
            for t in (*cache.k, *cache.v):
                t.normal_(0, 100)
        steps = [model(idx[:, :12], kv_cache=cache)[0]]  # prefill
        steps.append(model(idx[:, 12:17], kv_cache=cache)[0])  # a chunk continuing the cache
        steps += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(17, 30)]  # one token a step
    assert int(cache.pos) == 30 and torch.is_tensor(cache.pos) == static
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_kv_cache_longer_than_the_context_is_refused():
    model = Transformer(tiny(max_seq_len=16))
    with pytest.raises(ValueError, match="at most that long"):
        model.make_kv_cache(batch_size=1, max_len=17, static=True)


def test_last_only_gives_the_last_positions_logits_and_refuses_targets():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    idx = torch.randint(0, 301, (2, 30))
    with torch.no_grad():
        full = model(idx)[0]
        cache = model.make_kv_cache(batch_size=2)
        last = model(idx[:, :20], kv_cache=cache, last_only=True)[0]  # a prefill, as generation does
        after = model(idx[:, 20:21], kv_cache=cache)[0]
    assert last.shape == (2, 1, 301) and torch.allclose(last, full[:, 19:20], atol=1e-5)
    assert torch.allclose(after, full[:, 20:21], atol=1e-5)  # the cache advanced over the whole prompt
    with pytest.raises(ValueError, match="a loss needs all of them"):
        model(idx, idx, last_only=True)


def test_sequence_longer_than_max_seq_len_is_refused_clearly():
    model = Transformer(tiny(max_seq_len=16)).eval()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = Transformer(tiny(vocab_size=64, n_layer=2, d_model=64))
    x = torch.randint(0, 64, (4, 32))
    y = torch.randint(0, 64, (4, 32))  # random targets: only memorisation can fit them
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 < math.log(64)


def test_per_token_losses_and_label_smoothing_match_formulas():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    idx = torch.randint(0, 301, (2, 20))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -1
    with torch.no_grad():
        logits, per_token = model(idx, targets, reduction="none")
        _, mean = model(idx, targets)
        _, smoothed = model(idx, targets, label_smoothing=0.1)
    logp = torch.log_softmax(logits.double(), dim=-1)
    valid = targets >= 0
    nll = -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    assert per_token.shape == (2, 20) and (per_token[~valid] == 0).all()
    assert torch.allclose(per_token[valid].double(), nll[valid], atol=1e-5)
    assert mean.item() == pytest.approx(nll[valid].mean().item(), abs=1e-5)
    expected = (0.9 * nll - 0.1 * logp.mean(-1))[valid].mean().item()  # uniform smoothing over the vocab
    assert smoothed.item() == pytest.approx(expected, abs=1e-5)


def test_gradient_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    plain = Transformer(tiny())
    ckpt = Transformer(tiny(gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 301, (2, 24))
    for model in (plain, ckpt):
        model(idx, idx)[1].backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-7), n


def test_attention_maps_are_causal_distributions():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    maps = model.attention_maps(torch.randint(0, 301, (1, 12)))
    assert len(maps) == 2 and maps[0].shape == (1, 4, 12, 12)
    for w in maps:
        assert torch.allclose(w.sum(-1), torch.ones(1, 4, 12), atol=1e-6)
        assert (w.triu(diagonal=1) == 0).all()


def test_residual_projections_are_scaled_down_with_depth():
    torch.manual_seed(0)
    model = Transformer(tiny(n_layer=8, d_model=256, d_ff=512))
    std = model.config.init_std
    assert model.layers[0].mlp.up_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.layers[0].self_attn.o_proj.weight.std().item() == pytest.approx(std / 4, rel=0.05)
    assert model.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(std / 4, rel=0.05)
    assert model.lm_head.weight.std().item() == pytest.approx(std, rel=0.05)


def test_zero_init_and_a_small_head_change_only_their_own_tensors():
    torch.manual_seed(0)
    plain = Transformer(tiny(n_layer=4, d_model=256, d_ff=512, vocab_size=1000))
    torch.manual_seed(0)
    model = Transformer(tiny(n_layer=4, d_model=256, d_ff=512, vocab_size=1000, zero_init=True, head_init_scale=0.05,
                             qk_norm=True))
    assert model.lm_head.weight.std().item() == pytest.approx(0.02 * 0.05, rel=0.05)
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert (p == 0).all(), name
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            assert (p == 1).all() and p.shape == (64,), name
        elif name != "lm_head.weight":  # the same draws as without the options
            assert torch.equal(p, dict(plain.named_parameters())[name]), name
    # Each block starts as the identity, so the hidden states are the normed embeddings.
    idx = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        assert torch.allclose(model._hidden_states(idx), model.norm(model.embed_tokens(idx)), atol=1e-6)
    with pytest.raises(ValueError, match="head_init_scale"):
        tiny(head_init_scale=-1.0)


@pytest.mark.parametrize("tie", [False, True])
def test_param_count_and_flops(tie):
    c = tiny(tie_embeddings=tie)
    model = Transformer(c)
    d, f, L, V, kv = c.d_model, c.d_ff, c.n_layer, c.vocab_size, c.n_kv_head * c.head_dim
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    assert model.num_params() == V * d * (1 if tie else 2) + L * per_layer + d
    matmul_params = L * per_layer + d + V * d  # the LM head counts as a matmul even when tied
    assert model.flops_per_token(seq_len=50) == 6 * matmul_params + 12 * L * d * 50


def test_mfu_uses_known_peaks_and_declines_unknown_devices():
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", torch.float32) == 19.5e12
    assert estimate_mfu(1e9, 494.5e3, "NVIDIA H200", torch.bfloat16) == pytest.approx(0.5)
    assert estimate_mfu(1e9, 1e3, "cpu", torch.float32) is None
    assert peak_flops("NVIDIA L40S", torch.bfloat16) == 362e12 and peak_flops("NVIDIA L4", torch.bfloat16) == 121e12
    # Hopper variants by the names torch reports: the NVL card is slower than the SXM module, and a
    # Grace Hopper superchip has the SXM rates (datasheets: bf16 dense 835 / 989, fp32 60 / 67).
    assert peak_flops("NVIDIA H200", torch.bfloat16) == 989e12
    assert peak_flops("NVIDIA H200 NVL", torch.bfloat16) == 835e12
    assert peak_flops("NVIDIA GH200 480GB", torch.bfloat16) == 989e12
    assert peak_flops("NVIDIA GH200 144G HBM3e", torch.bfloat16) == 989e12
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32, as train.py sets on CUDA
        assert peak_flops("NVIDIA A100-SXM4-80GB", torch.float32) == 156e12
        assert peak_flops("NVIDIA H200 NVL", torch.float32) == 417.5e12
        torch.set_float32_matmul_precision("highest")
        assert peak_flops("NVIDIA H200 NVL", torch.float32) == 60e12
        assert peak_flops("NVIDIA GH200 480GB", torch.float32) == 67e12
    finally:
        torch.set_float32_matmul_precision(precision)


def test_invalid_configs_are_refused_with_clear_messages():
    with pytest.raises(ValueError, match="divisible by n_head"):
        ModelConfig(d_model=100, n_head=3)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        ModelConfig(n_head=12, n_kv_head=5)
    with pytest.raises(ValueError, match="attention must be one of"):
        ModelConfig(attention="fast")
    with pytest.raises(ValueError, match="Unknown model config keys"):
        ModelConfig.from_dict({"d_modle": 8})
    if flash_attn_func is None:
        with pytest.raises(ValueError, match="flash-attn"):
            ModelConfig(attention="flash")


def test_sinusoidal_ablation_cannot_be_exported():
    with pytest.raises(ValueError, match="position='rope'"):
        hf_config(tiny(position="sinusoidal"))


def test_bf16_autocast_forward_stays_close_to_fp32():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    idx = torch.randint(0, 301, (2, 32))
    with torch.no_grad():
        ref, ref_loss = model(idx, idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, low_loss = model(idx, idx)
    assert low_loss.dtype == torch.float32
    assert abs(low_loss.item() - ref_loss.item()) < 2e-2
    assert F.cosine_similarity(low.float().flatten(), ref.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_head_and_loss_match_the_plain_path_in_float64(smoothing):
    """Training runs the LM head and the loss chunk by chunk (linear_cross_entropy); its loss and
    gradients must be the plain logits -> cross_entropy ones, computed here in float64."""
    from nanokor.model import linear_cross_entropy

    torch.manual_seed(0)
    n, d, vocab = 700, 48, 1000  # 700 rows: several chunks and a short last one
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    w = (0.2 * torch.randn(vocab, d, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, vocab, (n,))
    targets[::9] = -1  # ignored positions
    ref = F.cross_entropy(x @ w.T, targets, ignore_index=-1, label_smoothing=smoothing)
    ref.backward()
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    loss = linear_cross_entropy(xf, wf, targets, smoothing)
    (3 * loss).backward()  # the upstream gradient scales both
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    assert torch.allclose(xf.grad.double(), 3 * x.grad, atol=1e-6, rtol=1e-4)
    assert torch.allclose(wf.grad.double(), 3 * w.grad, atol=1e-6, rtol=1e-4)


def test_training_forward_uses_the_fused_loss_and_matches_eval_and_bf16():
    torch.manual_seed(0)
    model = Transformer(tiny())
    idx = torch.randint(0, 301, (2, 20))
    targets = idx.roll(-1, dims=1)
    logits, loss = model(idx, targets, loss_only=True)  # fused: no logits
    assert logits is None
    loss.backward()
    with torch.no_grad():
        plain = model(idx, targets)[1]
    assert loss.item() == pytest.approx(plain.item(), abs=1e-5)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 products, fp32 softmax and accumulation
        model(idx, targets, loss_only=True)[1].backward()
    for name, g in grads.items():
        assert (model.get_parameter(name).grad - g).norm() <= 0.05 * g.norm(), name
