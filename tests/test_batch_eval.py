"""/batch's budgeted policy run through the real scheduler, offline."""

from __future__ import annotations

import numpy as np

from server.engine.batch_eval import simulate_batch


def test_simulated_batch_respects_budget_and_thresholds():
    rng = np.random.default_rng(0)
    conf = rng.random((3, 50))
    flops = [10.0, 25.0, 45.0]
    thresholds = (0.6, 0.6, 0.0)
    unconstrained = simulate_batch(conf, 1e9, thresholds, flops)
    expected = np.where(conf[0] >= 0.6, 0, np.where(conf[1] >= 0.6, 1, 2))
    assert (unconstrained == expected).all()  # a loose budget: exactly the fixed-threshold exits
    budget = 50 * 10 + 10 * 15.0
    capped = simulate_batch(conf, budget, thresholds, flops, max_batch_size=7)
    assert np.asarray(flops)[capped].sum() <= budget
    assert (capped <= unconstrained).all() and (capped < unconstrained).any()
