"""The classification service: decode, submit to the runner, shape the answers.

Between the HTTP layer (``server.http``), which only translates requests, and the
runner, which only executes. FLOPs are multiply-accumulates of convs and linears
(MSDNet paper convention), cumulative per exit, with lazy evaluation.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import numpy as np

from model.checkpoint import Checkpoint

from . import errors
from .budget.controller import BudgetController, OperatingPoint
from .engine.runner import Finished, Runner
from .engine.scheduler import BudgetPolicy, Outcome, QueueFull, Task, ThresholdPolicy
from .images import InputSpec, decode
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("msdnet.service")


def check_finite(f: Finished) -> None:
    """Raises errors.NonFiniteOutput (422) when ``f`` holds no answer because the
    network's logits were not finite."""
    if f.outcome is Outcome.NON_FINITE:
        raise errors.NonFiniteOutput(f"the network's output at exit {f.exit} is not finite (NaN or infinite) for "
                                     "this input, so no class is given; check the input's value range", exit=f.exit)


class Service:
    """Everything a request needs, created once in the app's lifespan."""

    def __init__(self, checkpoint: Checkpoint, settings: Settings, metrics: Metrics | None = None):
        self.checkpoint = checkpoint
        self.settings = settings
        self.spec = InputSpec.from_transforms(checkpoint.transforms)
        self.classes = checkpoint.classes
        self.exit_flops = checkpoint.exit_flops(lazy=True)
        self.num_exits = len(self.exit_flops)
        self.metrics = metrics or Metrics(self.num_exits, self.exit_flops)
        cal = checkpoint.calibration
        if cal is None:
            raise errors.NotReady("checkpoint is not calibrated: run 'msdnet calibrate --checkpoint FILE'")
        self.fixed_thresholds = tuple(cal["thresholds"])
        curve = [OperatingPoint(p["mean_flops"], tuple(p["thresholds"])) for p in cal["curve"]]
        target = settings.target_flops or cal["target_flops"]
        self.controller = BudgetController(self.exit_flops, curve, target, horizon=settings.controller_horizon,
                                           bias_halflife=settings.controller_bias_halflife)
        self.runner = Runner(checkpoint, max_batch_size=settings.max_batch_size,
                             max_queue_delay_s=settings.max_queue_delay_ms / 1e3,
                             max_queue_size=settings.max_queue_size, torch_threads=settings.torch_threads,
                             on_step=self._on_step)
        self._classify_policy = ThresholdPolicy(self.thresholds)
        self._lock = threading.Lock()  # the controller is used by the model, fleet and event-loop threads
        self.fleet = None  # set by server.budget.fleet when a Redis URL is configured
        m = self.metrics
        m.model.info({"checkpoint": str(checkpoint.path or ""), "num_exits": str(self.num_exits),
                      "classes": str(len(self.classes)), "image_size": str(self.spec.image_size),
                      "exit_flops": ",".join(str(f) for f in self.exit_flops)})
        self._export_budget()

    # ---- thresholds and budget ----------------------------------------------
    def thresholds(self) -> tuple[float, ...]:
        """Thresholds in force: the controller's, or the checkpoint's when it is off."""
        return self.controller.thresholds if self.settings.controller else self.fixed_thresholds

    def _export_budget(self) -> None:
        m, c = self.metrics, self.controller
        m.target.set(c.target)
        if c.realised_mean is not None:
            m.realised.set(c.realised_mean)
        fleet_mean = self.fleet.fleet_mean() if self.fleet is not None else None
        m.fleet_realised.set(fleet_mean if fleet_mean is not None else (c.realised_mean or 0.0))
        for k, th in enumerate(self.thresholds(), start=1):
            m.threshold.labels(exit=str(k)).set(th)

    def set_target(self, target: float, publish: bool = True) -> None:
        """Change the target mean FLOPs per /classify request; in fleet mode
        also the fleet's (unless ``publish`` is False).

        Raises:
            ValueError: outside [exit 1's cost, last exit's cost].
        """
        with self._lock:
            self.controller.set_target(target)
            self._export_budget()
        if publish and self.fleet is not None:
            self.fleet.publish_target(target)

    def set_fleet(self, view, own_rate: float, horizon: float | None = None) -> None:
        """Steer on the fleet's figures (``view``) or, with None, locally."""
        with self._lock:
            self.controller.set_fleet(view, own_rate, horizon)
            self._export_budget()

    def controller_snapshot(self) -> dict:
        """The figures a replica publishes to the fleet (FLOPs and 1/request)."""
        with self._lock:
            c = self.controller
            return {"deficit": c.deficit, "bias": c.bias, "window_sum": c.window_sum, "window_n": len(c.window),
                    "target": c.target}

    def budget_state(self) -> dict:
        c = self.controller
        return {"target_flops": c.target, "realised_flops": c.realised_mean, "window": len(c.window),
                "thresholds": [None if th == float("inf") else th for th in self.thresholds()],
                "command_flops": c.command, "requests": c.requests, "controller": self.settings.controller,
                "mode": "fleet" if self.fleet is not None and self.fleet.connected else "local",
                "fleet_realised_flops": self.fleet.fleet_mean() if self.fleet is not None else None}

    # ---- runner callbacks (model thread) ------------------------------------
    def _on_step(self, block: int, n: int, seconds: float, depths: list[int]) -> None:
        self.metrics.batch_size.labels(block=str(block + 1)).observe(n)
        for b, d in enumerate(depths, start=1):
            self.metrics.queue_depth.labels(block=str(b)).set(d)

    def _on_classify_done(self, task: Task, outcome: Outcome) -> None:
        if outcome in (Outcome.EXPIRED, Outcome.NON_FINITE):  # nothing answered: nothing charged
            return
        flops = self.exit_flops[task.exits_done - 1]
        self.metrics.exits.labels(exit=str(task.exits_done)).inc()
        self.metrics.flops.labels(endpoint="/classify").inc(flops)
        self.metrics.request_flops.observe(flops)
        if self.fleet is not None:
            self.fleet.record(flops)
        with self._lock:
            self.controller.observe(flops)
            self._export_budget()

    def _on_batch_done(self, task: Task, outcome: Outcome) -> None:
        if outcome is Outcome.NON_FINITE:
            return
        self.metrics.exits.labels(exit=str(task.exits_done)).inc()
        self.metrics.flops.labels(endpoint="/batch").inc(self.exit_flops[task.exits_done - 1])

    # ---- requests -------------------------------------------------------------
    def decode(self, data: bytes) -> np.ndarray:
        return decode(data, self.spec, self.settings.max_image_pixels)

    def _result(self, f: Finished, started: float, deadline_ms: float | None) -> dict:
        latency_ms = (time.monotonic() - started) * 1e3
        order = np.argsort(-f.probs)[: self.settings.top_k]
        top = [{"class_id": int(i), "label": self.classes[i], "probability": float(f.probs[i])} for i in order]
        return {"class_id": top[0]["class_id"], "label": top[0]["label"], "confidence": float(f.confidence),
                "top_k": top, "exit": f.exit, "num_exits": self.num_exits, "flops": int(f.flops),
                "deadline_met": None if deadline_ms is None else latency_ms <= deadline_ms,
                "latency_ms": round(latency_ms, 3)}

    def _submit(self, images, policies, deadlines, started, on_done):
        try:
            return self.runner.submit(images, policies, deadlines, started, on_done)
        except QueueFull as exc:
            raise errors.Overloaded(str(exc), headers={"Retry-After": str(int(np.ceil(exc.retry_after_s)))},
                                    retry_after_s=exc.retry_after_s) from exc

    async def classify_array(self, image: np.ndarray, deadline_ms: float | None, started: float) -> Finished:
        """Anytime inference on one decoded image, float32 (C, H, W) normalised as
        :func:`server.images.decode` returns: leave at the first confident exit,
        or the deepest one the deadline allows.

        Raises:
            errors.Overloaded: queue full (503).
            errors.DeadlineExceeded: deadline passed before exit 1 could run (504).
        """
        deadline = None if deadline_ms is None else started + deadline_ms / 1e3
        if deadline_ms is not None:
            self.metrics.deadline_requests.inc()
        (fut,) = self._submit([image], [self._classify_policy], [deadline], started, self._on_classify_done)
        f: Finished = await fut
        check_finite(f)
        if f.outcome is Outcome.EXPIRED:
            self.metrics.deadline_misses.inc()
            raise errors.DeadlineExceeded(f"deadline of {deadline_ms:g} ms passed before exit 1 could run; "
                                          "nothing was computed", deadline_ms=deadline_ms)
        if deadline_ms is not None and (time.monotonic() - started) * 1e3 > deadline_ms:
            self.metrics.deadline_misses.inc()
        return f

    async def classify(self, data: bytes, deadline_ms: float | None, started: float) -> dict:
        """:meth:`classify_array` on encoded image bytes, answered as a dict.

        Raises:
            errors.ServiceError: bad image (400/413/415), queue full (503), or
                deadline passed before exit 1 (504).
        """
        f = await self.classify_array(self.decode(data), deadline_ms, started)
        return self._result(f, started, deadline_ms)

    def minimum_budget(self, n: int) -> float:
        """FLOPs that pay exit 1 for ``n`` images."""
        return n * self.exit_flops[0]

    def _check_budget(self, budget: float, n: int) -> None:
        minimum = self.minimum_budget(n)
        if budget < minimum:
            raise errors.BudgetTooSmall(
                f"flops_budget {budget:.0f} is below the minimum for {n} images: {n} x {self.exit_flops[0]} "
                f"(exit 1's cost) = {minimum:.0f} FLOPs", minimum_flops_budget=minimum)

    async def batch_arrays(self, images: list[np.ndarray], flops_budget: float, started: float) -> list[Finished]:
        """Budgeted batch classification (paper §5.2) of decoded images, float32
        (C, H, W) each: ``sum(flops) <= flops_budget``. The thresholds are the
        calibration curve's for the mean budget per image; the policy caps spending.

        Raises:
            errors.BudgetTooSmall: budget below N x exit 1's cost (422).
            errors.Overloaded: queue full (503).
        """
        n = len(images)
        self._check_budget(flops_budget, n)
        point = self.controller.point_for(flops_budget / n)
        policy = BudgetPolicy(flops_budget, n, point.thresholds, self.exit_flops)
        futures = self._submit(images, [policy] * n, [None] * n, started, self._on_batch_done)
        return list(await asyncio.gather(*futures))

    async def batch(self, items: list[bytes | errors.ServiceError], flops_budget: float | None, started: float) -> dict:
        """Budgeted batch classification of encoded images under ``flops_budget``
        FLOPs for all of them (default: N x the controller's target); a bad image
        gets its own error entry and the others are served.

        Raises:
            errors.BudgetTooSmall: budget below N x exit 1's cost (422).
            errors.Overloaded: queue full (503).
        """
        n = len(items)
        budget = float(flops_budget) if flops_budget is not None else n * self.controller.target
        self._check_budget(budget, n)
        results: list[dict | None] = [None] * n
        images, index = [], []
        for i, data in enumerate(items):
            try:
                if isinstance(data, errors.ServiceError):
                    raise data
                images.append(self.decode(data))
                index.append(i)
            except errors.ServiceError as exc:
                results[i] = exc.body()
        counts = {str(k): 0 for k in range(1, self.num_exits + 1)}
        used = 0
        if images:
            done = await self.batch_arrays(images, budget, started)
            for i, f in zip(index, done):
                used += int(f.flops)  # spent even when the output is not finite
                try:
                    check_finite(f)
                except errors.NonFiniteOutput as exc:
                    results[i] = exc.body()
                    continue
                results[i] = self._result(f, started, None)
                counts[str(f.exit)] += 1
        return {"results": results, "flops_used": used, "flops_budget": budget, "exit_counts": counts}
