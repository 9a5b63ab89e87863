"""The budget keeper: the one owner of the thresholds in force and the controller.

The model thread (a /classify request finished), the event loop (``GET``/``PUT
/budget``, ``/batch``) and the fleet thread (figures from Redis) all touch the
budget controller; the keeper holds its lock, chooses between the controller's
thresholds and the checkpoint's fixed ones, and tells a listener (the metrics)
after each change. :class:`server.budget.fleet.Fleet` depends on this interface
only. FLOPs are multiply-accumulates of convs and linears (MSDNet paper
convention), cumulative to an image's exit, lazy evaluation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from model.curve import OperatingPoint

from .controller import BudgetController, FleetView


@dataclass(frozen=True)
class ControllerSnapshot:
    """What a replica publishes to the fleet: running overspend (FLOPs), bias
    (FLOPs per request), the realised window's sum (FLOPs) and size (requests),
    and the target (FLOPs per request)."""

    deficit: float
    bias: float
    window_sum: float
    window_n: int
    target: float


@dataclass(frozen=True)
class BudgetView:
    """The state ``GET /budget`` shows (FLOPs per request unless said)."""

    target_flops: float
    realised_flops: float | None
    window: int
    thresholds: tuple[float, ...]
    command_flops: float
    requests: int
    controller: bool
    in_force_flops: float


class BudgetKeeper:
    """Thread-safe owner of a :class:`BudgetController`.

    Args:
        controller: the controller (its curve from the checkpoint's calibration).
        fixed_thresholds: the checkpoint's thresholds, used when ``enabled`` is False.
        enabled: tune thresholds online (``MSDNET_CONTROLLER``).
        on_change: called (under no lock) after every change, e.g. to export metrics.
    """

    def __init__(self, controller: BudgetController, fixed_thresholds: tuple[float, ...], enabled: bool = True,
                 on_change: Callable[[BudgetKeeper], None] | None = None):
        self.controller = controller
        self.fixed_thresholds = tuple(fixed_thresholds)
        self.enabled = enabled
        self.on_change = on_change
        self._lock = threading.Lock()
        self._degraded: tuple[float, ...] | None = None  # with the controller off: the curve's, while degraded
        self._degraded_cost = 0.0
        fixed = [p.mean_flops for p in controller.curve if p.thresholds == self.fixed_thresholds]
        self._fixed_cost = fixed[0] if fixed else controller.target  # the checkpoint's thresholds are a curve point

    def thresholds(self) -> tuple[float, ...]:
        """Per-exit thresholds in force (read on the model thread at every exit): the
        controller's; with it off, the checkpoint's, or the curve's for the target
        in force while the latency objective degrades."""
        if self.enabled:
            return self.controller.thresholds
        return self.fixed_thresholds if self._degraded is None else self._degraded

    def point_cost(self) -> float:
        """Validation mean FLOPs per image of the thresholds in force (:meth:`thresholds`):
        what the calibration curve says they cost on calibration-like images."""
        if self.enabled:
            return self.controller.point_cost
        return self._fixed_cost if self._degraded is None else self._degraded_cost

    @property
    def target(self) -> float:
        return self.controller.target

    def observe(self, flops: float) -> None:
        """Account one answered /classify request that spent ``flops``."""
        with self._lock:
            self.controller.observe(flops)
        self._changed()

    def set_target(self, target: float) -> None:
        """Raises ValueError outside [exit 1's cost, the last exit's cost]."""
        with self._lock:
            self.controller.set_target(target)
            self._refresh_degraded()
        self._changed()

    @property
    def in_force(self) -> float:
        """The target in force (FLOPs per request; below :attr:`target` while degraded)."""
        return self.controller.in_force

    def set_in_force(self, ceiling: float) -> None:
        """Steer to at most ``ceiling`` FLOPs per request (the latency objective's
        choice; ``math.inf``: the configured target)."""
        with self._lock:
            self.controller.set_in_force(ceiling)
            self._refresh_degraded()
        self._changed()

    def _refresh_degraded(self) -> None:
        c = self.controller
        point = None if c.in_force >= c.target else c.point_for(c.in_force)
        self._degraded = None if point is None else point.thresholds
        self._degraded_cost = 0.0 if point is None else point.mean_flops

    def set_fleet(self, view: FleetView | None, own_rate: float, horizon: float | None = None) -> None:
        """Steer on the fleet's figures (``view``), or locally with None."""
        with self._lock:
            self.controller.set_fleet(view, own_rate, horizon)
        self._changed()

    def point_for(self, flops_per_image: float) -> OperatingPoint:
        """The curve's thresholds for a budget per image (``/batch``)."""
        return self.controller.point_for(flops_per_image)

    def snapshot(self) -> ControllerSnapshot:
        with self._lock:
            c = self.controller
            return ControllerSnapshot(c.deficit, c.bias, c.window_sum, len(c.window), c.target)

    def view(self) -> BudgetView:
        with self._lock:
            c = self.controller
            return BudgetView(c.target, c.realised_mean, len(c.window), self.thresholds(), c.command, c.requests,
                              self.enabled, c.in_force)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)
