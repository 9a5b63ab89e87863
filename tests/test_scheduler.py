"""The block scheduler as a plain unit: no torch, no HTTP, a fake clock."""

from __future__ import annotations

import subprocess
import sys

import pytest

from server.budget.policies import BudgetPolicy, ThresholdPolicy
from server.engine.scheduler import BlockScheduler, LatencyModel, Outcome, QueueFull, Task


def policy(thresholds=(0.9, 0.9, 0.0)):
    return ThresholdPolicy(lambda: thresholds)


def test_imports_without_torch():
    code = "import sys, server.engine.scheduler, server.budget.controller; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_block_1_waits_for_the_queue_delay_or_a_full_batch():
    s = BlockScheduler(3, max_batch_size=4, max_queue_delay_s=0.010, max_queue_size=100, adaptive_wait=False)
    assert s.next_step(0.0) is None
    s.submit([Task(arrival=0.0, policy=policy())])
    wait = s.next_step(0.004)
    assert wait == pytest.approx(0.006)
    block, batch, finished = s.next_step(0.010)
    assert block == 0 and len(batch) == 1 and finished == []
    s.submit([Task(arrival=0.02, policy=policy()) for _ in range(5)])
    block, batch, _ = s.next_step(0.02)  # full batch: no wait
    assert block == 0 and len(batch) == 4


def test_block_1_waits_only_when_another_image_is_due_within_the_wait():
    s = BlockScheduler(3, max_batch_size=8, max_queue_delay_s=0.010, max_queue_size=1000)
    for k in range(40):  # one image every 50 ms: 0.2 expected within 10 ms; the first: no rate known yet
        s.submit([Task(arrival=0.05 * k, policy=policy())])
        step = s.next_step(0.05 * k)
        assert isinstance(step, tuple) and step[0] == 0 and len(step[1]) == 1  # runs at once, no wait
        s.complete(0, step[1], [1.0], 0.001)
    assert s.arrivals.per_second == pytest.approx(20.0)
    assert s.block1_wait() == 0.0
    for k in range(400):  # then one every 2 ms: 5 expected within 10 ms
        s.arrivals.observe(2.0 + 0.002 * k)
    assert s.arrivals.per_second == pytest.approx(500.0, rel=0.01)
    assert s.block1_wait() == 0.010
    s.submit([Task(arrival=2.8, policy=policy())])
    assert s.next_step(2.804) == pytest.approx(0.006)  # now it waits for the batch to grow
    assert isinstance(s.next_step(2.810), tuple)


def test_images_leave_when_confident_and_the_rest_move_on():
    s = BlockScheduler(3, 8, 0.0, 100)
    tasks = [Task(arrival=0.0, policy=policy()) for _ in range(4)]
    s.submit(tasks)
    block, batch, _ = s.next_step(0.0)
    finished = s.complete(block, batch, [0.95, 0.5, 0.91, 0.2], seconds=0.001)
    assert [(t.id, o) for t, o in finished] == [(tasks[0].id, Outcome.CONFIDENT), (tasks[2].id, Outcome.CONFIDENT)]
    assert s.depth(1) == 2 and s.in_flight == 2
    block, batch, _ = s.next_step(0.0)
    assert block == 1 and batch == [tasks[1], tasks[3]]
    finished = s.complete(block, batch, [0.1, 0.1], 0.001)
    assert finished == [] and s.depth(2) == 2
    block, batch, _ = s.next_step(0.0)
    finished = s.complete(block, batch, [0.1, 0.1], 0.001)
    assert [o for _, o in finished] == [Outcome.LAST_EXIT] * 2 and s.in_flight == 0
    assert all(t.exits_done == 3 for t, _ in finished)


def test_new_arrivals_do_not_wait_behind_deeper_blocks():
    s = BlockScheduler(4, 2, 0.0, 100)
    first = [Task(arrival=0.0, policy=policy((0.99,) * 3 + (0.0,))) for _ in range(2)]
    s.submit(first)
    block, batch, _ = s.next_step(0.0)
    s.complete(block, batch, [0.1, 0.1], 0.001)  # both go on to block 2
    s.submit([Task(arrival=1.0, policy=policy())])
    order = []
    for _ in range(3):
        block, batch, _ = s.next_step(1.0)
        order.append(block)
        s.complete(block, batch, [0.1] * len(batch), 0.001)
    # The older batch's block 2 ran first (oldest head); the newcomer ran before its block 3.
    assert order[:2] == [1, 0]


def test_queue_is_bounded_all_or_nothing():
    s = BlockScheduler(2, 4, 0.0, max_queue_size=5)
    s.submit([Task(arrival=0.0, policy=policy()) for _ in range(4)])
    with pytest.raises(QueueFull) as err:
        s.submit([Task(arrival=0.0, policy=policy()) for _ in range(2)])
    assert err.value.retry_after_s >= 1.0
    assert s.in_flight == 4 and s.depth(0) == 4


def test_deadlines_stop_before_a_block_that_would_overrun():
    lat = LatencyModel(3, safety=1.0)
    for n in (1, 8):
        for b in range(3):
            lat.observe(b, n, 0.001 + 0.0005 * n)  # 1 ms + 0.5 ms per image
    assert lat.estimate(0, 4) == pytest.approx(0.003)
    s = BlockScheduler(3, 8, 0.0, 100, lat)
    tight = Task(arrival=0.0, policy=policy((0.99, 0.99, 0.0)), deadline=0.0045)
    loose = Task(arrival=0.0, policy=policy((0.99, 0.99, 0.0)), deadline=1.0)
    late = Task(arrival=0.0, policy=policy(), deadline=0.001)
    s.submit([tight, loose, late])
    block, batch, finished = s.next_step(0.0)
    # 3 images: 2.5 ms estimated; `late` cannot make it: 504-style, nothing computed.
    assert finished == [(late, Outcome.EXPIRED)] and batch == [tight, loose]
    s.complete(block, batch, [0.1, 0.1], 0.002)
    block, batch, finished = s.next_step(0.002)
    # Block 2 for 2 images ~ 2 ms: `tight` would end at ~4.0-4.1 ms... after the safety-free estimate it fits.
    assert block == 1 and tight in batch
    s.complete(block, batch, [0.1, 0.1], 0.002)
    block, batch, finished = s.next_step(0.0042)
    assert finished == [(tight, Outcome.DEADLINE)] and batch == [loose]
    assert tight.exits_done == 2


def test_latency_model_fits_intercept_and_slope():
    lat = LatencyModel(1, safety=1.0)
    for _ in range(5):
        lat.observe(0, 1, 0.002)
        lat.observe(0, 64, 0.002 + 63 * 0.0001)
    assert lat.estimate(0, 32) == pytest.approx(0.002 + 31 * 0.0001, rel=1e-6)
    single = LatencyModel(1, safety=2.0)
    single.observe(0, 4, 0.004)
    assert single.estimate(0, 8) == pytest.approx(2 * 0.008)


def test_budget_policy_never_overspends():
    flops = [10.0, 25.0, 45.0]
    budget = 100.0  # exit 1 for all 5 (50), then 15 per image to exit 2, 20 more to exit 3
    p = BudgetPolicy(budget, 5, (0.99, 0.99, 0.0), flops)
    s = BlockScheduler(3, 8, 0.0, 100)
    tasks = [Task(arrival=0.0, policy=p) for _ in range(5)]
    s.submit(tasks)
    done = []
    while True:
        step = s.next_step(0.0)
        if step is None:
            break
        block, batch, finished = step
        done += finished
        done += s.complete(block, batch, [0.1] * len(batch), 0.001)
    spent = sum(flops[t.exits_done - 1] for t, _ in done)
    # In arrival order: three images reach exit 2 (95 committed); 5 left pays no further block.
    assert spent == p.committed == 95.0 <= budget
    assert sorted(t.exits_done for t, _ in done) == [1, 1, 2, 2, 2]
    assert sum(1 for _, o in done if o is Outcome.BUDGET) == 5
    with pytest.raises(ValueError, match="below"):
        BudgetPolicy(49.0, 5, (0.5, 0.5, 0.0), flops)


def test_nan_confidence_leaves_as_non_finite_at_any_exit():
    s = BlockScheduler(3, 4, 0.0, 16)
    a, b = Task(arrival=0.0, policy=policy()), Task(arrival=0.0, policy=policy())
    s.submit([a, b])
    block, batch, _ = s.next_step(1.0)
    finished = s.complete(block, batch, [float("nan"), 0.5], 0.01)
    assert finished == [(a, Outcome.NON_FINITE)]
    assert s.depth(1) == 1 and s.in_flight == 1


def test_deadline_images_go_first_earliest_deadline_first():
    s = BlockScheduler(3, 2, 0.0, 16)
    best_effort = [Task(arrival=0.0, policy=policy()) for _ in range(3)]
    late = Task(arrival=0.1, policy=policy(), deadline=9.0)
    early = Task(arrival=0.2, policy=policy(), deadline=5.0)
    s.submit(best_effort + [late, early])
    _, batch, _ = s.next_step(1.0)
    assert batch == [early, late]  # EDF ahead of older best-effort images
    _, batch, _ = s.next_step(1.0)
    assert batch == best_effort[:2]  # the rest keep arrival order
    assert s.depth(0) == 1 and s.in_flight == 5


def test_arrival_order_when_a_step_takes_the_whole_queue():
    s = BlockScheduler(3, 8, 0.0, 16)
    tasks = [Task(arrival=0.0, policy=policy()), Task(arrival=0.1, policy=policy(), deadline=5.0)]
    s.submit(tasks)
    _, batch, _ = s.next_step(1.0)
    assert batch == tasks
