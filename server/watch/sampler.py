"""The sampling rule: which answered ``/classify`` images are carried on to the last exit.

Plain Python (no torch, no HTTP). An image that left before the last exit is
sampled with probability ``share``, but only

- while audit work is allowed (:attr:`AuditSampler.paused` is False: the service
  pauses it while the latency objective is degraded or refusing), and
- while the FLOPs the audits cost stay within ``max_flops_share`` of the FLOPs
  served: every answered image adds ``max_flops_share`` x its FLOPs to a credit
  (at most ``burst`` audits' worth), and an audit from exit k takes its cost,
  ``F_K - F_k``, from it; without enough credit the image is not audited.

So the extra compute of sampling is at most ``max_flops_share`` of the served
FLOPs by construction, whatever the share and the exits images leave at. FLOPs
are multiply-accumulates of convs and linears (MSDNet paper convention),
cumulative per exit. The audits' FLOPs are never charged to the budget
controller; the spare-capacity rule (audit steps run only when no regular image
is queued or running) is the scheduler's (``server.engine.audit``).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Protocol

SKIP_REASONS = ("objective", "flops_cap", "dropped")


class _Leaving(Protocol):
    """What the sampler reads of an image leaving (``server.engine.scheduler.Task``)."""

    exits_done: int


class AuditSampler:
    """Implements the scheduler's ``Auditor`` (``server.engine.audit``); see the module docstring.

    Args:
        share: probability that an image leaving before the last exit is sampled (0: none).
        exit_flops: cumulative FLOPs of each exit (K values, increasing).
        max_flops_share: audits' FLOPs at most this share of the FLOPs served.
        burst: the credit holds at most this many audits from exit 1.
        rng: the random source (a seeded ``random.Random`` in tests).
        on_skip: told the reason (one of :data:`SKIP_REASONS`) of each sampled image
            that is not audited (or is dropped unfinished).

    Raises:
        ValueError: ``share`` outside [0, 1], ``max_flops_share`` outside (0, 1], or
            ``burst`` below 1.
    """

    def __init__(self, share: float, exit_flops: list[float], max_flops_share: float = 0.04, burst: int = 4,
                 rng: random.Random | None = None, on_skip: Callable[[str], None] | None = None):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"the audit share must be in [0, 1], got {share}")
        if not 0.0 < max_flops_share <= 1.0:
            raise ValueError(f"max_flops_share must be in (0, 1], got {max_flops_share}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self.share, self.max_flops_share = float(share), float(max_flops_share)
        self.exit_flops = [float(f) for f in exit_flops]
        self.cap = burst * (self.exit_flops[-1] - self.exit_flops[0])
        self.credit = self.exit_flops[-1] - self.exit_flops[0]  # one audit from exit 1 at start
        self.paused = False
        self.rng = rng or random.Random()
        self.on_skip = on_skip
        self._lock = threading.Lock()  # the model threads credit and spend

    @property
    def open(self) -> bool:
        """Whether audits may be sampled and run now."""
        return self.share > 0.0 and not self.paused

    def cost(self, exit_k: int) -> float:
        """FLOPs to carry an image answered at ``exit_k`` (1-based) on to the last exit."""
        return self.exit_flops[-1] - self.exit_flops[exit_k - 1]

    def served(self, flops: float) -> None:
        """An answered ``/classify`` image spent ``flops``: credit its share."""
        with self._lock:
            self.credit = min(self.cap, self.credit + self.max_flops_share * flops)

    def wants(self, task: _Leaving) -> bool:
        """Whether ``task``, leaving at exit ``task.exits_done``, is audited (the
        credit then pays for it)."""
        k = task.exits_done
        if self.share <= 0.0 or k >= len(self.exit_flops) or self.rng.random() >= self.share:
            return False
        if self.paused:
            self._skip("objective")
            return False
        cost = self.cost(k)
        with self._lock:
            if self.credit < cost:
                ok = False
            else:
                self.credit -= cost
                ok = True
        if not ok:
            self._skip("flops_cap")
        return ok

    def dropped(self, task: _Leaving) -> None:
        """A held audit was dropped unfinished (the audit queues were full)."""
        self._skip("dropped")

    def _skip(self, reason: str) -> None:
        if self.on_skip is not None:
            self.on_skip(reason)
