"""Exit policies: when an image leaves, and whether it may start its next block.

Budget decisions, so they live with the budget: ``/classify`` leaves at the
thresholds in force (:class:`ThresholdPolicy`, read from the keeper at every
exit), ``/batch`` spends a FLOPs budget shared by its images
(:class:`BudgetPolicy`, paper §5.2). Both implement
:class:`server.engine.scheduler.ExitPolicy`, the interface the scheduler calls;
plain Python, nothing imported from the engine. FLOPs are multiply-accumulates
of convs and linears (MSDNet paper convention), cumulative per exit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class _InFlight(Protocol):
    """What a policy reads of an image in flight (``server.engine.scheduler.Task``)."""

    exits_done: int


class ThresholdPolicy:
    """/classify: leave at the first exit whose confidence reaches the current
    threshold, read from ``thresholds`` (a callable returning one per exit)."""

    def __init__(self, thresholds: Callable[[], tuple[float, ...]]):
        self._thresholds = thresholds

    def leaves(self, task: _InFlight, confidence: float) -> bool:
        return confidence >= self._thresholds()[task.exits_done - 1]

    def may_continue(self, task: _InFlight) -> bool:
        return True


class BudgetPolicy:
    """/batch (paper §5.2, budgeted batch classification): thresholds for the
    batch's mean budget per image, and a hard cap. Exit 1 is reserved for every
    image up front; an image starts a further block only if the budget left pays
    for it, and the block's FLOPs are then reserved. So the FLOPs used never
    exceed the budget.

    Args:
        budget: FLOPs for the whole batch.
        n_images: images in the batch.
        thresholds: one per exit (the last 0.0).
        exit_flops: cumulative FLOPs per exit.

    Raises:
        ValueError: when the budget cannot pay exit 1 for every image.
    """

    def __init__(self, budget: float, n_images: int, thresholds: tuple[float, ...], exit_flops: list[float]):
        if budget < n_images * exit_flops[0]:
            raise ValueError(f"budget {budget:.0f} FLOPs is below {n_images} x exit 1's cost")
        self.budget = budget
        self.thresholds = thresholds
        self.exit_flops = exit_flops
        self.committed = n_images * exit_flops[0]

    def leaves(self, task: _InFlight, confidence: float) -> bool:
        return confidence >= self.thresholds[task.exits_done - 1]

    def may_continue(self, task: _InFlight) -> bool:
        k = task.exits_done
        step = self.exit_flops[k] - self.exit_flops[k - 1]
        if self.committed + step > self.budget:
            return False
        self.committed += step
        return True
