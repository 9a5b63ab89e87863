"""What calibration measured, for the thresholds of the target in force.

Plain Python (no torch). The controller steers to the target in force (FLOPs per
request: multiply-accumulates of convs and linears, MSDNet paper convention)
through the calibration curve; the curve's point for that target is what
calibration says serving at that target gives on the validation split: its
thresholds, and per exit k, among the images leaving at k, the agreement of
their class with the last exit's and top-1 there and at the last exit
(:class:`model.curve.OperatingPoint`).

Older checkpoints (calibrated before the per-exit figures existed) have none of
these. What can be derived from them is a lower bound of the agreement: an image
correct at its exit and at the last exit agrees, so agreement >= top1(point) +
top1(last exit) - 1 (the point's validation top-1, and the card's validation
top-1 at the last exit or the curve's best). That bound is used for every exit
(``derived`` is True); ``msdnet calibrate --figures-only`` stores the real figures.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.curve import OperatingPoint, point_for


@dataclass(frozen=True)
class ExitReference:
    """The calibration's figures at one target, per exit (K values each).

    Attributes:
        target_flops: the target they are for (FLOPs per request).
        agreement: fraction of the images leaving at each exit whose class equals
            the last exit's (1.0 at the last exit); never None (a missing exit gets the
            point's lower bound).
        top1: top-1 fraction of the images leaving at each exit (None: unknown).
        last_top1: top-1 fraction of the same images at the last exit (None: unknown).
        derived: True when ``agreement`` is the lower bound of an older checkpoint.
    """

    target_flops: float
    agreement: tuple[float, ...]
    top1: tuple[float | None, ...]
    last_top1: tuple[float | None, ...]
    derived: bool


class CalibratedReference:
    """The calibration curve's figures by target (:meth:`at`).

    Args:
        curve: the calibration's curve (Pareto front, by increasing cost).
        num_exits: K.
        last_top1: validation top-1 at the last exit (the model card's), None if unknown.
    """

    def __init__(self, curve: list[OperatingPoint], num_exits: int, last_top1: float | None = None):
        self.curve = sorted(curve, key=lambda p: p.mean_flops)
        self.num_exits = num_exits
        known = [p.top1 for p in self.curve if p.top1 is not None]
        self.last_top1 = last_top1 if last_top1 is not None else (max(known) if known else None)
        self.has_figures = any(p.exit_agreement is not None for p in self.curve)

    def at(self, target_flops: float) -> ExitReference:
        """The figures of the curve's point for ``target_flops`` (:func:`model.curve.point_for`)."""
        k = self.num_exits
        if not self.curve:
            return ExitReference(target_flops, (1.0,) * k, (None,) * k, (None,) * k, True)
        p = point_for(self.curve, target_flops)
        bound = 0.0
        if p.top1 is not None and self.last_top1 is not None:
            bound = max(0.0, p.top1 + self.last_top1 - 1.0)
        if p.exit_agreement is None:
            return ExitReference(target_flops, (bound,) * (k - 1) + (1.0,), (None,) * k, (None,) * k, True)
        agreement = tuple(bound if a is None else a for a in p.exit_agreement)
        return ExitReference(target_flops, agreement, p.exit_top1 or (None,) * k, p.exit_last_top1 or (None,) * k,
                             False)
