"""Calibration's pieces on small hand-made inputs, against values computed here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model import calibration as C
from model.curve import OperatingPoint, pareto, point_for, with_ends


def test_confidences_divide_each_exit_by_its_own_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 4, generator=g) * 2  # (K, N, C)
    temps = [0.5, 1.0, 3.0]
    conf, pred = C.confidences(logits, temps)
    z = logits.double().numpy() / np.asarray(temps)[:, None, None]
    e = np.exp(z - z.max(axis=2, keepdims=True))
    p = e / e.sum(axis=2, keepdims=True)
    np.testing.assert_allclose(conf, p.max(axis=2), rtol=1e-12)
    assert (pred == p.argmax(axis=2)).all() and conf.dtype == np.float64


def test_exit_of_takes_the_first_exit_over_its_threshold():
    conf = np.array([[0.9, 0.2, 0.5, 0.1],
                     [0.1, 0.8, 0.5, 0.1],
                     [0.0, 0.0, 0.0, 0.0]])
    assert C.exit_of(conf, [0.5, 0.8, 0.0]).tolist() == [0, 1, 0, 2]
    assert C.exit_of(conf, [math.inf, math.inf, 0.9]).tolist() == [2, 2, 2, 2]  # the last exit takes the rest


def test_geometric_prior_values():
    np.testing.assert_allclose(C.geometric_prior(0.5, 3), np.array([0.5, 0.25, 0.125]) / 0.875)
    np.testing.assert_allclose(C.geometric_prior(2.0, 2), [2 / 6, 4 / 6])


def test_prior_thresholds_on_distinct_confidences():
    conf = np.array([np.arange(1, 11) / 10, np.full(10, 0.5)])
    # Exit 1 takes 3 of 10: the third highest confidence, 0.8.
    assert C.prior_thresholds(conf, np.array([0.3, 0.7])) == [0.8, 0.0]
    # Shares 0.4, 0.4, 0.2 of 10: exit 1 takes the 4 highest (0.6 and up), exit 2 four of the 6 left.
    conf3 = np.array([[0.9, 0.8, 0.7, 0.6, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
                      [0.0, 0.0, 0.0, 0.0, 0.9, 0.8, 0.7, 0.6, 0.2, 0.1],
                      [0.0] * 10])
    assert C.prior_thresholds(conf3, np.array([0.4, 0.4, 0.2])) == [0.6, 0.6, 0.0]


def test_evaluate_thresholds_counts_cost_accuracy_and_shares():
    conf = np.array([[0.9, 0.2, 0.6, 0.1], [0.1, 0.8, 0.5, 0.1]])
    pred = np.array([[1, 0, 2, 3], [1, 1, 0, 3]])
    labels = np.array([1, 1, 0, 0])
    mean, top1, shares = C.evaluate_thresholds(conf, pred, labels, [0.5, 0.0], [10, 30])
    # exits 0, 1, 0, 1: preds 1, 1, 2, 3; right: 1, 1, 0, 0.
    assert mean == 20.0 and top1 == 0.5 and shares == [0.5, 0.5]


def test_solve_for_budget_and_pareto_on_a_hand_made_curve():
    def op(p, flops, top1):
        return OperatingPoint(flops, (0.0,), top1, p, (1.0,))

    curve = [op(1, 10, 0.80), op(2, 12, 0.85), op(3, 14, 0.84), op(4, 16, 0.85), op(5, 20, 0.90)]
    assert C.solve_for_budget(curve, 15).p == 2  # the most accurate within 15
    assert C.solve_for_budget(curve, 16).p == 2  # accuracy tie: the cheaper point (the Pareto front's)
    assert C.solve_for_budget(curve, 20).p == 5 and C.solve_for_budget(curve, 10).p == 1
    with pytest.raises(ValueError, match="below the cheapest"):
        C.solve_for_budget(curve, 9.9)
    assert [o.p for o in pareto(curve)] == [1, 2, 5]


def test_one_lookup_rule_for_every_user_of_the_curve():
    curve = [OperatingPoint(10.0, (0.1, 0.0)), OperatingPoint(20.0, (0.5, 0.0)), OperatingPoint(30.0, (0.9, 0.0))]
    assert point_for(curve, 25.0).mean_flops == 20.0  # the most expensive within the budget
    assert point_for(curve, 30.0).mean_flops == 30.0  # a budget equal to a point's cost takes it
    assert point_for(curve, 5.0).mean_flops == 10.0  # below every point: the cheapest
    ends = with_ends(curve[1:2], [10.0, 40.0])
    assert [p.mean_flops for p in ends] == [10.0, 20.0, 40.0]
    assert ends[0].thresholds == (0.0, 0.0) and ends[-1].thresholds == (math.inf, 0.0)
