"""The engine core: the in-process :class:`server.engine.interface.Engine`.

It owns the runner (model threads, scheduler), the budget keeper and the
latency objective, and answers the HTTP layer (``server.http``, in this
process) or the engine process's socket (``server.ipc.engine``) with typed
results. The budget (``server.budget``) decides thresholds. FLOPs are
multiply-accumulates of convs and linears (MSDNet paper convention), cumulative
per exit, with lazy evaluation.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from .. import errors
from ..budget.controller import BudgetController
from ..budget.keeper import BudgetKeeper
from ..budget.objective import OPEN, Admission, LatencyObjective
from ..budget.policies import BudgetPolicy, ThresholdPolicy
from ..logs import request_id as current_request_id
from ..metrics import Metrics
from ..settings import Settings
from ..watch.feedback import Labelled
from ..watch.monitor import build_watch
from .interface import BatchOutcome, BudgetReport, check_admission
from .scheduler import Finished, Outcome, QueueFull, Task

if TYPE_CHECKING:  # torch only where the model runs: HTTP worker processes import this module too
    from model.checkpoint import Checkpoint

log = logging.getLogger("msdnet.service")


def _answer(f: Finished) -> Finished:
    """``f``, when it holds an answer.

    Raises:
        errors.NonFiniteOutput: (422) the network's logits were not finite.
    """
    if f.outcome is Outcome.NON_FINITE:
        raise errors.NonFiniteOutput(f"the network's output at exit {f.exit} is not finite (NaN or infinite) for "
                                     "this input, so no class is given; check the input's value range", exit=f.exit)
    return f


class Service:
    """Everything a request needs, created once in the app's lifespan.

    Raises:
        model.checkpoint.CheckpointError: the checkpoint is not calibrated.
    """

    def __init__(self, checkpoint: Checkpoint, settings: Settings, metrics: Metrics | None = None):
        from .runner import Runner

        cal = checkpoint.calibration
        if cal is None:
            from model.checkpoint import CheckpointError

            raise CheckpointError("checkpoint is not calibrated: run 'msdnet calibrate --checkpoint FILE'")
        self.settings = settings
        self.transforms = checkpoint.transforms
        self.classes = checkpoint.classes
        self.exit_flops = checkpoint.exit_flops(lazy=True)
        # FLOPs one image costs in each block's step (lazy evaluation: exit k's cost less exit k-1's)
        self._block_flops = [f - (self.exit_flops[k - 1] if k else 0) for k, f in enumerate(self.exit_flops)]
        self.num_exits = len(self.exit_flops)
        self.metrics = metrics or Metrics(self.num_exits, self.exit_flops)
        controller = BudgetController(self.exit_flops, list(cal.curve), settings.target_flops or cal.target_flops,
                                      horizon=settings.controller_horizon,
                                      bias_halflife=settings.controller_bias_halflife)
        self.keeper = BudgetKeeper(controller, cal.thresholds, settings.controller, on_change=self._export_budget)
        card_top1 = checkpoint.card.val_top1
        self.watch = build_watch(self.metrics, self.exit_flops, cal, card_top1[-1] if card_top1 else None,
                                 share=settings.agreement_sample, max_flops_share=settings.agreement_max_flops_share,
                                 store_size=settings.feedback_store_size,
                                 residual_halflife=settings.controller_bias_halflife)
        self.watch.point_cost = self.keeper.point_cost
        model_threads, torch_threads = settings.engine_threads(self.exit_flops[-1])
        self.runner = Runner(checkpoint, max_batch_size=settings.engine_batch(self.exit_flops[0]),
                             max_queue_delay_s=settings.max_queue_delay_ms / 1e3,
                             max_queue_size=settings.max_queue_size, torch_threads=torch_threads,
                             backend=settings.backend, on_step=self._on_step, model_threads=model_threads,
                             auditor=self.watch, max_audit_held=settings.agreement_max_held, watch=self.watch)
        log.info("engine: %d model thread(s) x %d intra-op thread(s), batches of up to %d, backend %s, "
                 "exit 1 %.1f and last exit %.1f MFLOPs", model_threads, torch_threads,
                 self.runner.scheduler.max_batch_size, settings.backend, self.exit_flops[0] / 1e6,
                 self.exit_flops[-1] / 1e6)
        self._classify_policy = ThresholdPolicy(self.keeper.thresholds)
        self._model_threads = model_threads
        self.objective = (LatencyObjective(settings.latency_slo_ms / 1e3, self.exit_flops, self.keeper.target)
                          if settings.latency_slo_ms else None)
        self._objective_lock = threading.Lock()  # model threads, the ticker and the event loop use it
        self._ticking = threading.Event()
        self._degraded_s = 0.0  # already exported to msdnet_degraded_seconds_total
        # since the last control step: requests' age when they reached the engine (sum, s), requests, images
        self._ages = [0.0, 0, 0]
        self.on_admission = None  # engine process: publishes each new Admission to the HTTP workers
        self.metrics.objective.set(settings.latency_slo_ms / 1e3 if settings.latency_slo_ms else 0.0)
        self.fleet = None  # a server.budget.fleet.Fleet when a Redis URL is configured
        self.metrics.set_model_info(checkpoint=str(checkpoint.path or ""), num_exits=str(self.num_exits),
                                    classes=str(len(self.classes)), image_size=str(self.transforms.image_size),
                                    exit_flops=",".join(str(f) for f in self.exit_flops))
        self.metrics.fleet_mode.set(0)  # written, so that a multiprocess scrape shows it too
        self._export_budget(self.keeper)

    @property
    def ready(self) -> bool:
        """Model loaded and warmed up."""
        return self.runner.ready

    @property
    def not_ready_reason(self) -> str:
        """Why :attr:`ready` is False, for the 503's message."""
        return "model is loading or warming up"

    # ---- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        """Start the model thread (it warms up first), the latency objective's ticker and,
        with Redis, fleet mode."""
        self.runner.start(self.settings.warmup_rounds)
        if self.objective is not None:
            # The loop also steps after every block step; the ticker keeps it going when no step
            # runs (every request refused, or none arriving), so a refusal can end.
            self._ticking = threading.Event()
            threading.Thread(target=self._tick, name="msdnet-objective", daemon=True).start()
        if self.settings.redis_url:
            from ..budget.fleet import Fleet

            self.fleet = Fleet(self.settings.redis_url, self.keeper, self.settings,
                               on_mode=lambda on: self.metrics.fleet_mode.set(1 if on else 0))
            self.fleet.start()

    def stop(self, timeout_s: float) -> None:
        """Stop the ticker, fleet mode and the model thread after its current step (blocking)."""
        if self.objective is not None:
            self._ticking.set()
        if self.fleet is not None:
            self.fleet.stop()
        self.runner.stop(timeout_s)

    # ---- budget -----------------------------------------------------------------
    async def set_target(self, target: float) -> None:
        """Change the target mean FLOPs per /classify request (the fleet's too in fleet mode);
        async like :class:`server.ipc.client.EngineClient`'s.

        Raises:
            ValueError: outside [exit 1's cost, last exit's cost].
        """
        self.keeper.set_target(target)
        if self.objective is not None:
            with self._objective_lock:
                self.objective.set_target(target)
            self.keeper.set_in_force(self.objective.in_force if self.objective.in_force < target else math.inf)
        if self.fleet is not None:
            self.fleet.publish_target(target)

    async def budget(self) -> BudgetReport:
        """The controller's state now (async like :class:`server.ipc.client.EngineClient`'s)."""
        fleet_on = self.fleet is not None and self.fleet.connected
        objective = None
        if self.objective is not None:
            with self._objective_lock:
                objective = self.objective.view()
        return BudgetReport(self.keeper.view(), "fleet" if fleet_on else "local",
                            self.fleet.fleet_mean() if self.fleet is not None else None, objective)

    def _export_budget(self, keeper: BudgetKeeper) -> None:
        m, c = self.metrics, keeper.controller
        m.target.set(c.target)
        m.in_force.set(c.in_force)
        if c.realised_mean is not None:
            m.realised.set(c.realised_mean)
        fleet_mean = self.fleet.fleet_mean() if self.fleet is not None else None
        m.fleet_realised.set(fleet_mean if fleet_mean is not None else (c.realised_mean or 0.0))
        for k, th in enumerate(keeper.thresholds(), start=1):
            m.threshold.labels(exit=str(k)).set(th)
        self.watch.set_target(c.in_force, lambda target: keeper.point_for(target).thresholds)

    # ---- engine callbacks (model thread) ----------------------------------------
    def _on_step(self, block: int, n: int, seconds: float, depths: list[int]) -> None:
        if n:  # 0: images left the queue without a step; only the depths changed
            self.metrics.batch_size.labels(block=str(block + 1)).observe(n)
        for b, d in enumerate(depths, start=1):
            self.metrics.queue_depth.labels(block=str(b)).set(d)
        if self.objective is not None:
            self._steer(seconds if n else 0.0, depths, n * self._block_flops[block])

    # ---- latency objective ---------------------------------------------------------
    def forecast_wait(self, depths: list[int] | None = None) -> float:
        """Forecast queueing delay (seconds) of an image arriving now: the work queued
        at every block (``depths``, default the scheduler's now) at the step-time
        model's per-image cost of a full batch, shared by the model threads."""
        sched = self.runner.scheduler
        if depths is None:
            depths = [sched.depth(b) for b in range(self.num_exits)]
        size = sched.max_batch_size
        work = sum(d * sched.latency.estimate(b, size) / size for b, d in enumerate(depths) if d)
        return work / self._model_threads

    def _steer(self, busy_s: float, depths: list[int], flops: float = 0.0) -> None:
        """The latency objective's control step (model thread, after a step that took
        ``busy_s`` seconds and ran ``flops`` FLOPs)."""
        obj = self.objective
        now = time.monotonic()
        with self._objective_lock:
            obj.add_busy(busy_s, flops)
            if not obj.due(now):
                return
            obj.set_target(self.keeper.target)  # PUT /budget, or the fleet's target adopted on the fleet thread
            total, n, images = self._ages
            self._ages = [0.0, 0, 0]
            changed = obj.update(now, self.forecast_wait(depths) + (total / n if n else 0.0), self._model_threads,
                                 images)
            view, admission = obj.view(), obj.admission(obj.wait_s)
            degraded_s, self._degraded_s = obj.degraded_s - self._degraded_s, obj.degraded_s
        self.watch.sampler.paused = view.state != "steady"  # no audit work unless the objective is at ease
        if changed:
            degraded = view.in_force_flops < view.configured_flops
            self.keeper.set_in_force(view.in_force_flops if degraded else math.inf)
        m = self.metrics
        if degraded_s > 0:
            m.degraded_seconds.inc(degraded_s)
        for state in ("steady", "degraded", "refusing"):
            m.objective_state.labels(state=state).set(1 if state == view.state else 0)
        m.forecast_wait.set(view.wait_ms / 1e3)
        m.busy.set(view.busy)
        if self.on_admission is not None:
            self.on_admission(admission)

    def _tick(self) -> None:
        """The latency objective's control step every interval, steps or none."""
        interval = self.objective.interval_s
        while not self._ticking.wait(interval):
            self._steer(0.0, [self.runner.scheduler.depth(b) for b in range(self.num_exits)])

    def admission(self) -> Admission:
        """The rule for a request arriving now (:class:`server.budget.objective.Admission`):
        always admitted without a latency objective."""
        if self.objective is None:
            return OPEN
        wait = self.forecast_wait()
        with self._objective_lock:  # the fresh forecast, or the last control step's (it adds requests' age)
            return self.objective.admission(max(wait, self.objective.wait_s))

    def admit(self, deadline_ms: float | None, started: float) -> None:
        """Refuse a request before its image is decoded (:func:`check_admission`).

        Raises:
            errors.DeadlineExceeded: (504) its deadline passed or cannot be met at the forecast wait.
            errors.Saturated: (503, Retry-After) the latency objective refuses it.
        """
        check_admission(self.admission(), deadline_ms, started, self.metrics)

    def _on_classify_done(self, task: Task, outcome: Outcome) -> None:
        if outcome is Outcome.CANCELLED:
            self.metrics.cancelled.inc()
            return
        if outcome in (Outcome.EXPIRED, Outcome.NON_FINITE):  # nothing answered: nothing charged
            return
        flops = self.exit_flops[task.exits_done - 1]
        if self.keeper.in_force < self.keeper.target:
            self.metrics.degraded_answers.inc()
        self.metrics.exits.labels(exit=str(task.exits_done)).inc()
        self.metrics.flops.labels(endpoint="/classify").inc(flops)
        self.metrics.request_flops.observe(flops)
        if self.fleet is not None:
            self.fleet.record()
        self.keeper.observe(flops)

    def _on_batch_done(self, task: Task, outcome: Outcome) -> None:
        if outcome is Outcome.CANCELLED:
            self.metrics.cancelled.inc()
            return
        if outcome is Outcome.NON_FINITE:
            return
        self.metrics.exits.labels(exit=str(task.exits_done)).inc()
        self.metrics.flops.labels(endpoint="/batch").inc(self.exit_flops[task.exits_done - 1])

    # ---- requests -------------------------------------------------------------------
    def _submit(self, images, policies, deadlines, started, on_done, key: str | None = None, auditable: bool = False):
        ages = self._ages  # how old requests are when they reach the engine (the objective's loop)
        ages[0] += time.monotonic() - started
        ages[1] += 1
        ages[2] += len(images)
        try:  # /classify images may be audited; a one-image request's answer is kept for feedback
            return self.runner.submit(images, policies, deadlines, started, on_done, auditable=auditable,
                                      keys=[key] if key is not None else None)
        except QueueFull as exc:
            raise errors.Overloaded(str(exc), headers={"Retry-After": str(math.ceil(exc.retry_after_s))},
                                    retry_after_s=exc.retry_after_s) from exc

    async def _gather(self, futures: list[asyncio.Future]) -> list[Finished]:
        """The answers of ``futures``. Cancelled with the awaiting request (its client
        closed the connection), ``gather`` cancels them, and the runner then runs
        no further block for their images (``Runner.submit``)."""
        try:
            return await asyncio.gather(*futures)
        except asyncio.CancelledError:
            self.metrics.client_gone.inc()
            raise

    async def classify(self, images: list[np.ndarray], deadline_ms: float | None, started: float,
                       request_id: str | None = None) -> list[Finished]:
        """Anytime inference (paper §5.1) on decoded images, each float32 (C, H, W)
        as :meth:`decode` returns: each leaves at its first exit whose confidence
        reaches the threshold in force, or the deepest one ``deadline_ms``
        (milliseconds from ``started``, the request's arrival) allows. Every image
        feeds the budget controller. All images finish before an error is raised.
        A one-image request's answer is kept for :meth:`feedback` under
        ``request_id`` (default: the HTTP request's id).

        Raises:
            errors.Overloaded: queue full (503).
            errors.DeadlineExceeded: the deadline passed before exit 1 could run (504).
            errors.NonFiniteOutput: the network's output is not finite (422).
        """
        deadline = None if deadline_ms is None else started + deadline_ms / 1e3
        n = len(images)
        if deadline_ms is not None:
            self.metrics.deadline_requests.inc(n)
        rid = current_request_id.get() if request_id is None else request_id
        futures = self._submit(images, [self._classify_policy] * n, [deadline] * n, started, self._on_classify_done,
                               rid if n == 1 and rid != "-" else None, auditable=True)
        done: list[Finished] = list(await self._gather(futures))
        in_force = self.keeper.in_force
        degraded = in_force < self.keeper.target
        done = [replace(f, target_flops=in_force, degraded=degraded) for f in done]
        if deadline_ms is not None:  # a miss: refused (504) or answered after the deadline
            late = (time.monotonic() - started) * 1e3 > deadline_ms
            self.metrics.deadline_misses.inc(sum(late or f.outcome is Outcome.EXPIRED for f in done))
        for f in done:
            if f.outcome is Outcome.EXPIRED:
                raise errors.DeadlineExceeded(f"deadline of {deadline_ms:g} ms passed before exit 1 could run; "
                                              "nothing was computed", deadline_ms=deadline_ms)
        return [_answer(f) for f in done]

    async def feedback(self, request_id: str, label: int) -> Labelled:
        """Score request ``request_id``'s answer against its true class ``label`` (a class
        id, checked by the caller); async like :class:`server.ipc.client.EngineClient`'s.

        Raises:
            errors.UnknownRequest: (404) no answer of that id is held.
            errors.AlreadyLabelled: (409) it was labelled already.
        """
        return self.watch.feedback(request_id, label)

    def _check_budget(self, budget: float, n: int) -> None:
        minimum = n * self.exit_flops[0]
        if budget < minimum:
            raise errors.BudgetTooSmall(
                f"flops_budget {budget:.0f} is below the minimum for {n} images: {n} x {self.exit_flops[0]} "
                f"(exit 1's cost) = {minimum:.0f} FLOPs", minimum_flops_budget=minimum)

    async def batch(self, items: list[np.ndarray | errors.ServiceError], flops_budget: float | None,
                    started: float) -> BatchOutcome:
        """Budgeted batch classification (paper §5.2) of decoded images under
        ``flops_budget`` FLOPs for all of them (default: N x the controller's
        target): thresholds are the calibration curve's for the budget per image,
        and the policy caps spending, so ``flops_used <= flops_budget``. An item
        that is already an error (a bad image) keeps its place and costs nothing.

        Raises:
            errors.BudgetTooSmall: budget below N x exit 1's cost (422).
            errors.Overloaded: queue full (503).
        """
        n = len(items)
        budget = float(flops_budget) if flops_budget is not None else n * self.keeper.in_force
        self._check_budget(budget, n)
        index = [i for i, item in enumerate(items) if not isinstance(item, errors.ServiceError)]
        results: list[Finished | errors.ServiceError] = list(items)  # errors stay; images are replaced
        counts = {str(k): 0 for k in range(1, self.num_exits + 1)}
        used = 0
        if index:
            point = self.keeper.point_for(budget / n)
            policy = BudgetPolicy(budget, n, point.thresholds, self.exit_flops)
            futures = self._submit([items[i] for i in index], [policy] * len(index), [None] * len(index), started,
                                   self._on_batch_done)
            for i, f in zip(index, await self._gather(futures)):
                used += int(f.flops)  # spent even when the output is not finite
                try:
                    results[i] = _answer(f)
                    counts[str(f.exit)] += 1
                except errors.NonFiniteOutput as exc:
                    results[i] = exc
        return BatchOutcome(results, used, budget, counts)
