"""Temperature scaling and the paper's budgeted-batch thresholds.

Source: Huang et al., ICLR 2018, §5.2 ("budgeted batch classification") and the
official ``dynamic_evaluate.py``. A sample leaves at the first exit k whose
confidence (max softmax of logits / T_k) reaches the threshold theta_k; the last
exit takes everything left (theta_K = 0). The thresholds come from a geometric
prior over exits: exit k should take a share q_k proportional to p^k of the
validation samples; theta_k is the confidence quantile at exit k that lets that
many of the samples still present leave. A threshold of ``inf`` means nobody
leaves there (the prior gives it no samples, or too few remain).

FLOPs here are cumulative multiply-accumulates of convs and linears per exit, at
batch size 1 (MSDNet paper convention); mean FLOPs are per image.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .curve import FIGURES, OperatingPoint, pareto, point_for

NEVER = math.inf


def fit_temperature(logits, labels, steps: int = 50) -> float:
    """Temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al.,
    ICML 2017). ``logits`` (N, C) float tensor, ``labels`` (N,) int64 tensor."""
    import torch  # torch only here and in confidences(): the threshold code is numpy

    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")
    logits = logits.double()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp().double(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def confidences(logits, temperatures: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-exit confidence and prediction from ``logits`` (K, N, C) tensor.

    Returns (confidence (K, N) float64 in [0, 1], prediction (K, N) int64).
    Computed in float64 so that confident samples rarely tie at exactly 1.0.
    """
    import torch

    t = torch.tensor(temperatures, dtype=torch.float64).view(-1, 1, 1)
    probs = torch.softmax(logits.double() / t, dim=2)
    conf, pred = probs.max(dim=2)
    return conf.numpy(), pred.numpy()


def exit_of(conf: np.ndarray, thresholds: list[float]) -> np.ndarray:
    """0-based exit of each sample: the first k with conf[k] >= thresholds[k],
    else the last. ``conf`` (K, N) -> (N,) int64."""
    k_all = conf.shape[0]
    passed = conf >= np.asarray(thresholds, dtype=np.float64)[:, None]
    passed[k_all - 1] = True
    return passed.argmax(axis=0)


def geometric_prior(p: float, k_all: int) -> np.ndarray:
    """Exit shares q_k proportional to p^k, k = 1..K, summing to 1."""
    q = np.power(float(p), np.arange(1, k_all + 1, dtype=np.float64))
    return q / q.sum()


def prior_thresholds(conf: np.ndarray, shares: np.ndarray) -> list[float]:
    """Thresholds letting ``shares[k]`` of all N samples leave at exit k, taken in
    turn from the samples still present (official ``dynamic_eval_find_threshold``).

    Ties: when several samples share the quantile's confidence, the threshold is
    set either at that value (all of them leave) or just above it (none do),
    whichever leaves a count closer to the target. An exit whose target count is
    0, or that too few samples reach, gets :data:`NEVER`.
    """
    k_all, n = conf.shape
    present = np.ones(n, dtype=bool)
    thresholds = []
    for k in range(k_all - 1):
        want = int(math.floor(n * shares[k]))
        c = np.sort(conf[k, present])[::-1]
        if want == 0 or want > len(c):
            thresholds.append(NEVER)
            continue
        value = c[want - 1]
        n_at = int((c >= value).sum())
        above = np.nextafter(value, np.inf)
        n_above = int((c >= above).sum())
        theta = float(value) if abs(n_at - want) <= abs(n_above - want) else float(above)
        if n_above == 0 and theta == float(above):
            theta = NEVER
        thresholds.append(theta)
        present &= ~(conf[k] >= theta)
    thresholds.append(0.0)
    return thresholds


def evaluate_thresholds(conf: np.ndarray, pred: np.ndarray, labels: np.ndarray, thresholds: list[float],
                        exit_flops: list[int]) -> tuple[float, float, list[float]]:
    """(mean FLOPs per image, top-1 fraction, share of samples per exit)."""
    ex = exit_of(conf, thresholds)
    n = conf.shape[1]
    chosen = pred[ex, np.arange(n)]
    flops = np.asarray(exit_flops, dtype=np.float64)[ex]
    shares = np.bincount(ex, minlength=conf.shape[0]) / n
    return float(flops.mean()), float((chosen == labels).mean()), shares.tolist()


def exit_figures(conf: np.ndarray, pred: np.ndarray, labels: np.ndarray,
                 thresholds: list[float]) -> dict[str, tuple[float | None, ...]]:
    """Per exit k, among the samples leaving at k under ``thresholds``: the fraction
    whose prediction there equals the last exit's (``exit_agreement``), their top-1
    there (``exit_top1``) and at the last exit (``exit_last_top1``); None for an exit
    no sample leaves at. ``conf``/``pred`` (K, N), ``labels`` (N,). The keys are
    :data:`model.curve.FIGURES` (an :class:`OperatingPoint`'s fields)."""
    ex = exit_of(conf, thresholds)
    n = conf.shape[1]
    served, last = pred[ex, np.arange(n)], pred[-1]
    out: dict[str, list[float | None]] = {name: [] for name in FIGURES}
    for k in range(conf.shape[0]):
        here = ex == k
        if not here.any():
            for name in FIGURES:
                out[name].append(None)
            continue
        out["exit_agreement"].append(float((served[here] == last[here]).mean()))
        out["exit_top1"].append(float((served[here] == labels[here]).mean()))
        out["exit_last_top1"].append(float((last[here] == labels[here]).mean()))
    return {name: tuple(v) for name, v in out.items()}


def with_figures(point: OperatingPoint, conf: np.ndarray, pred: np.ndarray, labels: np.ndarray) -> OperatingPoint:
    """``point`` with its per-exit figures (:func:`exit_figures`) for its thresholds."""
    return replace(point, **exit_figures(conf, pred, labels, list(point.thresholds)))


def budgeted_curve(conf: np.ndarray, pred: np.ndarray, labels: np.ndarray, exit_flops: list[int],
                   ps: np.ndarray | None = None) -> list[OperatingPoint]:
    """Thresholds and validation cost/accuracy (with the per-exit figures of
    :func:`exit_figures`) for a grid of geometric-prior parameters p (default: 400
    values log-spaced in [0.02, 50]), sorted by mean FLOPs."""
    ps = np.geomspace(0.02, 50.0, 400) if ps is None else ps
    out = []
    for p in ps:
        th = prior_thresholds(conf, geometric_prior(p, conf.shape[0]))
        mean, top1, shares = evaluate_thresholds(conf, pred, labels, th, exit_flops)
        out.append(OperatingPoint(mean, tuple(th), top1, float(p), tuple(shares),
                                  **exit_figures(conf, pred, labels, th)))
    return sorted(out, key=lambda o: (o.mean_flops, -o.top1))


def solve_for_budget(curve: list[OperatingPoint], target_flops: float) -> OperatingPoint:
    """The most accurate curve point whose mean FLOPs per image on the validation
    split does not exceed ``target_flops``: :func:`model.curve.point_for` on the
    curve's Pareto front (equal accuracy: the cheaper point).

    Raises:
        ValueError: when the target is below every point (below exit 1's cost).
    """
    front = pareto(curve)
    if target_flops < front[0].mean_flops:
        raise ValueError(f"target {target_flops:.0f} FLOPs per image is below the cheapest operating point "
                         f"({front[0].mean_flops:.0f} FLOPs)")
    return point_for(front, target_flops)
