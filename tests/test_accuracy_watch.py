"""The accuracy watch as plain units (issue 24): the sampling rule, the spare-capacity
rule, audits never charged to the budget controller, the feedback store, the
calibration's figures. No torch, no HTTP: the scheduler with a fake clock, and a
stand-in for the runner's bookkeeping (the real runner: tests/test_accuracy_runner.py)."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest

from model import calibration as C
from model.curve import OperatingPoint
from server import errors
from server.budget.controller import BudgetController
from server.budget.keeper import BudgetKeeper
from server.budget.policies import BudgetPolicy, ThresholdPolicy
from server.engine.scheduler import BlockScheduler, Finished, Outcome, Task
from server.metrics import Metrics
from server.watch.feedback import FeedbackStore
from server.watch.monitor import AccuracyWatch
from server.watch.reference import CalibratedReference
from server.watch.sampler import AuditSampler

FLOPS = [10.0, 20.0, 30.0, 40.0]  # cumulative per exit (multiply-accumulates)


class OpenAuditor:
    """Audits every image offered (the scheduler's rule is under test, not sampling)."""

    def __init__(self):
        self.open, self.offered, self.dropped_tasks = True, [], []

    def wants(self, task):
        self.offered.append(task)
        return True

    def dropped(self, task):
        self.dropped_tasks.append(task)


def policy(th=(0.9, 0.9, 0.9, 0.0)):
    return ThresholdPolicy(lambda: th)


def scheduler(auditor, **kw) -> BlockScheduler:
    return BlockScheduler(4, 8, 0.0, 100, auditor=auditor, **kw)


def leave_at_exit_1(s: BlockScheduler, n: int, t: float = 0.0) -> list[Task]:
    tasks = [Task(arrival=t, policy=policy(), auditable=True) for _ in range(n)]
    s.submit(tasks)
    block, batch, _ = s.next_step(t)
    done = s.complete(block, batch, [0.95] * len(batch), 0.001)
    assert [o for _, o in done] == [Outcome.CONFIDENT] * n
    s.queue_audits([task for task, _ in done if task.audit])  # the runner, once their answers are out
    return tasks


def test_the_watch_imports_no_torch_and_no_http():
    code = ("import sys, server.watch.monitor, server.watch.sampler, server.watch.feedback, server.engine.audit; "
            "assert 'torch' not in sys.modules and 'fastapi' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the spare-capacity rule (scheduler) ------------------------------------------------

def test_an_audited_image_is_answered_then_runs_on_to_the_last_exit_apart():
    s = scheduler(OpenAuditor())
    (task,) = leave_at_exit_1(s, 1)
    assert task.audit and s.in_flight == 0 and s.audits.held == 1
    seen = []
    while (step := s.next_step(0.0)) is not None:
        block, batch, finished = step
        assert batch == [task] and finished == []
        seen.append(block)
        done = s.complete(block, batch, [0.2], 0.001)  # never "leaves" early: an audit goes to the end
        if block < 3:
            assert done == []
    assert seen == [1, 2, 3] and done == [(task, Outcome.AUDITED)] and task.exits_done == 4
    assert s.audits.held == 0 and s.in_flight == 0


def test_audit_steps_run_only_when_no_regular_image_is_queued_or_running():
    s = scheduler(OpenAuditor())
    leave_at_exit_1(s, 2)
    s.submit([Task(arrival=0.0, policy=policy())])  # a request arrives
    block, batch, _ = s.next_step(0.0)
    assert block == 0 and not batch[0].audit  # the request goes first
    assert s.next_step(0.0) is None  # its step is running: no audit step beside it
    s.complete(block, batch, [0.1], 0.001)  # it goes on to block 2
    block, batch, _ = s.next_step(0.0)
    assert block == 1 and [t.audit for t in batch] == [False]  # still the request, alone
    s.complete(block, batch, [0.99], 0.001)  # answered
    block, batch, _ = s.next_step(0.0)
    assert all(t.audit for t in batch) and len(batch) == 2  # now, spare capacity


def test_no_audit_step_while_block_1_waits_to_fill_a_batch():
    s = BlockScheduler(4, 8, 0.010, 100, adaptive_wait=False, auditor=OpenAuditor())
    tasks = [Task(arrival=0.0, policy=policy(), auditable=True)]
    s.submit(tasks)
    block, batch, _ = s.next_step(0.010)
    s.queue_audits([t for t, _ in s.complete(block, batch, [0.95], 0.001) if t.audit])
    s.submit([Task(arrival=0.020, policy=policy())])
    assert s.next_step(0.021) == pytest.approx(0.009)  # waits for the request's batch, not for audits


def test_no_audit_step_while_the_auditor_is_closed():
    auditor = OpenAuditor()
    s = scheduler(auditor)
    leave_at_exit_1(s, 1)
    auditor.open = False  # e.g. the latency objective degraded
    assert s.next_step(0.0) is None
    auditor.open = True
    assert s.next_step(0.0)[0] == 1


def test_audits_are_bounded_dropping_the_oldest_and_never_count_against_the_queue():
    auditor = OpenAuditor()
    s = BlockScheduler(4, 8, 0.0, 4, auditor=auditor, max_audit_held=3)
    first = leave_at_exit_1(s, 2, t=0.0)
    later = leave_at_exit_1(s, 2, t=1.0)
    assert s.audits.held == 3 and auditor.dropped_tasks == [first[0]]
    s.submit([Task(arrival=2.0, policy=policy()) for _ in range(4)])  # a full regular queue still fits
    assert s.in_flight == 4
    held = [t for q in s.audits.queues for t in q]
    assert held == [first[1], *later]


def test_batch_images_and_last_exit_images_are_never_offered():
    auditor = OpenAuditor()
    s = scheduler(auditor)
    b = BudgetPolicy(1e9, 2, (0.9, 0.9, 0.9, 0.0), FLOPS)
    tasks = [Task(arrival=0.0, policy=b), Task(arrival=0.0, policy=b)]  # /batch: not auditable
    s.submit(tasks)
    block, batch, _ = s.next_step(0.0)
    s.complete(block, batch, [0.95, 0.95], 0.001)
    assert auditor.offered == []
    t = Task(arrival=0.0, policy=policy((0.99, 0.99, 0.99, 0.0)), auditable=True)
    s.submit([t])
    for _ in range(4):
        block, batch, _ = s.next_step(0.0)
        done = s.complete(block, batch, [0.5], 0.001)
    assert done == [(t, Outcome.LAST_EXIT)] and auditor.offered == []


# ---- the sampling rule ----------------------------------------------------------------

class Leaving:
    def __init__(self, k):
        self.exits_done = k


def test_sampling_share_and_no_sampling_at_the_last_exit():
    s = AuditSampler(0.25, FLOPS, max_flops_share=1.0, burst=1000, rng=random.Random(1))
    s.credit = 1e12
    picked = sum(s.wants(Leaving(1)) for _ in range(4000))
    assert 900 < picked < 1100
    assert not any(s.wants(Leaving(4)) for _ in range(100))
    assert not AuditSampler(0.0, FLOPS).wants(Leaving(1)) and not AuditSampler(0.0, FLOPS).open


def test_sampling_pauses_with_the_objective_and_counts_it():
    skipped = []
    s = AuditSampler(1.0, FLOPS, on_skip=skipped.append)
    s.paused = True
    assert not s.open and not s.wants(Leaving(1)) and skipped == ["objective"]


def test_audit_flops_stay_within_their_share_of_the_served_flops():
    skipped = []
    s = AuditSampler(1.0, FLOPS, max_flops_share=0.05, burst=2, rng=random.Random(0), on_skip=skipped.append)
    served = audit = 0.0
    rng = random.Random(2)
    for _ in range(20000):
        k = rng.choice([1, 1, 2, 3, 4])
        served += FLOPS[k - 1]
        if s.wants(Leaving(k)):
            audit += s.cost(k)
        s.served(FLOPS[k - 1])
    assert audit <= 0.05 * served + (FLOPS[-1] - FLOPS[0])  # plus the one audit credited at start
    assert audit > 0.045 * served and "flops_cap" in skipped


def test_sampler_refuses_bad_settings():
    for kw in ({"share": -0.1}, {"share": 1.5}, {"share": 0.1, "max_flops_share": 0.0}):
        with pytest.raises(ValueError):
            AuditSampler(kw.pop("share"), FLOPS, **kw)


# ---- never charged to the budget controller -------------------------------------------

def point(mean, th, agree=None):
    return OperatingPoint(mean, th, 0.9, None, None, agree, (0.95, 0.8, 0.7, 0.6), (0.96, 0.85, 0.75, 0.6))


CURVE = [point(15.0, (0.8, 0.8, 0.8, 0.0), (0.99, 0.9, 0.8, 1.0)),
         point(25.0, (0.95, 0.95, 0.95, 0.0), (0.995, 0.95, 0.9, 1.0))]


def make_watch(share=1.0, store=100) -> tuple[AccuracyWatch, Metrics]:
    m = Metrics(4, [int(f) for f in FLOPS])
    sampler = AuditSampler(share, FLOPS, max_flops_share=1.0, burst=1000, rng=random.Random(0))
    return AccuracyWatch(m, FLOPS, CalibratedReference(CURVE, 4, 0.9), sampler, FeedbackStore(store)), m


def value(m: Metrics, name: str, **labels) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def test_audits_are_never_charged_to_the_controller():
    """The engine's bookkeeping, as the runner does it (``Runner._finish_all``): an
    answer (any outcome but AUDITED) goes to ``on_done`` (the service charges the
    keeper there) and to the watch; an audit's steps and its end go to the watch only."""
    watch, m = make_watch()
    keeper = BudgetKeeper(BudgetController(FLOPS, CURVE, 20.0), CURVE[0].thresholds)
    s = BlockScheduler(4, 8, 0.0, 100, auditor=watch)
    rng = np.random.default_rng(0)
    charged, audit_flops = [], 0.0
    for i in range(50):
        task = Task(arrival=float(i), policy=ThresholdPolicy(keeper.thresholds), auditable=True, key=f"r{i}")
        s.submit([task])
        while (step := s.next_step(float(i))) is not None:
            block, batch, _ = step
            conf = rng.uniform(0.5, 1.0, len(batch)).tolist()
            audit_step = batch[0].audit  # before complete() samples some of a regular step
            done = s.complete(block, batch, conf, 0.001)
            if audit_step:
                watch.audit_step(block, len(batch), 0.001)
                audit_flops += len(batch) * (FLOPS[block] - FLOPS[block - 1])
            else:
                watch.confidences(block, conf)
            for t, outcome in done:
                if outcome is Outcome.AUDITED:
                    watch.audited(t, t.served, 3, 3)
                    continue
                flops = FLOPS[t.exits_done - 1]
                keeper.observe(flops)  # what Service._on_classify_done does with an answer
                charged.append(flops)
                t.served = t.exits_done
                watch.answered(t, Finished(outcome, t.exits_done, np.eye(4)[3], int(flops), conf[0]))
            s.queue_audits([t for t, o in done if t.audit and o is not Outcome.AUDITED])
    c = keeper.controller
    assert c.requests == 50 and c.window_sum == sum(charged)
    audited = sum(value(m, "msdnet_agreement_total", exit=str(k), agree="true") for k in (1, 2, 3))
    assert audited > 10 and value(m, "msdnet_audit_flops_total") == audit_flops > 0
    assert value(m, "msdnet_exit_confidence_count", exit="1") == 50  # regular steps only


# ---- the watch's metrics ---------------------------------------------------------------

def test_agreement_counts_with_the_calibrations_expectation():
    watch, m = make_watch()
    watch.set_target(25.0, lambda t: CURVE[1].thresholds)
    t = Task(arrival=0.0, policy=policy(), auditable=True, key="a")
    watch.audited(t, 2, 5, 5)
    watch.audited(t, 2, 5, 6)
    assert value(m, "msdnet_agreement_total", exit="2", agree="true") == 1
    assert value(m, "msdnet_agreement_total", exit="2", agree="false") == 1
    assert value(m, "msdnet_agreement_expected_total", exit="2") == pytest.approx(2 * 0.95)
    assert value(m, "msdnet_calibrated_agreement_ratio", exit="1") == 0.995
    assert value(m, "msdnet_calibrated_threshold", exit="3") == 0.95
    assert value(m, "msdnet_calibrated_accuracy_ratio", exit="2", at="last") == 0.85
    watch.audited(t, 1, 5, None)  # a non-finite last exit: nothing to compare
    assert value(m, "msdnet_agreement_total", exit="1", agree="true") == 0


def test_audit_flops_are_counted_per_audit_step():
    watch, m = make_watch()
    watch.audit_step(1, 3, 0.001)  # 3 images run block 2: 10 FLOPs each
    watch.audit_step(3, 2, 0.001)
    assert value(m, "msdnet_audit_flops_total") == 3 * 10 + 2 * 10


def test_feedback_scores_served_and_last_exit_answers():
    watch, m = make_watch()
    probs = np.eye(4)
    audited = Task(arrival=0.0, policy=policy(), auditable=True, key="x", audit=True)
    watch.answered(audited, Finished(Outcome.CONFIDENT, 1, probs[2], 10, 0.95))
    plain = Task(arrival=0.0, policy=policy(), auditable=True, key="y")
    watch.answered(plain, Finished(Outcome.LAST_EXIT, 4, probs[1], 40, 0.5))
    early = watch.feedback("x", 3)  # the label comes before the audit finishes
    assert (early.exit, early.served_class, early.audited, early.last_class) == (1, 2, True, None)
    watch.audited(audited, 1, 2, 3)  # the last exit says 3: right
    assert value(m, "msdnet_feedback_total", exit="1", served="wrong") == 1
    assert value(m, "msdnet_feedback_last_exit_total", exit="1", last="correct") == 1
    assert watch.feedback("y", 1).served_class == 1
    assert value(m, "msdnet_feedback_total", exit="4", served="correct") == 1
    with pytest.raises(errors.AlreadyLabelled):
        watch.feedback("y", 1)
    with pytest.raises(errors.UnknownRequest) as exc:
        watch.feedback("nobody", 1)
    assert exc.value.status == 404 and exc.value.details == {"request_id": "nobody"}


def test_batch_answers_are_neither_kept_nor_credited():
    watch, _ = make_watch()
    before = watch.sampler.credit
    watch.answered(Task(arrival=0.0, policy=policy(), key="b"), Finished(Outcome.BUDGET, 1, np.eye(4)[0], 10, 0.9))
    with pytest.raises(errors.UnknownRequest):
        watch.feedback("b", 0)
    assert watch.sampler.credit == before


# ---- the store and the reference ------------------------------------------------------

def test_feedback_store_keeps_the_newest_answers():
    s = FeedbackStore(2)
    for key in ("a", "b", "c"):
        s.answered(key, 1, 0, False)
    with pytest.raises(errors.UnknownRequest, match="newest 2 answers"):
        s.label("a", 0)
    assert s.label("c", 0).exit == 1 and len(s) == 2
    assert s.audited("d", 2, 1, 1) is None  # the audit finished before its answer was recorded
    s.answered("d", 2, 1, True)
    assert s.label("d", 1).last_class == 1


def test_reference_figures_and_the_bound_of_older_checkpoints():
    ref = CalibratedReference(CURVE, 4, 0.9)
    at = ref.at(20.0)
    assert at.agreement == (0.99, 0.9, 0.8, 1.0) and not at.derived and at.top1[0] == 0.95
    old = CalibratedReference([OperatingPoint(15.0, (0.8, 0.8, 0.8, 0.0), 0.88)], 4, 0.93)
    assert old.at(20.0).derived and old.at(20.0).agreement == pytest.approx((0.81, 0.81, 0.81, 1.0))
    assert not old.has_figures and ref.has_figures


def test_exit_figures_from_calibration_images():
    conf = np.array([[0.9, 0.5, 0.95, 0.2], [0.99, 0.99, 0.99, 0.99]])
    pred = np.array([[1, 0, 2, 0], [1, 1, 3, 2]])
    labels = np.array([1, 1, 2, 2])
    f = C.exit_figures(conf, pred, labels, [0.8, 0.0])
    assert f["exit_agreement"] == (0.5, 1.0)   # exit 1 serves images 0 and 2: 1 agrees
    assert f["exit_top1"] == (1.0, 1.0) and f["exit_last_top1"] == (0.5, 1.0)
    none = C.exit_figures(conf, pred, labels, [1.1, 0.0])
    assert none["exit_agreement"] == (None, 1.0)


def test_operating_point_keeps_its_figures_through_the_file_dict():
    p = CURVE[0]
    assert OperatingPoint.from_dict(p.to_dict()) == p
    old = OperatingPoint(1.0, (0.5, 0.0), 0.9, 2.0, (0.5, 0.5))
    assert "exit_agreement" not in old.to_dict() and OperatingPoint.from_dict(old.to_dict()) == old


def test_one_rule_for_a_label():
    from server.http.params import label

    classes = ("T-shirt/top", "Trouser", "Pullover")
    assert label(2, classes) == 2 and label("Trouser", classes) == 1
    for bad in (3, -1, True, 1.0, "trouser", None, [1]):
        with pytest.raises(errors.InvalidParameter) as exc:
            label(bad, classes)
        assert exc.value.details == {"field": "label"} and "0..2" in exc.value.message


def test_the_curve_residual_is_what_answers_cost_beyond_the_thresholds_in_force():
    watch, m = make_watch()
    watch.point_cost = lambda: 15.0  # the thresholds in force cost 15 FLOPs per image on the validation split
    t = Task(arrival=0.0, policy=policy(), auditable=True)
    for _ in range(1000):  # answers at exit 2 (20 FLOPs): 5 more than calibrated (half-life 50 answers)
        watch.answered(t, Finished(Outcome.CONFIDENT, 2, np.eye(4)[0], 20, 0.9))
    assert value(m, "msdnet_curve_residual_flops_per_request") == pytest.approx(5.0, rel=1e-3)
    watch.answered(t, Finished(Outcome.DEADLINE, 4, np.eye(4)[0], 40, 0.2))  # the deadline chose that exit
    assert value(m, "msdnet_curve_residual_flops_per_request") == pytest.approx(5.0, rel=1e-3)


def test_keeper_knows_what_the_thresholds_in_force_cost():
    controller = BudgetController(FLOPS, CURVE, 20.0)
    keeper = BudgetKeeper(controller, CURVE[1].thresholds)
    assert keeper.point_cost() == controller.point_cost == 15.0  # the curve's point for 20 FLOPs
    fixed = BudgetKeeper(BudgetController(FLOPS, CURVE, 20.0), CURVE[1].thresholds, enabled=False)
    assert fixed.point_cost() == 25.0  # the checkpoint's thresholds: that point
    fixed.set_in_force(16.0)  # degraded by the latency objective: the curve's point for 16
    assert fixed.thresholds() == CURVE[0].thresholds and fixed.point_cost() == 15.0
