"""The engine as the HTTP layer sees it: one Protocol and its plain result types.

Two classes implement :class:`Engine`: :class:`server.engine.service.Service`
(the model in this process) and :class:`server.ipc.client.EngineClient` (an
HTTP worker's link to the replica's engine process). ``server.http`` depends on
this module alone, so a route cannot tell which one it talks to. Torch-free:
HTTP worker processes import it. FLOPs are multiply-accumulates of convs and
linears (MSDNet paper convention), cumulative to the exit an image leaves at.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .. import errors
from ..budget.keeper import BudgetView
from ..budget.objective import OPEN, Admission, ObjectiveView
from ..watch.feedback import Labelled
from .scheduler import Finished, Outcome

if TYPE_CHECKING:
    import numpy as np

    from model.transforms import InputContract

    from ..metrics import Metrics

# The plain types an implementation or a caller needs, from one place.
__all__ = ["OPEN", "Admission", "BatchOutcome", "BudgetReport", "BudgetView", "Engine", "Finished", "Labelled",
           "ObjectiveView", "Outcome", "check_admission"]


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


class Engine(Protocol):
    """What serving a request needs from the engine, wherever it runs.

    Attributes:
        classes: class names, index = class id.
        exit_flops: cumulative FLOPs of each exit (K values).
        num_exits: K.
        transforms: the model's input contract (how to decode an image for it).
        ready: the model is loaded, warm and answering.
        not_ready_reason: why not, for the 503's message.
    """

    classes: Sequence[str]
    exit_flops: Sequence[int]
    transforms: InputContract

    @property
    def num_exits(self) -> int: ...

    @property
    def ready(self) -> bool: ...

    @property
    def not_ready_reason(self) -> str: ...

    def admit(self, deadline_ms: float | None, started: float) -> None:
        """Refuse a request before its image is decoded: its deadline already passed
        (504), or the latency objective refuses it (503, or 504 when its own deadline
        cannot be met). ``started``: the arrival, ``time.monotonic()`` seconds.

        Raises:
            errors.DeadlineExceeded: 504.
            errors.Saturated: 503 with Retry-After.
        """
        ...

    async def classify(self, images: list[np.ndarray], deadline_ms: float | None,
                       started: float) -> list[Finished]:
        """Anytime classification of decoded images, each float32 ``(C, H, W)``.

        Raises:
            errors.Overloaded, errors.DeadlineExceeded, errors.NonFiniteOutput, errors.NotReady.
        """
        ...

    async def batch(self, items: list[np.ndarray | errors.ServiceError], flops_budget: float | None,
                    started: float) -> BatchOutcome:
        """Budgeted batch classification under ``flops_budget`` FLOPs for all items.

        Raises:
            errors.BudgetTooSmall, errors.Overloaded, errors.NotReady.
        """
        ...

    async def budget(self) -> BudgetReport:
        """The budget controller's state."""
        ...

    async def feedback(self, request_id: str, label: int) -> Labelled:
        """Score an earlier one-image /classify answer (``request_id``) against its true
        class id ``label`` (the accuracy watch).

        Raises:
            errors.UnknownRequest: (404) no answer of that id is held.
            errors.AlreadyLabelled: (409) it was labelled already.
        """
        ...

    async def set_target(self, target: float) -> None:
        """Change the target mean FLOPs per /classify request.

        Raises:
            ValueError: outside [exit 1's cost, the last exit's cost].
        """
        ...


def check_admission(admission: Admission, deadline_ms: float | None, started: float, metrics: Metrics) -> None:
    """Refuse a request before decoding: its deadline already passed, or the latency
    objective says so (:meth:`server.budget.objective.Admission.admits`; without an
    objective :data:`server.budget.objective.OPEN` admits all); ``deadline_ms``
    counts from ``started`` (the request's arrival, ``time.monotonic()``).
    A deadline refused here counts in ``msdnet_deadline_requests_total`` and
    ``msdnet_deadline_misses_total`` (an admitted one is counted by the engine).

    Raises:
        errors.Saturated: (503, Retry-After) the forecast queueing delay breaks the
            objective with every image already at exit 1.
        errors.DeadlineExceeded: (504) the deadline already passed, or cannot be met
            at the forecast queueing delay; nothing computed.
    """
    left_s = None if deadline_ms is None else deadline_ms / 1e3 - (time.monotonic() - started)
    if left_s is not None and left_s <= 0:
        metrics.deadline_requests.inc()
        metrics.deadline_misses.inc()
        raise errors.DeadlineExceeded(f"deadline of {deadline_ms:g} ms passed before exit 1 could run; nothing was "
                                      "computed (not even decoding)", deadline_ms=deadline_ms)
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
