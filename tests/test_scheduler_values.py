"""Scheduler edge values: exact thresholds and budgets, the retry estimate,
the in-flight count, and the latency model's safety factor (hand-computed)."""

from __future__ import annotations

import pytest

from server.budget.policies import BudgetPolicy, ThresholdPolicy
from server.engine.scheduler import BlockScheduler, LatencyModel, Outcome, QueueFull, Task


def test_a_confidence_equal_to_the_threshold_leaves():
    s = BlockScheduler(2, 4, 0.0, 10)
    a, b = Task(0.0, ThresholdPolicy(lambda: (0.5, 0.0))), Task(0.0, ThresholdPolicy(lambda: (0.5, 0.0)))
    s.submit([a, b])
    block, batch, _ = s.next_step(0.0)
    finished = s.complete(block, batch, [0.5, 0.49999], 0.001)
    assert finished == [(a, Outcome.CONFIDENT)] and s.depth(1) == 1 and s.in_flight == 1


def test_a_budget_that_exactly_pays_a_block_lets_it_run():
    flops = [10.0, 25.0, 45.0]
    p = BudgetPolicy(65.0, 5, (0.99, 0.99, 0.0), flops)  # 5 x 10 + one step of 15
    tasks = [Task(0.0, p) for _ in range(5)]
    s = BlockScheduler(3, 8, 0.0, 100)
    s.submit(tasks)
    done = []
    while (step := s.next_step(0.0)) is not None:
        block, batch, finished = step
        done += finished + s.complete(block, batch, [0.1] * len(batch), 0.001)
    assert sorted(t.exits_done for t, _ in done) == [1, 1, 1, 1, 2] and p.committed == 65.0
    assert s.in_flight == 0


def test_retry_after_estimates_the_drain_time():
    lat = LatencyModel(2, safety=1.0)
    for b in range(2):
        lat.observe(b, 4, 0.4)  # 0.1 s per image, one batch size seen
    s = BlockScheduler(2, 4, 0.0, 10, lat)
    s.submit([Task(0.0, ThresholdPolicy(lambda: (0.5, 0.0))) for _ in range(10)])
    with pytest.raises(QueueFull) as e:
        s.submit([Task(0.0, ThresholdPolicy(lambda: (0.5, 0.0)))])
    # (0.4 + 0.4) s per full batch-step chain x 10 images / 4 per batch = 2.0 s.
    assert e.value.retry_after_s == pytest.approx(2.0)


def test_expired_images_leave_the_in_flight_count():
    lat = LatencyModel(2, safety=1.0)
    lat.observe(0, 1, 0.010)
    s = BlockScheduler(2, 4, 0.0, 10, lat)
    s.submit([Task(0.0, ThresholdPolicy(lambda: (0.5, 0.0)), deadline=0.005) for _ in range(3)])
    block, batch, finished = s.next_step(0.0)
    assert batch == [] and [o for _, o in finished] == [Outcome.EXPIRED] * 3 and s.in_flight == 0
    s.submit([Task(0.0, ThresholdPolicy(lambda: (0.5, 0.0))) for _ in range(10)])  # room for 10 again
    assert s.in_flight == 10 and len(s.drain()) == 10 and s.in_flight == 0


def test_latency_estimate_applies_the_safety_factor():
    lat = LatencyModel(1, safety=1.25)
    lat.observe(0, 1, 0.002)
    lat.observe(0, 9, 0.010)  # 1 ms per image + 1 ms
    assert lat.estimate(0, 5) == pytest.approx(1.25 * 0.006)
    assert LatencyModel(1).estimate(0, 5) == 0.0  # nothing observed yet


def test_a_capped_budget_buys_the_next_block_for_the_least_confident_images():
    """/batch's budget pays block 2 for two of four images: the two least confident
    at exit 1 go on, the two most confident leave there with BUDGET."""
    flops = [10.0, 25.0, 45.0]
    p = BudgetPolicy(70.0, 4, (0.99, 0.99, 0.0), flops)  # 4 x 10 for exit 1, then 2 x 15 for exit 2
    a, b, c, d = tasks = [Task(0.0, p) for _ in range(4)]
    s = BlockScheduler(3, 8, 0.0, 100)
    s.submit(tasks)
    block, batch, finished = s.next_step(0.0)
    assert (block, batch, finished) == (0, [a, b, c, d], [])
    assert s.complete(0, batch, [0.6, 0.2, 0.5, 0.3], 0.001) == []  # all below 0.99: all queue for block 2

    block, batch, finished = s.next_step(0.0)
    assert block == 1 and batch == [b, d]  # 0.2 and 0.3 go on, in queue order
    assert finished == [(c, Outcome.BUDGET), (a, Outcome.BUDGET)]  # 0.5 and 0.6 leave at exit 1
    assert p.committed == 70.0 and s.in_flight == 2

    assert s.complete(1, batch, [0.7, 0.4], 0.001) == []
    block, batch, finished = s.next_step(0.0)  # nothing left to pay block 3 (20 each)
    assert (block, batch, finished) == (2, [], [(d, Outcome.BUDGET), (b, Outcome.BUDGET)])
    assert [t.exits_done for t in tasks] == [1, 2, 1, 2] and s.in_flight == 0 and s.next_step(0.0) is None


def test_a_cancelled_image_leaves_before_its_next_block_whether_queued_or_running():
    s = BlockScheduler(3, 4, 0.0, 10)
    keep = ThresholdPolicy(lambda: (1.1, 1.1, 0.0))  # nobody leaves early: every image would run 3 blocks
    a, b, c = (Task(0.0, keep) for _ in range(3))
    s.submit([a, b, c])
    block, batch, _ = s.next_step(0.0)
    assert block == 0 and batch == [a, b, c]
    b.cancelled = True  # its client left while block 1 ran
    done = s.complete(0, batch, [0.5, 0.5, 0.5], 0.01)
    assert done == [(b, Outcome.CANCELLED)] and s.depth(1) == 2 and s.in_flight == 2
    c.cancelled = True  # its client left while it waited at block 2
    block, batch, left = s.next_step(0.0)
    assert block == 1 and batch == [a] and left == [(c, Outcome.CANCELLED)] and s.in_flight == 1
