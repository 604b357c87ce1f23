"""Learning-rate schedules against their formulas, written out independently here."""

import math

import pytest

from nanokor.config import load_config
from nanokor.optim import cosine_lr, make_schedule, noam_lr, wsd_lr


@pytest.mark.parametrize("d_model,warmup,factor", [(768, 4000, 1.0), (128, 100, 0.5), (512, 1, 2.0)])
def test_noam_matches_the_formula(d_model, warmup, factor):
    for step in (1, 2, 10, warmup // 2 + 1, warmup, warmup + 1, 3 * warmup, 100_000):
        expected = factor * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)
        assert noam_lr(step, d_model, warmup, factor) == pytest.approx(expected, rel=1e-12)


def test_noam_shape():
    lrs = [noam_lr(s, 768, 4000) for s in range(1, 20_001)]
    peak = max(range(len(lrs)), key=lrs.__getitem__) + 1
    assert peak == 4000
    assert lrs[3999] == pytest.approx(1 / math.sqrt(768 * 4000))  # the peak: 5.7e-4 for the base run
    assert lrs[0] == pytest.approx(lrs[3999] / 4000)  # linear warmup from step 1
    assert lrs[15999] == pytest.approx(lrs[3999] / 2)  # 1/sqrt(step): 4x the steps, half the rate


def test_cosine():
    assert cosine_lr(50, 1e-3, 1e-4, 100, 1000) == pytest.approx(5e-4)
    assert cosine_lr(100, 1e-3, 1e-4, 100, 1000) == pytest.approx(1e-3)
    assert cosine_lr(550, 1e-3, 1e-4, 100, 1000) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert cosine_lr(1000, 1e-3, 1e-4, 100, 1000) == pytest.approx(1e-4)
    assert cosine_lr(5000, 1e-3, 1e-4, 100, 1000) == pytest.approx(1e-4)


def test_warmup_stable_decay():
    args = dict(lr=1e-3, min_lr=0.0, warmup=10, max_steps=100, decay_frac=0.2)
    assert wsd_lr(5, **args) == pytest.approx(5e-4)
    assert wsd_lr(10, **args) == wsd_lr(50, **args) == wsd_lr(80, **args) == pytest.approx(1e-3)
    assert wsd_lr(90, **args) == pytest.approx(5e-4)
    assert wsd_lr(100, **args) == pytest.approx(0.0)


def test_make_schedule_follows_the_config():
    cfg = load_config(["--schedule=noam", "--d_model=256", "--n_head=4", "--warmup_steps=50", "--lr_factor=2"])
    assert make_schedule(cfg)(7) == noam_lr(7, 256, 50, 2.0)
    cfg = load_config(["--schedule=cosine", "--lr=1e-3", "--min_lr=0", "--warmup_steps=0", "--max_steps=10"])
    assert make_schedule(cfg)(5) == pytest.approx(5e-4)
