"""The latency objective's loop (server/budget/objective.py), without HTTP or torch.

The fluid plant below is an engine with one model thread whose time per image
is proportional to the target in force (``SECONDS_PER_FLOP`` x FLOPs): at the
configured target (2,000 FLOPs) it answers 500 images/s, at exit 1 (1,000
FLOPs) 1,000 images/s. FLOPs are multiply-accumulates (MSDNet paper convention).
"""

from __future__ import annotations

import math

import pytest

from model.curve import OperatingPoint
from server.budget.controller import BudgetController
from server.budget.keeper import BudgetKeeper
from server.budget.objective import OPEN, LatencyObjective
from server.http.frontdoor import FrontDoor

EXITS = [1000.0, 2500.0, 4000.0]
TARGET = 2000.0
SECONDS_PER_FLOP = 1e-6  # 2 ms an image at the target, 1 ms at exit 1
OBJECTIVE_S = 0.1


def simulate(rates: list[tuple[float, float]], dt: float = 0.001):
    """Run the loop against the plant; ``rates`` = (seconds, arrivals per second)
    phases. Returns per tick (time, target in force, forecast wait, refused share)."""
    obj = LatencyObjective(OBJECTIVE_S, EXITS, TARGET)
    backlog, t, trace, arrived = 0.0, 0.0, [], 0.0
    for seconds, rate in rates:
        for _ in range(round(seconds / dt)):
            per_image = obj.in_force * SECONDS_PER_FLOP
            wait = backlog * per_image
            admitted = rate * dt if obj.admits(wait) else 0.0
            backlog += admitted
            arrived += admitted
            served = min(backlog, dt / per_image)
            backlog -= served
            obj.add_busy(served * per_image, served * obj.in_force)
            t += dt
            if obj.due(t):
                obj.update(t, backlog * obj.in_force * SECONDS_PER_FLOP, 1, arrived)
                arrived = 0.0
            trace.append((t, obj.in_force, wait, 1.0 - admitted / (rate * dt) if rate else 0.0))
    return obj, trace


def window(trace, start: float, end: float):
    return [row for row in trace if start <= row[0] < end]


def test_below_capacity_the_configured_target_holds_and_nothing_is_refused():
    obj, trace = simulate([(10.0, 0.6 * 500)])
    assert all(f == TARGET for _, f, _, _ in trace)
    assert obj.state == "steady" and max(w for *_, w, _ in trace) < 0.01


@pytest.mark.parametrize("load", [1.2, 1.5, 1.9])  # 1.9: at exit 1 the engine is 95% busy
def test_between_the_two_capacities_it_degrades_just_enough_and_settles(load):
    obj, trace = simulate([(5.0, 0.5 * 500), (20.0, load * 500)])
    steady = window(trace, 15.0, 25.0)
    flops = [f for _, f, _, _ in steady]
    # Equilibrium: rate x time per image = the busy goal, i.e. FLOPs = 0.85 / (rate x s/FLOP).
    expected = max(EXITS[0], obj.busy_goal / (load * 500 * SECONDS_PER_FLOP))
    assert EXITS[0] <= min(flops) and max(flops) < TARGET
    assert abs(sum(flops) / len(flops) - expected) / expected < 0.1
    assert (max(flops) - min(flops)) / min(flops) <= 0.10  # no swing over 10% once the load is steady
    assert max(w for _, _, w, _ in steady) < OBJECTIVE_S and sum(r for *_, r in steady) == 0


def test_past_the_first_exit_capacity_it_refuses_only_the_excess_and_keeps_the_objective():
    obj, trace = simulate([(2.0, 250.0), (10.0, 3 * 500.0)])  # 1,500/s against 1,000/s at exit 1
    late = window(trace, 4.0, 12.0)
    assert all(f == EXITS[0] for _, f, _, _ in late) and obj.state in ("refusing", "degraded")  # at the boundary
    refused = sum(r for *_, r in late) / len(late)
    assert refused == pytest.approx(1 / 3, abs=0.03)  # the excess, not everyone
    assert max(w for _, _, w, _ in late) <= obj.refuse_share * OBJECTIVE_S + 0.002


def test_after_a_burst_the_configured_target_is_back_within_5_s_without_windup():
    obj, trace = simulate([(2.0, 250.0), (20.0, 3 * 500.0), (10.0, 0.5 * 500)])
    burst_end = 22.0
    back = next(t for t, f, _, _ in trace if t >= burst_end and f == TARGET)
    assert back - burst_end < 5.0
    assert all(f == TARGET for _, f, _, _ in window(trace, back, 32.0))  # and it stays there


def test_admission_rule():
    obj = LatencyObjective(OBJECTIVE_S, EXITS, TARGET)
    # Above exit 1 the loop degrades instead of refusing, whatever the wait.
    assert obj.admits(10.0) and obj.admission(10.0).refuse_above_s == math.inf
    # A request with its own deadline keeps it: refused only when the wait alone would miss it.
    assert obj.admits(0.05, deadline_s=0.06) and not obj.admits(0.05, deadline_s=0.04)
    for step in range(200):  # a queue far over the objective drives the span to 0
        obj.update(step * obj.interval_s, 1.0, 1)
    assert obj.in_force == EXITS[0] and obj.state == "refusing"
    assert obj.admits(0.044) and not obj.admits(0.046)  # refuse_share = 0.45 of 100 ms
    assert obj.admission(2.5).retry_after_s == 2.5 and obj.admission(0.2).retry_after_s == 1.0
    assert OPEN.admits() and OPEN.admits(0.0)


def test_bad_objectives_are_refused():
    with pytest.raises(ValueError, match="positive"):
        LatencyObjective(0.0, EXITS, TARGET)
    with pytest.raises(ValueError, match="wait_share"):
        LatencyObjective(0.1, EXITS, TARGET, wait_share=0.7, refuse_share=0.5)


def curve() -> list[OperatingPoint]:
    return [OperatingPoint(1500.0, 0.8, (0.5, 0.5, 0.0)), OperatingPoint(3000.0, 0.9, (0.9, 0.9, 0.0))]


def test_the_flops_loop_steers_to_the_target_in_force_and_charges_nothing_to_the_configured_one():
    c = BudgetController(EXITS, curve(), TARGET)
    for _ in range(50):
        c.observe(2600.0)  # overspending: the deficit grows
    assert c.deficit > 0
    c.set_in_force(1200.0)
    assert c.in_force == 1200.0 and c.target == TARGET and c.deficit == 0.0  # judged against the new target
    assert c.command <= 1200.0
    c.observe(1200.0)
    assert c.deficit == 0.0  # an answer at the target in force is on budget
    c.set_in_force(math.inf)
    assert c.in_force == TARGET


def test_with_the_controller_off_a_degraded_target_still_lowers_the_thresholds():
    c = BudgetController(EXITS, curve(), TARGET)
    keeper = BudgetKeeper(c, (0.99, 0.99, 0.0), enabled=False)
    assert keeper.thresholds() == (0.99, 0.99, 0.0)
    keeper.set_in_force(EXITS[0])
    assert keeper.thresholds() == c.point_for(EXITS[0]).thresholds and keeper.in_force == EXITS[0]
    assert keeper.view().in_force_flops == EXITS[0] and keeper.view().target_flops == TARGET
    keeper.set_in_force(math.inf)
    assert keeper.thresholds() == (0.99, 0.99, 0.0)


def test_the_front_door_sheds_while_the_loop_is_behind_and_stops_when_it_catches_up():
    door = FrontDoor(OBJECTIVE_S)  # lag limit: 25 ms
    for _ in range(100):
        door.observe(0.010)
    assert door.share == 0.0 and door.admits(0.0)
    for _ in range(100):
        door.observe(0.050)  # twice the limit
    assert door.share == door.max_share and not door.admits(0.9) and door.admits(0.96)
    for _ in range(5):
        door.observe(0.0)  # the smoothed lag takes a few samples to fall under half the limit
    steps = 0
    while door.share > 0:
        door.observe(0.0)
        steps += 1
    assert steps <= round(door.max_share / door.fall) + 1 and door.admits(0.0)


def test_in_fleet_mode_a_degraded_replica_charges_nothing_to_the_others():
    from server.budget.controller import FleetView

    degraded, other = BudgetController(EXITS, curve(), TARGET), BudgetController(EXITS, curve(), TARGET)
    degraded.set_in_force(EXITS[0])
    for _ in range(200):
        degraded.observe(EXITS[0])  # every answer at exit 1, the target in force
    assert degraded.deficit == 0.0  # no underspend credit against the configured target
    alone = other.command
    other.set_fleet(FleetView(deficit=degraded.deficit, bias_rate=degraded.bias * 10, rate=10.0), own_rate=10.0,
                    horizon=200.0)
    assert other.command == pytest.approx(alone, rel=1e-9)  # the other replica's command is unchanged


def test_the_front_door_also_sheds_while_decoding_is_behind_and_forgets_a_stale_delay():
    door = FrontDoor(OBJECTIVE_S)
    for _ in range(50):
        door.observe_decode(0.080)  # requests waited 80 ms for their image to be decoded
    assert door.decode_delay_s > door.limit_s and door.share > 0.5
    for _ in range(400):  # no decode reports (all refused), the loop itself is on time
        door.observe(0.0)
    assert door.decode_delay_s < 0.5 * door.limit_s and door.share == 0.0


def noisy_plant(rates: list[tuple[float, float]], seed: int, dt: float = 0.002):
    """A discrete plant with the noise a real engine has: Poisson arrivals, each image's
    cost random around the target in force (Gamma, shape 3: some leave at exit 1, some
    go deep) and fixed when its work starts (an image's exit follows the thresholds in
    force when it gets there), one model thread, FIFO. Scaled like ImageNet MSDNet-5 under a 500 ms
    objective: 86.6 images/s at a 520 MFLOPs target, exit 1 at 254 MFLOPs. Returns the
    loop and the target in force every 0.5 s (as the benchmark polls ``/budget``),
    with each answer's (finish time, latency) and the refused count."""
    import numpy as np

    exits, target, objective_s = [254e6, 330e6, 420e6, 676e6, 1000e6], 520e6, 0.5
    per_flop = 1 / (86.6 * target)
    rng = np.random.default_rng(seed)
    obj = LatencyObjective(objective_s, exits, target)
    queue: list[list] = []  # [arrival, difficulty, seconds of work left (None: not started)]

    def work_queued() -> float:
        return sum(w if w is not None else obj.in_force * per_flop * g for _, g, w in queue)

    t, arrived, refused, polls, answers = 0.0, 0, 0, [], []
    for seconds, rate in rates:
        for _ in range(round(seconds / dt)):
            wait = work_queued()
            for _ in range(rng.poisson(rate * dt)):
                if obj.admits(wait):
                    queue.append([t, rng.gamma(3.0) / 3.0, None])
                    arrived += 1
                else:
                    refused += 1
            left = dt
            while queue and left > 0:
                head = queue[0]
                if head[2] is None:
                    head[2] = obj.in_force * per_flop * head[1]
                d = min(left, head[2])
                head[2] -= d
                left -= d
                if head[2] <= 1e-12:
                    answers.append((t + dt - left, t + dt - left - queue.pop(0)[0]))
            obj.add_busy(dt - left, (dt - left) / per_flop)
            t += dt
            if obj.due(t):
                obj.update(t, work_queued(), 1, arrived)
                arrived = 0
            if round(t / dt) % round(0.5 / dt) == 0:
                polls.append((t, obj.in_force))
    return obj, polls, answers, refused


def test_with_poisson_arrivals_and_random_costs_a_steady_overload_settles_without_a_sawtooth():
    """Goal 2's 'no swing over 10% once the load is steady', with the noise the fluid plant
    lacks, over ten seeds (one run's swing is a draw): typically within 10%, never past 15%.
    The loop that cut at every interval while its queue drained swung 23-53% (exit 1 and
    back every 2-4 s) on this plant, as it did on the real ImageNet-size run."""
    swings = []
    for seed in range(1, 11):
        obj, polls, answers, refused = noisy_plant([(3.0, 0.5 * 86.6), (30.0, 1.5 * 86.6)], seed)
        steady = [f for t, f in polls if 18.0 <= t < 33.0]  # the second half of the overload, as the benchmark
        swings.append(max(steady) / min(steady) - 1)
        expected = 0.85 * 520e6 / 1.5  # equilibrium: 85% busy
        assert abs(sum(steady) / len(steady) - expected) / expected < 0.1
        assert refused == 0 and all(latency <= 0.5 for t, latency in answers)  # the step's transient included
    assert sorted(swings)[len(swings) // 2] <= 0.10 and max(swings) <= 0.15, swings


def test_with_poisson_arrivals_the_configured_target_is_back_within_5_s_after_a_burst():
    obj, polls, answers, refused = noisy_plant([(3.0, 0.5 * 86.6), (10.0, 3 * 86.6), (10.0, 0.5 * 86.6)], 1)
    assert refused > 0  # 3x is past exit 1's capacity (about 1.8x): the excess was refused
    back = next(t for t, f in polls if t >= 13.0 and f >= 520e6) - 13.0
    assert back < 5.0
    assert all(f >= 520e6 for t, f in polls if t >= 13.0 + back)
