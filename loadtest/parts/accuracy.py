"""Part e: what the budget controller costs in accuracy on steady traffic.

msdnet-serve (controller on, the calibrated target) answers every test image
once, in a shuffled order, at a steady Poisson rate. Its served accuracy is set
against fixed thresholds at the same mean FLOPs on the same images: the
checkpoint's budgeted-batch curve (thresholds fitted on the validation split,
paper §5.2), each point applied to those images' test logits, and the accuracy
interpolated linearly at the served mean FLOPs. Issue 12's bar: served accuracy
within 0.05 points of that.

FLOPs = multiply-accumulates of convs and linears (MSDNet paper convention),
cumulative to the exit taken, lazy evaluation.
"""

from __future__ import annotations

import time

import numpy as np

from .. import openloop as ol
from ..common import Plan, log

TARGET_POINTS = 0.05  # served accuracy may trail fixed thresholds by at most this many points


def fixed_curve(conf: np.ndarray, pred: np.ndarray, labels: np.ndarray, thresholds: list[tuple[float, ...]],
                exit_flops: list[int]) -> list[tuple[float, float]]:
    """``(mean FLOPs per image, top-1 fraction)`` of each threshold set on these images,
    sorted by mean FLOPs. ``conf``, ``pred``: (exits, N) temperature-scaled confidence and
    class per exit (:func:`model.calibration.confidences`); ``labels``: (N,)."""
    from model.calibration import evaluate_thresholds

    return sorted(evaluate_thresholds(conf, pred, labels, list(th), exit_flops)[:2] for th in thresholds)


def accuracy_at(curve: list[tuple[float, float]], flops: float) -> float:
    """Top-1 of :func:`fixed_curve` at ``flops`` mean FLOPs per image, linear between
    its two neighbouring points (clamped at the ends).

    Raises:
        ValueError: for an empty curve.
    """
    if not curve:
        raise ValueError("no operating points")
    f = np.array([c[0] for c in curve])
    a = np.array([c[1] for c in curve])
    return float(np.interp(flops, f, a))


def run(url: str, samples, logits, labels: np.ndarray, ck, rate: float, plan: Plan) -> dict:
    """Every sample once at ``rate`` requests/s (at most ``plan.confirm_images``);
    ``logits``: (exits, N_test, classes) test-split logits in test-split order
    (``Sample.index`` picks the row); ``labels``: (N_test,)."""
    import torch

    from model.calibration import confidences, evaluate_thresholds

    n = min(len(samples), plan.confirm_images)
    r = ol.run(url, ol.classify_requests(samples), rate, 1.3 * n / rate + 2.0, max_requests=n, warmup_s=0.0,
               timeout_s=plan.timeout_s, seed=4000)
    answered = [x for x in r.records if x.status == 200 and x.flops is not None]
    failed = len(r.records) - len(answered)
    idx = np.array([samples[x.index % len(samples)].index for x in answered], dtype=np.int64)
    served_acc = float(np.mean([bool(x.correct) for x in answered])) if answered else None
    served_flops = float(np.mean([x.flops for x in answered])) if answered else None
    out = {"rate": rate, "requests": len(r.records), "answered": len(answered), "failed": failed,
           "served_top1": served_acc, "served_mean_flops": served_flops,
           "exits": ol.summarise(answered)["exits"], "target_flops": ck.calibration.target_flops}
    if answered:
        cal = ck.calibration
        conf, pred = confidences(torch.from_numpy(np.ascontiguousarray(logits[:, idx])), list(cal.temperatures))
        flops = ck.exit_flops(lazy=True)
        curve = fixed_curve(conf, pred, labels[idx], [p.thresholds for p in cal.curve], flops)
        fixed = accuracy_at(curve, served_flops)
        cal_flops, cal_acc, _ = evaluate_thresholds(conf, pred, labels[idx], list(cal.thresholds), flops)
        last = float((pred[-1] == labels[idx]).mean())  # every image at the last exit
        out.update(fixed_top1=fixed, difference_points=100 * (served_acc - fixed), last_exit_top1=last,
                   calibrated={"mean_flops": cal_flops, "top1": cal_acc}, curve_points=len(curve),
                   target_met=bool(failed == 0 and 100 * (served_acc - fixed) >= -TARGET_POINTS))
        log(f"  served {100 * served_acc:.2f}% at {served_flops / 1e6:.3f} MFLOPs; fixed thresholds "
            f"{100 * fixed:.2f}% at the same FLOPs ({100 * (served_acc - fixed):+.3f} points); calibrated "
            f"thresholds {100 * cal_acc:.2f}% at {cal_flops / 1e6:.3f} MFLOPs")
    time.sleep(plan.part_pause_s)
    return out
