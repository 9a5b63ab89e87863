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


# Eight validation images, three exits costing 10, 20, 30 FLOPs. Images 0..7 by falling exit-1
# confidence; by exit-2 confidence 6 > 7 > 5 > 4 > ... > 0. Right everywhere except: exit 1 on
# images 5 and 6, exit 2 on image 6, exit 3 on image 7.
EQUAL_COST_CONF = np.array([[0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92],
                            [0.50, 0.51, 0.52, 0.53, 0.54, 0.55, 0.57, 0.56],
                            [0.50] * 8])
EQUAL_COST_PRED = np.zeros((3, 8), dtype=int)
EQUAL_COST_PRED[0, [5, 6]] = EQUAL_COST_PRED[1, 6] = EQUAL_COST_PRED[2, 7] = 1
EQUAL_COST_FLOPS = [10, 20, 30]
# Over the default grid of p the prior's counts per exit (n1, n2, n3) are (7,0,1) 12.5 FLOPs per image,
# (6,1,1) 13.75, (6,0,2) 15, (5,1,2) 16.25, (5,2,1) 15, (4,2,2) 17.5, ... (0,0,8) 30. Right answers:
# (7,0,1) 5 of 8; (6,1,1) 5 (image 6 at exit 2); (6,0,2) 6; (5,2,1) 7 (images 6 and 7 at exit 2, 5 at
# exit 3); none of the dearer points more than 7. So the front is 12.5 FLOPs (5/8) and 15 FLOPs (7/8):
# of the two points costing 15, only the more accurate.
EQUAL_COST_FRONT = [(12.5, 5 / 8, (7 / 8, 0.0, 1 / 8)), (15.0, 7 / 8, (5 / 8, 2 / 8, 1 / 8))]


def test_the_stored_curve_keeps_the_more_accurate_of_two_points_of_equal_cost():
    """The curve calibration stores, ``pareto(budgeted_curve(...))``, on the images above."""
    labels = np.zeros(8, dtype=int)
    curve = C.budgeted_curve(EQUAL_COST_CONF, EQUAL_COST_PRED, labels, EQUAL_COST_FLOPS)
    assert sorted({(o.mean_flops, o.top1) for o in curve if o.mean_flops <= 15}) == \
        [(12.5, 5 / 8), (13.75, 5 / 8), (15.0, 6 / 8), (15.0, 7 / 8)]
    stored = pareto(curve)
    assert [(o.mean_flops, o.top1, o.exit_shares) for o in stored] == EQUAL_COST_FRONT
    assert stored[1].thresholds == (0.95, 0.56, 0.0)  # exit 1: the 5th highest; exit 2: 2 of images 5, 6, 7


def test_calibrate_stores_that_curve_in_the_checkpoint(monkeypatch, tiny_config):
    """``msdnet calibrate`` on a checkpoint whose exits give the images above: the
    checkpoint's curve is the front, not every point of the grid. The logits put
    ``1 + confidence`` on the predicted class of 10 and 0 elsewhere, so each exit's
    fitted temperature keeps its order of confidences (and the predictions)."""
    from model import checkpoint as ckpt
    from model import evaluate as E
    from model.data import FASHION_MNIST_CLASSES, NORMALISATION, ImageSet
    from model.network import MSDNet

    logits = torch.zeros(3, 8, 10)
    top = 1.0 + torch.from_numpy(EQUAL_COST_CONF).float()
    logits.scatter_(2, torch.from_numpy(EQUAL_COST_PRED)[..., None], top[..., None])
    labels = torch.zeros(8, dtype=torch.int64)
    images = ImageSet(torch.zeros(8, 1, 28, 28, dtype=torch.uint8), labels, FASHION_MNIST_CLASSES)
    mean, std = NORMALISATION["fashion-mnist"]
    ck = ckpt.build(MSDNet(tiny_config).eval(), FASHION_MNIST_CLASSES, mean, std,
                    validation=ckpt.ValidationSplit("fashion-mnist", 0, 8))
    monkeypatch.setattr(E, "validation_set", lambda *a, **k: images)
    monkeypatch.setattr(E, "collect_logits", lambda *a, **k: logits)
    monkeypatch.setattr(ck, "exit_flops", lambda lazy=True: list(EQUAL_COST_FLOPS))

    cal = E.calibrate(ck)
    assert [(o.mean_flops, o.top1, o.exit_shares) for o in cal.curve] == EQUAL_COST_FRONT
    assert ck.calibration.curve == cal.curve
