"""Online budget controller: holds the mean FLOPs per /classify request at a target.

Plain Python (no torch, no HTTP). FLOPs are multiply-accumulates of convs and
linears, as the MSDNet paper counts them; a request's cost is the cumulative
cost of the exit it left at.

How it steers. The calibration curve maps a per-request budget b to exit
thresholds whose mean cost on the validation split is b (paper §5.2, geometric
prior). Live traffic differs from the validation split, so the controller
commands

    b = target - bias - deficit / horizon

where ``deficit`` is the running sum of (cost - target) over requests, i.e. how
far spending is ahead of budget, and ``bias`` is an exponentially weighted mean
of (cost - commanded b), the curve's error on the current traffic mix. The
deficit term pays back any overspend within about ``horizon`` requests, so the
sum of costs over any long window stays within a bounded distance of
target x count (a window's mean error is the change of deficit over the window
divided by its length). The bias term adapts to a change in traffic mix within a
few hundred requests.

Target in force. The latency objective (:mod:`server.budget.objective`) may
lower the target the loop steers to below the configured one while the queue
breaks the objective (:meth:`BudgetController.set_in_force`); deficits then count
against the target in force, so answers degraded for the queue are neither a
credit the controller later spends nor a debt charged to the fleet.

Fleet, local mode: if every replica holds its own mean at the target, the
fleet's mean, a request-weighted average of the replicas' means, is at the
target too. Fleet mode (``server.budget.fleet``, through Redis): every replica steers
on the fleet's deficit (the sum of all replicas' deficits) and the fleet's bias
(the request-rate-weighted mean of their biases), so all replicas command about
the same budget and thresholds; a replica with harder images then spends more
than the target and one with easier images less, while the fleet's mean holds.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from model.curve import OperatingPoint, point_for, with_ends


@dataclass(frozen=True)
class FleetView:
    """The other replicas as last read from Redis: the sum of their deficits
    (FLOPs), the sum of bias x request rate, and the sum of request rates (1/s)."""

    deficit: float
    bias_rate: float
    rate: float


class BudgetController:
    """Tunes exit thresholds so the realised mean FLOPs per request tracks ``target``.

    Args:
        exit_flops: cumulative FLOPs of each exit (K values, increasing).
        curve: calibration operating points (validation split).
        target: mean FLOPs per request to hold.
        horizon: requests over which an overspend is paid back.
        bias_halflife: requests for the bias estimate to forget half its past.
        window: requests in the reported realised mean.

    Raises:
        ValueError: from :meth:`set_target` when the target is outside
            [cost of exit 1, cost of the last exit].
    """

    def __init__(self, exit_flops: list[float], curve: list[OperatingPoint], target: float,
                 horizon: float = 40.0, bias_halflife: float = 100.0, window: int = 1000):
        self.exit_flops = [float(f) for f in exit_flops]
        self.curve = with_ends(curve, self.exit_flops)
        self._costs = [p.mean_flops for p in self.curve]
        self.horizon = horizon
        self.bias_decay = 0.5 ** (1.0 / bias_halflife)
        self.window: deque[float] = deque(maxlen=window)
        self._window_sum = 0.0
        self.deficit = 0.0
        self.bias = 0.0
        self.requests = 0
        self.local_horizon = horizon
        self.fleet: FleetView | None = None
        self.own_rate = 0.0
        self.ceiling = math.inf
        self.set_target(target)

    def set_target(self, target: float) -> None:
        """Change the target mean FLOPs per request (takes effect at once; the
        deficit restarts at 0 so past spending is judged against the old target)."""
        lo, hi = self.exit_flops[0], self.exit_flops[-1]
        if not (math.isfinite(target) and lo <= target <= hi):
            raise ValueError(f"target must lie between exit 1's cost ({lo:.0f} FLOPs) and the last exit's "
                             f"({hi:.0f} FLOPs) per request, got {target}")
        self.target = float(target)
        self.deficit = 0.0
        self._update_command()

    @property
    def in_force(self) -> float:
        """The target steered to now: the configured one, or lower while the
        latency objective degrades (FLOPs per request)."""
        return min(self.target, self.ceiling)

    def set_in_force(self, ceiling: float) -> None:
        """Steer to at most ``ceiling`` FLOPs per request (``math.inf``: the
        configured target). When the target in force changes the deficit
        restarts at 0: spending is judged against the target that was in force."""
        before = self.in_force
        self.ceiling = float(ceiling)
        if self.in_force != before:
            self.deficit = 0.0
            self._update_command()

    @property
    def thresholds(self) -> tuple[float, ...]:
        """Current thresholds, one per exit (the last is 0.0)."""
        return self._point.thresholds

    @property
    def point_cost(self) -> float:
        """Validation mean FLOPs per image of the thresholds in force (the curve point's cost)."""
        return self._point.mean_flops

    @property
    def realised_mean(self) -> float | None:
        """Mean FLOPs per request over the last ``window`` requests (None before any)."""
        return self._window_sum / len(self.window) if self.window else None

    @property
    def window_sum(self) -> float:
        """Sum of FLOPs over the last ``window`` requests."""
        return self._window_sum

    def observe(self, flops: float, commanded: float | None = None) -> None:
        """Account one finished /classify request that spent ``flops``;
        ``commanded`` is the budget in force when it ran (default: the current one)."""
        if len(self.window) == self.window.maxlen:
            self._window_sum -= self.window[0]
        self.window.append(flops)
        self._window_sum += flops
        self.requests += 1
        self.deficit += flops - self.in_force
        # Bound the deficit steered on (in fleet mode: the fleet's) so a long
        # stretch the thresholds cannot follow (every image needing the last
        # exit) does not wind up.
        limit = 4 * self.horizon * self.exit_flops[-1]
        others = self.fleet.deficit if self.fleet is not None else 0.0
        self.deficit = max(-limit - others, min(limit - others, self.deficit))
        b = self.command if commanded is None else commanded
        self.bias = self.bias_decay * self.bias + (1 - self.bias_decay) * (flops - b)
        self._update_command()

    def set_fleet(self, view: FleetView | None, own_rate: float = 0.0, horizon: float | None = None) -> None:
        """Steer on the fleet (``view`` of the other replicas, this replica's
        request rate in 1/s, the fleet horizon in requests) or, with None, locally."""
        self.fleet, self.own_rate = view, own_rate
        self.horizon = horizon if (view is not None and horizon) else self.local_horizon
        self._update_command()

    def _update_command(self) -> None:
        deficit, bias = self.deficit, self.bias
        if self.fleet is not None:
            deficit += self.fleet.deficit
            total_rate = self.own_rate + self.fleet.rate
            if total_rate > 0:
                bias = (self.bias * self.own_rate + self.fleet.bias_rate) / total_rate
        b = self.in_force - bias - deficit / self.horizon
        self.command = min(max(b, self._costs[0]), self._costs[-1])
        self._point = self.point_for(self.command)

    def point_for(self, flops: float) -> OperatingPoint:
        """The curve's point for ``flops`` per image (:func:`model.curve.point_for`)."""
        return point_for(self.curve, flops)
