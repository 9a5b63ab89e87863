"""The latency objective: the controller's second loop, beside the FLOPs loop.

Plain Python (no torch, no HTTP, no threads; the caller passes the clock).
FLOPs are multiply-accumulates of convs and linears (MSDNet paper convention),
cumulative to the exit an image leaves at.

The FLOPs loop (:mod:`server.budget.controller`) holds the mean cost per
/classify request at the configured target whatever the queue does. When more
requests arrive than the engine can answer at that target, the queue grows
without bound. This loop lowers the *target in force* instead, down to the
first exit's cost, so that everyone is answered sooner at an earlier exit, and
raises it back when the load falls. Only when even the first exit cannot keep
up does it refuse new requests, at once, before they are decoded.

Each control interval (a tenth of the objective, at most 0.1 s) it reads two
figures the engine measures:

- ``wait_s``: the forecast queueing delay of an image arriving now (the work
  queued at every block, from the step-time model, divided by the model threads),
  plus how old requests were when they reached the engine (HTTP and decoding
  share the cores with the blocks: a backlog there is latency too, and cheaper
  blocks free CPU for it);
- ``busy``: the share of the model threads' time spent in block steps.

and steers the *span*, where the target in force is
``exit_1 + span * (target - exit_1)`` with span in [0, 1]:

1. **Cut** (the queue breaks the objective): when ``wait_s`` exceeds
   ``wait_share`` of the objective the span is multiplied by
   ``limit / wait_s`` (at least halved per interval at twice the limit) and
   lowered by ``min_cut``, so a deep queue reaches exit 1 within a few
   intervals. A cut shows in the queue only once the work queued before it has
   drained, so until then (the wait at the cut) it cuts again only if the
   queue still grows (``regrow``): cutting at every interval of the drain took
   the target in force to exit 1 and back in a 2-4 s sawtooth (ImageNet
   MSDNet-5 at a steady 1.5x: 254-405 MFLOPs). A cut also goes at once to what
   the arrivals of the last second allow (``fast_halflife_s``), so a step in load
   reaches its level in one cut, not in halvings.
2. **Equilibrium** (the queue is short): from the steps' seconds per FLOP and
   the arrivals per second (both smoothed, half-life ``rates_halflife_s``) the
   loop knows the FLOPs per image at which the model threads would be
   ``busy_goal`` busy, and moves the target in force toward it, by at most a
   factor ``rate_per_s`` per second, only when it is more than ``band`` away
   (a steady load settles instead of chasing noise); raised no sooner than
   ``hold_s`` after a cut (the smoothed arrivals lag a rise in load), unless
   the threads are nearly idle (busy under ``idle_share`` of the goal: the
   load fell, and the configured target comes back within a few seconds).
3. **Refuse** only at the first exit: while the span is 0 and the forecast wait
   of a new arrival exceeds ``refuse_share`` of the objective, new requests are
   refused; a request with its own deadline is refused when the forecast wait
   exceeds its deadline (it would get a 504 later otherwise). (Refusing later
   while exit 1 could drain a burst's queue was tried: at 3x on ImageNet
   MSDNet-5 the admitted answers came late and 29% instead of 54% were answered
   within the objective.)

Anti-windup: the span is clamped to [0, 1] and neither rule accumulates past
the clamp, so after a long overload the loop starts rising at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

STEADY, DEGRADED, REFUSING = "steady", "degraded", "refusing"


@dataclass(frozen=True)
class Admission:
    """What decides whether a new request is taken; small enough to share
    between processes (the engine writes it, HTTP workers read it).

    Attributes:
        wait_s: forecast queueing delay of a request arriving now (seconds).
        refuse_above_s: requests without a deadline are refused while ``wait_s``
            exceeds this (seconds; infinite while degrading can still absorb the load).
        retry_after_s: what a refused client is told to wait (seconds).
    """

    wait_s: float
    refuse_above_s: float
    retry_after_s: float

    def admits(self, deadline_s: float | None = None) -> bool:
        """Whether a request is taken; one with a deadline ``deadline_s`` seconds
        from now keeps its own (refused only when the wait alone would miss it)."""
        if deadline_s is not None:
            return self.wait_s <= deadline_s
        return self.wait_s <= self.refuse_above_s


OPEN = Admission(0.0, math.inf, 1.0)


@dataclass(frozen=True)
class ObjectiveView:
    """The loop's state, for ``GET /budget`` and the metrics.

    Attributes:
        objective_ms: the latency objective (milliseconds).
        configured_flops: the FLOPs loop's configured target (FLOPs per request).
        in_force_flops: the target in force (FLOPs per request, <= configured).
        state: ``steady`` (in force = configured), ``degraded`` or ``refusing``.
        reason: one line saying why, with the figures that decided.
        wait_ms: the last forecast queueing delay of a new arrival (milliseconds).
        busy: the model threads' busy share (0..1, smoothed).
    """

    objective_ms: float
    configured_flops: float
    in_force_flops: float
    state: str
    reason: str
    wait_ms: float
    busy: float


class LatencyObjective:
    """Chooses the target in force and whether to refuse; see the module docstring.

    Args:
        objective_s: the latency objective (seconds), e.g. 0.1.
        exit_flops: cumulative FLOPs of each exit (K values, increasing).
        target: the configured target (FLOPs per request), between exit 1's and
            the last exit's cost.
        wait_share: share of the objective the forecast queueing delay may reach
            before the target in force is cut.
        refuse_share: at exit 1, share of the objective the forecast wait of a new
            arrival may reach before requests are refused (>= ``wait_share``).
        busy_goal: the model threads' busy share held while the queue is short.
        band: relative dead band around the equilibrium's FLOPs (0.07: no move
            within 7% of it).
        rate_per_s: largest factor the target in force moves by per second toward
            the equilibrium.
        min_cut: span lowered by at least this much per interval while cutting.
        busy_halflife_s: half-life of the busy share's smoothing (seconds).
        hold_s: after a cut, the target in force is not raised for this long (seconds)
            unless the threads are nearly idle: a queue just drained is no sign that the
            load fell.
        regrow: while a cut's queue drains, another cut only when the wait exceeds
            the wait at the cut by this factor.
        rates_halflife_s: half-life of the smoothing of seconds per FLOP and arrivals
            per second (seconds).
        idle_share: busy below this share of ``busy_goal`` counts as idle.
        fast_halflife_s: half-life of the arrivals' smoothing that sizes cuts (seconds).

    Raises:
        ValueError: a non-positive objective, or shares out of order.
    """

    def __init__(self, objective_s: float, exit_flops: list[float], target: float, *, wait_share: float = 0.35,
                 refuse_share: float = 0.45, busy_goal: float = 0.85, band: float = 0.07, rate_per_s: float = 1.25,
                 min_cut: float = 0.02, busy_halflife_s: float = 0.3, hold_s: float = 2.0, regrow: float = 1.2,
                 rates_halflife_s: float = 2.0, idle_share: float = 0.7, fast_halflife_s: float = 0.3):
        if not (math.isfinite(objective_s) and objective_s > 0):
            raise ValueError(f"latency objective must be positive seconds, got {objective_s}")
        if not 0 < wait_share <= refuse_share <= 1:
            raise ValueError("need 0 < wait_share <= refuse_share <= 1")
        self.objective_s = float(objective_s)
        self.exit1 = float(exit_flops[0])
        self.wait_share, self.refuse_share = wait_share, refuse_share
        self.busy_goal, self.band, self.rate_per_s, self.min_cut = busy_goal, band, rate_per_s, min_cut
        self.busy_halflife_s = busy_halflife_s
        self.interval_s = min(0.1, self.objective_s / 10)
        self.span = 1.0
        self.busy = 0.0
        self.wait_s = 0.0
        self.refusing = False
        self.reason = "the queue is within the objective"
        self.degraded_s = 0.0  # time spent with the target in force below the configured one (seconds)
        self.hold_s = hold_s
        self._last_cut = -math.inf
        self._cut_wait = 0.0
        self.regrow, self.rates_halflife_s, self.idle_share = regrow, rates_halflife_s, idle_share
        self.fast_halflife_s = fast_halflife_s
        self._fast_arrival_rate = 0.0
        self.equilibrium_fast: float | None = None  # the same from arrivals smoothed over fast_halflife_s
        self._flops_acc = 0.0
        # smoothed per second: model-thread seconds in steps, FLOPs run in them, images arrived
        self._busy_rate = self._flops_rate = self._arrival_rate = 0.0
        self.equilibrium: float | None = None  # FLOPs per image that keep the model threads busy_goal busy
        self._last: float | None = None
        self._busy_acc = 0.0
        self.set_target(target)

    # ---- configuration --------------------------------------------------------
    def set_target(self, target: float) -> None:
        """A new configured target (FLOPs per request); the span is kept."""
        self.target = float(target)

    @property
    def in_force(self) -> float:
        """The target in force (FLOPs per request): between exit 1's cost and the configured target."""
        if self.target <= self.exit1:
            return self.target
        return self.exit1 + self.span * (self.target - self.exit1)

    @property
    def state(self) -> str:
        if self.refusing:
            return REFUSING
        return STEADY if self.span >= 1.0 else DEGRADED

    # ---- measurements ------------------------------------------------------------
    def add_busy(self, seconds: float, flops: float = 0.0) -> None:
        """Account ``seconds`` of one model thread's time spent in a block step that ran
        ``flops`` FLOPs (its batch's images times the block's cost)."""
        self._busy_acc += seconds
        self._flops_acc += flops

    def due(self, now: float) -> bool:
        """Whether a control interval has passed since the last :meth:`update`."""
        return self._last is None or now - self._last >= self.interval_s

    def update(self, now: float, wait_s: float, threads: int, arrivals: float = 0) -> bool:
        """One control step at ``now`` (seconds, monotonic) with the forecast
        queueing delay ``wait_s`` (seconds) of a new arrival, the number of model
        threads and the images that arrived since the last step. Returns whether the
        target in force changed.
        """
        if self._last is None:
            self._last, self._busy_acc, self._flops_acc = now, 0.0, 0.0
            return False
        dt = now - self._last
        if dt <= 0:
            return False
        if self.span < 1.0:
            self.degraded_s += dt
        sample = min(1.0, self._busy_acc / (dt * max(threads, 1)))
        keep = 0.5 ** (dt / self.busy_halflife_s)
        self.busy = keep * self.busy + (1 - keep) * sample
        self._estimate(dt, threads, arrivals)
        # The wait is noisy (steps, large images): smoothed over about two intervals, but a rise
        # counts at once at half weight, so a burst is cut within an interval or two.
        self.wait_s = max(0.5 * (self.wait_s + wait_s), 0.6 * self.wait_s + 0.4 * wait_s)
        wait_s = self.wait_s
        self._last, self._busy_acc, self._flops_acc = now, 0.0, 0.0
        before = self.in_force
        limit = self.wait_share * self.objective_s
        if wait_s > limit and self._may_cut(now, wait_s):
            self.span = max(0.0, self.span * max(0.5, limit / wait_s) - self.min_cut)
            if self.equilibrium_fast is not None and self.target > self.exit1:
                # a step in load: straight to what the arrivals of the last second allow, not in halvings
                self.span = min(self.span, self._span_of(self.equilibrium_fast))
            self._last_cut, self._cut_wait = now, wait_s
            self.reason = (f"forecast queueing delay {wait_s * 1e3:.0f} ms > {limit * 1e3:.0f} ms "
                           f"({self.wait_share:.0%} of the {self.objective_s * 1e3:g} ms objective)")
        elif wait_s > limit:
            self.reason = (f"forecast queueing delay {wait_s * 1e3:.0f} ms > {limit * 1e3:.0f} ms: waiting for "
                           "the last cut to drain the queue")
        elif self.span < 1.0 or self._target_over_equilibrium():
            goal = self.target if self.equilibrium is None else min(self.target, max(self.exit1, self.equilibrium))
            idle = self.busy < self.idle_share * self.busy_goal
            if idle:  # the load fell: the smoothed rates lag behind it
                goal = self.target
            ratio = goal / self.in_force
            if ((ratio > 1 + self.band or (goal >= self.target and ratio > 1))
                    and (idle or now - self._last_cut >= self.hold_s)):
                self._scale(min(self.rate_per_s ** dt, ratio))
                self.reason = (f"at {self.busy:.0%} busy the engine can take {goal / 1e6:.4g} MFLOPs per image: "
                               "raising the target in force")
            elif ratio < 1 - self.band and self.span > 0:
                self._scale(max(self.rate_per_s ** -dt, ratio))
                self.reason = (f"the arrivals need {self.in_force / goal:.2f}x the model threads' "
                               f"{self.busy_goal:.0%}: lowering the target in force to {goal / 1e6:.4g} MFLOPs")
        elif self.span >= 1.0:
            self.reason = "the queue is within the objective"
        self.refusing = not self.admits(wait_s)
        if self.refusing:
            self.reason = (f"refusing: at exit 1 the forecast queueing delay {wait_s * 1e3:.0f} ms > "
                           f"{self.refuse_share * self.objective_s * 1e3:.0f} ms")
        return self.in_force != before

    def _estimate(self, dt: float, threads: int, arrivals: float) -> None:
        """Smooth the rates of this interval and re-estimate :attr:`equilibrium`: the FLOPs
        per image at which the arrivals keep the model threads ``busy_goal`` busy, from
        seconds per FLOP (steps' time over their FLOPs) and images per second."""
        keep = 0.5 ** (dt / self.rates_halflife_s)
        self._busy_rate = keep * self._busy_rate + (1 - keep) * self._busy_acc / dt
        self._flops_rate = keep * self._flops_rate + (1 - keep) * self._flops_acc / dt
        self._arrival_rate = keep * self._arrival_rate + (1 - keep) * arrivals / dt
        fast = 0.5 ** (dt / self.fast_halflife_s)
        self._fast_arrival_rate = fast * self._fast_arrival_rate + (1 - fast) * arrivals / dt
        self.equilibrium = self.equilibrium_fast = None  # idle: nothing bounds the target
        if self._flops_rate > 0 and self._busy_rate > 0:
            flops_per_s = self.busy_goal * max(threads, 1) * self._flops_rate / self._busy_rate
            if self._arrival_rate > 0:
                self.equilibrium = flops_per_s / self._arrival_rate
            if self._fast_arrival_rate > 0:
                self.equilibrium_fast = flops_per_s / self._fast_arrival_rate

    def _target_over_equilibrium(self) -> bool:
        """At the configured target, the arrivals would keep the threads busier than the goal."""
        return self.equilibrium is not None and self.equilibrium < self.target * (1 - self.band)

    def _may_cut(self, now: float, wait_s: float) -> bool:
        """Whether the wait may cut again: a cut shows in the queue only once the work
        queued before it has drained, so until then (the wait at the cut, at least two
        intervals) another cut only if the queue still grows."""
        if now - self._last_cut >= max(self._cut_wait, 2 * self.interval_s):
            return True
        return wait_s > self.regrow * self._cut_wait

    def _scale(self, factor: float) -> None:
        """Scale the target in force by ``factor``, clamped to [exit 1, configured]."""
        if self.target <= self.exit1:
            return
        self.span = self._span_of(self.in_force * factor)

    def _span_of(self, flops: float) -> float:
        """The span whose target in force is ``flops`` clamped to [exit 1, configured]
        (the configured target above exit 1's cost)."""
        return (min(self.target, max(self.exit1, flops)) - self.exit1) / (self.target - self.exit1)

    # ---- admission ---------------------------------------------------------------
    def admission(self, wait_s: float) -> Admission:
        """The rule for a request arriving now that faces a forecast queueing delay of
        ``wait_s`` seconds: refused when the wait exceeds ``refuse_share`` of the
        objective while every image already leaves at exit 1 (above exit 1 the loop
        degrades instead); Retry-After the forecast delay, at least 1 s."""
        refuse_above = math.inf if self.span > 0.0 else self.refuse_share * self.objective_s
        return Admission(wait_s, refuse_above, max(1.0, wait_s))

    def admits(self, wait_s: float, deadline_s: float | None = None) -> bool:
        """:meth:`Admission.admits` of :meth:`admission` (``wait_s`` seconds)."""
        return self.admission(wait_s).admits(deadline_s)

    def view(self) -> ObjectiveView:
        return ObjectiveView(self.objective_s * 1e3, self.target, self.in_force, self.state, self.reason,
                             self.wait_s * 1e3, self.busy)
