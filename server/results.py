"""Typed results of the service (and of the engine client, ``server.ipc.client``)
and the admission check both apply before decoding.

FLOPs are multiply-accumulates of convs and linears (MSDNet paper convention),
cumulative per exit, with lazy evaluation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from . import errors
from .budget.keeper import BudgetView
from .budget.objective import Admission, ObjectiveView
from .engine.scheduler import Finished
from .metrics import Metrics


@dataclass(frozen=True)
class BatchOutcome:
    """A budgeted batch's answers, in input order: a :class:`Finished` per served
    image, the error of each refused one; FLOPs used and budgeted; images per exit."""

    results: list[Finished | errors.ServiceError]
    flops_used: int
    flops_budget: float
    exit_counts: dict[str, int]


@dataclass(frozen=True)
class BudgetReport:
    """The controller's view, the mode (``local`` or ``fleet``), the fleet's
    mean FLOPs per request as this replica sees it (None in local mode) and the
    latency objective's view (None when no objective is set)."""

    view: BudgetView
    mode: str
    fleet_realised_flops: float | None
    objective: ObjectiveView | None = None


def check_admission(admission: Admission, deadline_ms: float | None, started: float, metrics: Metrics) -> None:
    """Refuse a request before decoding when the latency objective says so
    (:meth:`server.budget.objective.Admission.admits`); ``deadline_ms`` counts
    from ``started`` (the request's arrival, ``time.monotonic()``).

    Raises:
        errors.Saturated: (503, Retry-After) the forecast queueing delay breaks the
            objective with every image already at exit 1.
        errors.DeadlineExceeded: (504) the request's own deadline cannot be met at
            the forecast queueing delay (counted as a deadline miss); nothing computed.
    """
    left_s = None if deadline_ms is None else deadline_ms / 1e3 - (time.monotonic() - started)
    if admission.admits(left_s):
        return
    wait_ms = admission.wait_s * 1e3
    if deadline_ms is not None:
        metrics.deadline_requests.inc()
        metrics.deadline_misses.inc()
        raise errors.DeadlineExceeded(f"deadline of {deadline_ms:g} ms cannot be met: the forecast queueing delay "
                                      f"is {wait_ms:.0f} ms; nothing was computed (not even decoding)",
                                      deadline_ms=deadline_ms, forecast_wait_ms=round(wait_ms, 1))
    raise errors.Saturated(f"the forecast queueing delay of {wait_ms:.0f} ms breaks the latency objective even with "
                           "every image leaving at exit 1; retry later",
                           headers={"Retry-After": str(math.ceil(admission.retry_after_s))},
                           retry_after_s=admission.retry_after_s, forecast_wait_ms=round(wait_ms, 1))
