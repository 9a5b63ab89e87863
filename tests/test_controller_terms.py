"""The budget controller's formula term by term, on hand-computed values.

``command = target - bias - deficit / horizon`` (clamped to the curve's ends),
the deficit restarted by ``set_target`` and bounded by ``4 x horizon x last
exit's cost``; bias an exponentially weighted mean of (cost - command). FLOPs
here are toy multiply-accumulate counts per exit (10, 20, 30, 40), cumulative.
"""

from __future__ import annotations

import math

import pytest

from model.curve import OperatingPoint
from server.budget.controller import BudgetController, FleetView

FLOPS = [10.0, 20.0, 30.0, 40.0]
LOW = OperatingPoint(15.0, (0.5, 0.5, 0.5, 0.0))
MID = OperatingPoint(25.0, (0.7, 0.6, 0.5, 0.0))
HIGH = OperatingPoint(35.0, (0.9, 0.8, 0.7, 0.0))


def controller(target=25.0, horizon=10.0, halflife=1.0, window=1000):
    # halflife 1: the bias keeps half of its past at each request.
    return BudgetController(FLOPS, [LOW, MID, HIGH], target, horizon=horizon, bias_halflife=halflife, window=window)


def test_command_subtracts_bias_and_deficit_over_horizon():
    c = controller()
    assert c.command == 25.0 and c.thresholds == MID.thresholds
    c.observe(40.0)
    # deficit 40 - 25 = 15; bias 0.5 x 0 + 0.5 x (40 - 25) = 7.5; command 25 - 7.5 - 15 / 10 = 16.
    assert c.deficit == 15.0 and c.bias == 7.5 and c.command == 16.0
    assert c.thresholds == LOW.thresholds
    c.observe(10.0)
    # deficit 0; bias 0.5 x 7.5 + 0.5 x (10 - 16) = 0.75; command 24.25.
    assert c.deficit == 0.0 and c.bias == pytest.approx(0.75) and c.command == pytest.approx(24.25)
    c.observe(30.0, commanded=20.0)  # the budget in force when it ran
    # deficit 5; bias 0.5 x 0.75 + 0.5 x (30 - 20) = 5.375; command 25 - 5.375 - 0.5.
    assert c.deficit == 5.0 and c.bias == pytest.approx(5.375) and c.command == pytest.approx(19.125)


def test_set_target_restarts_the_deficit_and_keeps_the_bias():
    c = controller()
    c.observe(40.0)
    c.set_target(30.0)
    assert c.target == 30.0 and c.deficit == 0.0 and c.bias == 7.5
    assert c.command == 22.5 and c.thresholds == LOW.thresholds


def test_the_deficit_is_bounded():
    c = controller(target=10.0, horizon=10.0)
    for _ in range(100):
        c.observe(40.0)  # unbounded it would be 100 x 30 = 3000
    assert c.deficit == 4 * 10.0 * 40.0
    c = controller(target=40.0, horizon=10.0)
    for _ in range(100):
        c.observe(10.0)
    assert c.deficit == -1600.0
    # In fleet mode the bound holds for the fleet's sum: the others hold 500.
    c = controller(target=10.0, horizon=10.0)
    c.set_fleet(FleetView(deficit=500.0, bias_rate=0.0, rate=1.0), own_rate=1.0, horizon=10.0)
    for _ in range(100):
        c.observe(40.0)
    assert c.deficit == 1600.0 - 500.0


def test_command_is_clamped_to_the_curve_ends():
    c = controller(target=12.0, horizon=1.0)
    c.observe(40.0)  # 12 - 14 - 28 < 10
    assert c.command == 10.0 and c.thresholds == (0.0,) * 4
    c = controller(target=38.0, horizon=1.0)
    c.observe(10.0)
    assert c.command == 40.0 and c.thresholds == (math.inf,) * 3 + (0.0,)


def test_fleet_mode_steers_on_the_fleets_deficit_and_rate_weighted_bias():
    c = controller(horizon=10.0)
    c.observe(40.0)  # own deficit 15, bias 7.5
    c.set_fleet(FleetView(deficit=100.0, bias_rate=2.0 * 5.0, rate=2.0), own_rate=4.0, horizon=20.0)
    bias = (7.5 * 4.0 + 10.0) / 6.0  # request-rate-weighted: own 4/s, the others 2/s
    assert c.command == pytest.approx(25.0 - bias - (15.0 + 100.0) / 20.0)
    c.set_fleet(None)
    assert c.horizon == 10.0 and c.command == 16.0


def test_point_for_takes_the_most_expensive_point_within_the_budget():
    c = controller()
    assert c.point_for(24.999) == LOW and c.point_for(25.0) == MID and c.point_for(34.0) == MID
    assert c.point_for(5.0).thresholds == (0.0,) * 4  # below every point: the cheapest (exit 1 for all)
    assert c.point_for(40.0).thresholds == (math.inf,) * 3 + (0.0,)


def test_realised_mean_is_over_the_window():
    c = controller(window=3)
    for f in (10.0, 20.0, 30.0, 40.0):
        c.observe(f)
    assert c.realised_mean == 30.0 and c.window_sum == 90.0 and c.requests == 4
