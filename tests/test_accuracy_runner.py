"""Audits in the real runner (issue 24): answered once, at the exit served; carried on
to the last exit only with spare capacity; the last exit's class is the network's;
never charged to the budget controller; nothing outlives its request.

No timing assumptions: waits are bounded guards, and the spare-capacity rule is
checked from the scheduler's own state at each audit step (``Runner.step_hook``).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import numpy as np
import pytest
import torch

from model.checkpoint import load
from server.budget.controller import BudgetController
from server.budget.keeper import BudgetKeeper
from server.engine.runner import Runner
from server.engine.scheduler import Outcome, Task
from server.metrics import Metrics
from server.watch.feedback import FeedbackStore
from server.watch.monitor import AccuracyWatch
from server.watch.reference import CalibratedReference
from server.watch.sampler import AuditSampler
from tests.test_memory import live


class ExitById:
    """Image i leaves after exit 1 + i % 3 (random weights give no useful confidences)."""

    def leaves(self, task: Task, confidence: float) -> bool:
        return task.exits_done >= 1 + task.id % 3

    def may_continue(self, task: Task) -> bool:
        return True


def value(m: Metrics, name: str, **labels) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(params=[1, 2], ids=["1-model-thread", "2-model-threads"])
def engine(tiny_checkpoint, request):
    ck = load(tiny_checkpoint)
    flops = ck.exit_flops(lazy=True)
    metrics = Metrics(len(flops), flops)
    sampler = AuditSampler(1.0, flops, max_flops_share=1.0, burst=10_000, rng=random.Random(0),
                           on_skip=lambda reason: metrics.audit_skipped.labels(reason=reason).inc())
    sampler.credit = 1e15
    watch = AccuracyWatch(metrics, flops, CalibratedReference(list(ck.calibration.curve), len(flops)), sampler,
                          FeedbackStore(1000))
    keeper = BudgetKeeper(BudgetController(flops, list(ck.calibration.curve), flops[1]), ck.calibration.thresholds)
    r = Runner(ck, max_batch_size=8, max_queue_delay_s=0.0, max_queue_size=1024, torch_threads=1,
               model_threads=request.param, auditor=watch, watch=watch)
    r.start(warmup_rounds=1)
    yield ck, r, watch, keeper, metrics
    r.step_hook = None
    r.stop()


def test_audits_answer_once_run_apart_and_are_never_charged(engine):
    ck, runner, watch, keeper, metrics = engine
    flops = runner.exit_flops
    k_all = runner.num_exits
    done_calls: list[tuple[int, int, Outcome]] = []
    audit_steps: list[tuple[int, int, int]] = []  # (block, images, regular images in the scheduler)
    lock = threading.Lock()

    def on_done(task: Task, outcome: Outcome) -> None:  # what Service._on_classify_done charges
        with lock:
            done_calls.append((task.id, task.exits_done, outcome))
        keeper.observe(flops[task.exits_done - 1])

    def hook(block: int, batch: list[Task]) -> None:
        if batch[0].audit:
            audit_steps.append((block, len(batch), runner.scheduler.in_flight))

    runner.step_hook = hook
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((1, 28, 28)).astype(np.float32) for _ in range(24)]

    async def main():
        end = time.monotonic() + 120.0
        while not runner.ready:
            assert time.monotonic() < end, "runner did not warm up"
            await asyncio.sleep(0.01)
        futs = runner.submit(images, [ExitById()] * len(images), [None] * len(images), time.monotonic(), on_done,
                             auditable=True, keys=None)
        return await asyncio.gather(*futs)

    answers = asyncio.run(main())
    served = [f.exit for f in answers]
    audited_n = sum(e < k_all for e in served)
    end = time.monotonic() + 60.0
    while sum(value(metrics, "msdnet_agreement_total", exit=str(e), agree=a) for e in range(1, k_all)
              for a in ("true", "false")) < audited_n:
        assert time.monotonic() < end, "audits did not finish"
        time.sleep(0.02)

    # Answered once each, at the exit the policy chose, with that exit's cost.
    assert [f.outcome for f in answers].count(Outcome.AUDITED) == 0
    assert sorted(i for i, _, _ in done_calls) == sorted(set(i for i, _, _ in done_calls))
    assert len(done_calls) == len(images) and {e for _, e, _ in done_calls} == set(served)
    assert all(f.flops == flops[f.exit - 1] for f in answers) and audited_n >= len(images) // 2
    # The controller was charged the served FLOPs only; the audits' FLOPs are counted apart.
    c = keeper.controller
    assert c.requests == len(images) and c.window_sum == sum(flops[e - 1] for e in served)
    assert value(metrics, "msdnet_audit_flops_total") == sum(flops[-1] - flops[e - 1] for e in served)
    # Audit steps ran only when no request's image was queued or running, and never at block 1.
    assert audit_steps and all(n_regular == 0 and block > 0 for block, _, n_regular in audit_steps)
    # The last exit's class is the network's, and each answer's class agrees or not as the network says.
    with torch.no_grad():
        x = (torch.from_numpy(np.stack(images)))
        logits = ck.model(x)
    classes = [lg.argmax(1).numpy() for lg in logits]
    expect_agree = {e: 0 for e in range(1, k_all)}
    for i, f in enumerate(answers):
        assert int(np.argmax(f.probs)) == classes[f.exit - 1][i]
        if f.exit < k_all:
            expect_agree[f.exit] += int(classes[f.exit - 1][i] == classes[-1][i])
    for e, n in expect_agree.items():
        assert value(metrics, "msdnet_agreement_total", exit=str(e), agree="true") == n
    assert runner.scheduler.in_flight == 0 and runner.scheduler.audits.held == 0


def test_no_audit_runs_while_the_watch_is_closed_and_nothing_outlives_it(engine):
    _, runner, watch, _, metrics = engine
    watch.sampler.paused = True  # e.g. the latency objective degraded: nothing is sampled
    images = [np.zeros((1, 28, 28), np.float32) for _ in range(6)]

    async def main():
        end = time.monotonic() + 120.0
        while not runner.ready:
            assert time.monotonic() < end, "runner did not warm up"
            await asyncio.sleep(0.01)
        futs = runner.submit(images, [ExitById()] * 6, [None] * 6, time.monotonic(), auditable=True,
                             keys=[f"k{i}" for i in range(6)])
        return await asyncio.gather(*futs)

    answers = asyncio.run(main())
    assert runner.scheduler.audits.held == 0
    early = sum(f.exit < runner.num_exits for f in answers)
    del answers  # the test's own references
    assert value(metrics, "msdnet_audit_skipped_total", reason="objective") == early > 0
    assert value(metrics, "msdnet_audit_flops_total") == 0
    end = time.monotonic() + 30.0
    while live() != {} and time.monotonic() < end:
        time.sleep(0.05)
    assert live() == {}
