"""Optimizers: which tensor gets which optimizer and rate, one Muon step against a float64 reference,
the Noam cooldown and the per-step hyperparameters against their formulas, and a resume with another
optimizer refused."""

import math

import pytest
import torch

from nanokor.config import load_config, model_config
from nanokor.errors import CheckpointError
from nanokor.model import Transformer
from nanokor.muon import POLAR_EXPRESS
from nanokor.optim import build_optimizer, cooldown, make_schedule, noam_lr, param_groups, schedule_peak

SMALL = ["--n_layer=2", "--n_head=2", "--d_model=32", "--d_ff=48", "--block_size=16"]


def small_model(*flags):
    cfg = load_config([*SMALL, *flags])
    torch.manual_seed(0)
    return cfg, Transformer(model_config(cfg, vocab_size=64))


def names(model, params) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


@pytest.mark.parametrize("tie", [False, True])
def test_muon_takes_the_block_matrices_and_adamw_the_rest(tie):
    cfg, model = small_model("--optimizer=muon", "--schedule=cosine", "--lr=2e-3", "--embed_lr=0.1",
                             "--muon_lr=0.04", "--weight_decay=0.05", f"--tie_embeddings={tie}", "--qk_norm=true")
    groups = param_groups(model, cfg, schedule_peak(cfg))
    (muon,) = groups["muon"]
    assert names(model, muon["params"]) == {f"layers.{i}.{m}.weight" for i in range(2) for m in
                                            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert muon["lr_scale"] == pytest.approx(0.04 / 2e-3) and muon["weight_decay"] == 0.05
    adamw = {g["name"]: g for g in groups["adamw"]}
    assert names(model, adamw["embedding"]["params"]) == {"embed_tokens.weight"}
    assert names(model, adamw["norms"]["params"]) == {"norm.weight", *(f"layers.{i}.{n}.weight" for i in range(2)
                                                      for n in ("input_layernorm", "post_attention_layernorm",
                                                                "self_attn.q_norm", "self_attn.k_norm"))}
    assert adamw["embedding"]["weight_decay"] == adamw["norms"]["weight_decay"] == 0.0
    if tie:  # one tensor, once, at the head's rate: its gradient is mostly the logits'
        assert "head" not in adamw and adamw["embedding"]["lr_scale"] == 1.0
    else:
        assert names(model, adamw["head"]["params"]) == {"lm_head.weight"} and adamw["head"]["weight_decay"] == 0.05
        assert adamw["embedding"]["lr_scale"] == pytest.approx(0.1 / 2e-3)
    every = [p for gs in groups.values() for g in gs for p in g["params"]]
    assert sorted(map(id, every)) == sorted(id(p) for p in model.parameters())  # each tensor exactly once


def test_adamw_alone_decays_matrices_and_head_only():
    cfg, model = small_model("--optimizer=adamw")
    groups = param_groups(model, cfg, schedule_peak(cfg))
    assert list(groups) == ["adamw"]
    decayed = {n for g in groups["adamw"] if g["weight_decay"] > 0 for n in names(model, g["params"])}
    assert decayed == {n for n, p in model.named_parameters() if p.dim() == 2 and n != "embed_tokens.weight"}


def test_every_group_follows_the_schedule_at_its_own_peak():
    cfg, model = small_model("--optimizer=muon", "--schedule=noam", "--warmup_steps=10", "--lr_factor=0.5",
                             "--muon_lr=0.03", "--embed_lr=0.2")
    opt = build_optimizer(model, cfg)
    peak = noam_lr(10, 32, 10, 0.5)
    opt.set_step(10)
    lr = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lr["matrices"] == pytest.approx(0.03) and lr["embedding"] == pytest.approx(0.2)
    assert lr["head"] == lr["norms"] == pytest.approx(peak)
    opt.set_step(40)  # Noam's 1/sqrt(step): half the peak at 4x the warmup, for every group
    assert {g["name"]: g["lr"] for g in opt.param_groups}["matrices"] == pytest.approx(0.015)


def newton_schulz_f64(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Keller Jordan's quintic iteration, written out in float64: X <- aX + (bA + cA^2)X with A = XX^T,
    on the wide orientation, after scaling X to unit Frobenius norm."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def polar_express_f64(g: torch.Tensor) -> torch.Tensor:
    """Polar Express through the SVD: each iteration's odd quintic a t + b t^3 + c t^5 acts on the singular
    values alone, after the normalization by the Frobenius norm times 1.02."""
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    t = s / (s.square().sum().sqrt() * 1.02)
    for a, b, c in POLAR_EXPRESS:
        t = a * t + b * t ** 3 + c * t ** 5
    return u @ torch.diag(t) @ vh


VARIANTS = {"jordan": [], "polar_express": ["--muon_ns=polar_express"], "normuon": ["--normuon_beta2=0.9"],
            "cautious_wd": ["--muon_cautious_wd=true"]}


@pytest.mark.parametrize("ns_dtype, tolerance, variant", [("bf16", 0.02, "jordan"), ("fp32", 0.005, "jordan"),
                                                          *(("fp32", 0.005, v) for v in list(VARIANTS)[1:])])
def test_one_muon_step_matches_a_float64_reference(ns_dtype, tolerance, variant):
    cfg, model = small_model("--optimizer=muon", "--schedule=wsd", "--lr=1e-3", "--warmup_steps=0",
                             "--muon_lr=0.05", "--muon_momentum=0.9", "--muon_momentum_warmup=4",
                             "--muon_momentum_start=0.5", "--weight_decay=0.1", f"--muon_ns_dtype={ns_dtype}",
                             *VARIANTS[variant])
    opt = build_optimizer(model, cfg)
    w = model.layers[0].mlp.up_proj.weight  # 48 x 32: tall, so the shape scaling sqrt(48/32) applies
    torch.manual_seed(1)
    lr, wd, buf = 0.05, 0.1, torch.zeros(48, 32, dtype=torch.float64)
    row_ms = torch.zeros(48, dtype=torch.float64)  # NorMuon's EMA of each row's mean square
    for step in (1, 2):  # the second step also checks the momentum buffer
        opt.set_step(step)  # wsd's plateau: the schedule's peak, so Muon runs at muon_lr
        mu = 0.5 + 0.4 * step / 4  # the momentum warmup: 0.6, then 0.7
        g = torch.randn_like(w)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        w.grad = g.clone()
        old = w.detach().double().clone()
        opt.step()
        # The reference: momentum as an EMA, Nesterov look-ahead, orthogonalize, decoupled decay, scaled step.
        buf = mu * buf + (1 - mu) * g.double()
        nesterov = (1 - mu) * g.double() + mu * buf
        update = polar_express_f64(nesterov) if variant == "polar_express" else newton_schulz_f64(nesterov)
        if variant == "normuon":  # rows divided by the root of their EMA'd mean square, at the update's norm
            row_ms = 0.9 * row_ms + 0.1 * update.square().mean(dim=1)
            scaled = update / row_ms.sqrt()[:, None]
            update = scaled * update.norm() / scaled.norm()
        # Cautious decay: only where the update would shrink the weight too, sign(update) = sign(weight).
        decay = lr * wd * old * ((update * old >= 0) if variant == "cautious_wd" else 1)
        expected = -decay - lr * math.sqrt(48 / 32) * update
        got = w.detach().double() - old
        # bf16 (torch.optim.Muon's) costs ~1% of the step; fp32 only the update's rounding to bf16 (~0.2%).
        assert (got - expected).norm() / expected.norm() < tolerance
        if variant != "normuon":  # the orthogonalized update's singular values sit in a band around 1
            s = torch.linalg.svdvals((got + decay) / (-lr * math.sqrt(48 / 32)))
            assert 0.5 < s.min() and s.max() < 1.3
        if variant == "cautious_wd":  # and it does skip some: about half the weights disagree at random
            assert 0.3 < (update * old < 0).double().mean() < 0.7


def test_newton_schulz_dtype_follows_the_hardware():
    """auto: bf16 where it is native (any GPU; a CPU that oneDNN runs bf16 on), fp32 on other CPUs."""
    from nanokor.optim import ns_dtype
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert ns_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    assert ns_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert ns_dtype("fp32", torch.device("cuda", 0)) == torch.float32
    assert ns_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_cooldown_matches_its_formula():
    for max_steps, frac in ((100, 0.2), (488, 0.3), (10, 1.0)):
        n = round(frac * max_steps)
        for step in range(1, max_steps + 1):
            expected = 1.0 if step <= max_steps - n else (max_steps - step + 1) / (n + 1)
            assert cooldown(step, max_steps, frac) == pytest.approx(expected, rel=1e-12)
    assert cooldown(99, 100, 0.0) == 1.0
    cfg = load_config(["--schedule=noam", "--d_model=256", "--n_head=4", "--warmup_steps=10", "--lr_factor=1",
                       "--max_steps=100", "--cooldown_frac=0.2"])
    lr = make_schedule(cfg)
    assert lr(80) == noam_lr(80, 256, 10) and lr(90) == pytest.approx(noam_lr(90, 256, 10) * 11 / 21)
    assert lr(100) == pytest.approx(noam_lr(100, 256, 10) / 21)  # small, not zero: the last update still counts


WEIGHT_DECAY = {  # the factor on weight_decay at step s of 100, given the group's lr curve / its peak r
    "constant": lambda s, r: 1.0, "linear": lambda s, r: 1 - s / 100,
    "cosine": lambda s, r: 0.5 * (1 + math.cos(math.pi * s / 100)), "lr": lambda s, r: r}


@pytest.mark.parametrize("decay", WEIGHT_DECAY)
def test_every_groups_rate_momentum_and_decay_follow_their_schedules(decay):
    cfg, model = small_model("--optimizer=muon", "--schedule=noam", "--warmup_steps=10", "--lr_factor=0.5",
                             "--max_steps=100", "--cooldown_frac=0.4", "--muon_cooldown_frac=0.8", "--muon_lr=0.03",
                             "--muon_momentum_warmup=30", "--muon_momentum_start=0.85", "--muon_momentum=0.95",
                             "--weight_decay=0.1", f"--weight_decay_schedule={decay}", "--embed_lr=0.2")
    opt = build_optimizer(model, cfg)
    peak = noam_lr(10, 32, 10, 0.5)
    for step in (1, 10, 15, 30, 50, 70, 100):
        opt.set_step(step)
        group = {g["name"]: g for g in opt.param_groups}
        adamw = noam_lr(step, 32, 10, 0.5) * cooldown(step, 100, 0.4)  # AdamW cools down over the last 40%
        muon = noam_lr(step, 32, 10, 0.5) * cooldown(step, 100, 0.8)  # Muon over its own last 80%
        assert group["head"]["lr"] == group["norms"]["lr"] == pytest.approx(adamw)
        assert group["embedding"]["lr"] == pytest.approx(0.2 * adamw / peak)
        assert group["matrices"]["lr"] == pytest.approx(0.03 * muon / peak)
        assert group["matrices"]["momentum"] == pytest.approx(0.85 + 0.1 * min(step / 30, 1))
        assert group["matrices"]["weight_decay"] == pytest.approx(0.1 * WEIGHT_DECAY[decay](step, muon / peak))
        assert group["head"]["weight_decay"] == pytest.approx(0.1 * WEIGHT_DECAY[decay](step, adamw / peak))
        assert group["embedding"]["weight_decay"] == group["norms"]["weight_decay"] == 0.0
    assert make_schedule(cfg)(70) == pytest.approx(noam_lr(70, 32, 10, 0.5) * cooldown(70, 100, 0.4))  # the logged lr


def test_a_checkpoint_without_peak_weight_decays_still_resumes():
    """Optimizer states saved before the weight-decay schedule lack `weight_decay_peak`."""
    cfg, model = small_model("--optimizer=muon", "--weight_decay=0.1")
    state = build_optimizer(model, cfg).state_dict()
    for opt_state in state.values():
        for group in opt_state["param_groups"]:
            del group["weight_decay_peak"]
    opt = build_optimizer(model, cfg)
    opt.load_state_dict(state)
    opt.set_step(5)
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups} == {
        "embedding": 0.0, "head": 0.1, "norms": 0.0, "matrices": 0.1}


def test_resume_with_another_optimizer_is_refused_by_name():
    cfg, model = small_model("--optimizer=adamw")
    state = build_optimizer(model, cfg).state_dict()
    muon = build_optimizer(model, load_config([*SMALL, "--optimizer=muon"]))
    with pytest.raises(CheckpointError, match=r"holds the state of adamw, but this run's optimizer is adamw \+ muon"):
        muon.load_state_dict(state, "last.pt")
