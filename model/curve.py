"""The budgeted-batch operating curve: one point type, one lookup rule.

An operating point is a set of per-exit confidence thresholds and what they cost
on the validation split: the mean FLOPs per image (multiply-accumulates of convs
and linears, MSDNet paper convention, cumulative to each image's exit, lazy
evaluation) and the top-1 there. Calibration (``model.calibration``) builds the
curve from the paper's geometric prior over exits (Huang et al. 2018, §5.2); the
budget controller, ``/batch``, ``msdnet batch-eval`` and ``msdnet evaluate`` all
pick points with :func:`point_for`. Plain Python: no torch, no numpy.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class OperatingPoint:
    """Thresholds (one per exit, the last 0.0) and their validation figures.

    Attributes:
        mean_flops: mean FLOPs per image on the validation split.
        thresholds: per-exit confidence thresholds; an image leaves at the first
            exit whose temperature-scaled confidence reaches its threshold.
        top1: validation top-1 (a fraction), None for the curve's added ends.
        p: the geometric prior's parameter that produced it, when it came from one.
        exit_shares: fraction of validation images leaving at each exit.
        exit_agreement: per exit k, among the validation images leaving at k, the
            fraction whose class there equals the last exit's (1.0 at the last exit);
            None for an exit no image leaves at.
        exit_top1: per exit k, top-1 fraction of the images leaving at k (the class served).
        exit_last_top1: per exit k, top-1 fraction of the same images at the last exit.
        The three per-exit figures are None in calibrations written before they existed
        (``msdnet calibrate --figures-only`` adds them).
    """

    mean_flops: float
    thresholds: tuple[float, ...]
    top1: float | None = None
    p: float | None = None
    exit_shares: tuple[float, ...] | None = None
    exit_agreement: tuple[float | None, ...] | None = None
    exit_top1: tuple[float | None, ...] | None = None
    exit_last_top1: tuple[float | None, ...] | None = None

    def to_dict(self) -> dict:
        out = {"mean_flops": self.mean_flops, "thresholds": list(self.thresholds), "top1": self.top1, "p": self.p}
        for name in ("exit_shares", *FIGURES):
            if getattr(self, name) is not None:
                out[name] = list(getattr(self, name))
        return out

    @classmethod
    def from_dict(cls, d: dict) -> OperatingPoint:
        shares = d.get("exit_shares")
        figures = {name: tuple(d[name]) for name in FIGURES if d.get(name) is not None}
        return cls(float(d["mean_flops"]), tuple(float(t) for t in d["thresholds"]), d.get("top1"), d.get("p"),
                   tuple(shares) if shares is not None else None, **figures)


# The per-exit figures of a point (validation split, among the images leaving at each exit).
FIGURES = ("exit_agreement", "exit_top1", "exit_last_top1")


def pareto(curve: list[OperatingPoint]) -> list[OperatingPoint]:
    """Points not beaten on both cost and accuracy, by increasing cost
    (``curve`` sorted by mean FLOPs, ties most accurate first)."""
    out: list[OperatingPoint] = []
    for o in curve:
        if not out or (o.top1 or 0.0) > (out[-1].top1 or 0.0):
            out.append(o)
    return out


def with_ends(curve: list[OperatingPoint], exit_flops: list[float]) -> list[OperatingPoint]:
    """The curve plus its two ends: all leave at exit 1 (thresholds 0) and all run
    to the last exit (thresholds inf), sorted by cost."""
    k = len(exit_flops)
    ends = [OperatingPoint(float(exit_flops[0]), (0.0,) * k),
            OperatingPoint(float(exit_flops[-1]), (math.inf,) * (k - 1) + (0.0,))]
    points = {p.mean_flops: p for p in [*curve, *ends]}
    return [points[m] for m in sorted(points)]


def point_for(curve: list[OperatingPoint], flops: float) -> OperatingPoint:
    """The lookup rule: the most expensive point of ``curve`` (sorted by cost, a
    Pareto curve: accuracy rises with cost) whose validation mean does not exceed
    ``flops`` per image; the cheapest point when every point does."""
    i = bisect.bisect_right([p.mean_flops for p in curve], flops) - 1
    return curve[max(i, 0)]
