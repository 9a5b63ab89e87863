"""Temperature scaling, geometric-prior thresholds, ties, and the budget solver."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model import calibration as C
from model.curve import pareto


def test_temperature_recovers_the_generating_one():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 10, generator=g) * 3
    labels = torch.distributions.Categorical(logits=logits / 2.5).sample()
    t = C.fit_temperature(logits, labels)
    assert abs(t - 2.5) < 0.25


def test_prior_thresholds_give_the_prior_shares():
    rng = np.random.default_rng(0)
    conf = rng.random((4, 10000))
    shares = C.geometric_prior(0.7, 4)
    assert shares.sum() == pytest.approx(1.0) and shares[0] > shares[1] > shares[3]
    th = C.prior_thresholds(conf, shares)
    ex = C.exit_of(conf, th)
    got = np.bincount(ex, minlength=4) / 10000
    assert np.allclose(got[:3], shares[:3], atol=0.002)
    assert th[-1] == 0.0


def test_ties_pick_the_closer_count_and_unreached_exits_get_never():
    # 60% of samples tie at exactly 1.0 at exit 1; the prior asks 30% to leave there.
    conf = np.array([[1.0] * 6 + [0.5] * 4, [0.9] * 10, [0.8] * 10])
    th = C.prior_thresholds(conf, np.array([0.3, 0.0, 0.7]))
    # Threshold at 1.0 lets 6 leave (off by 3), just above lets 0 leave (off by 3): ties go to the value.
    assert th[0] == 1.0
    assert th[1] == C.NEVER  # the prior gives exit 2 no samples
    conf2 = np.array([[1.0] * 9 + [0.5], [0.9] * 10, [0.8] * 10])
    th2 = C.prior_thresholds(conf2, np.array([0.2, 0.4, 0.4]))
    assert th2[0] == C.NEVER  # 9 tie at 1.0: letting none leave (off by 2) beats 9 (off by 7)
    # Exit 2 wants 4 of 10, all 10 remain at 0.9: ties again, all 10 leave (off 6) vs none (off 4) -> none.
    assert th2[1] == C.NEVER
    assert C.exit_of(conf2, th2).tolist() == [2] * 10


def test_solver_respects_the_budget_and_refuses_below_exit_1():
    rng = np.random.default_rng(1)
    n = 3000
    hard = rng.random(n)
    conf = np.clip(np.stack([1 - hard + 0.1 * k for k in range(3)]) + rng.normal(0, 0.05, (3, n)), 0, 1)
    labels = np.zeros(n, dtype=int)
    pred = (rng.random((3, n)) > conf).astype(int)  # wrong with probability 1 - confidence
    flops = [10, 25, 40]
    curve = C.budgeted_curve(conf, pred, labels, flops)
    assert curve[0].mean_flops >= 10 and curve[-1].mean_flops <= 40
    for target in (12, 20, 30):
        point = C.solve_for_budget(curve, target)
        assert point.mean_flops <= target
        mean, top1, _ = C.evaluate_thresholds(conf, pred, labels, point.thresholds, flops)
        assert mean == pytest.approx(point.mean_flops) and top1 == pytest.approx(point.top1)
    assert C.solve_for_budget(curve, 30).top1 >= C.solve_for_budget(curve, 12).top1
    with pytest.raises(ValueError, match="below the cheapest"):
        C.solve_for_budget(curve, 5)
    front = pareto(curve)
    assert all(a.top1 < b.top1 and a.mean_flops <= b.mean_flops for a, b in zip(front, front[1:]))
    assert not math.isnan(front[-1].top1)
