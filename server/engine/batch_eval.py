"""Offline check of budgeted batch classification (``POST /batch``) on a test split.

Runs the server's own :class:`~server.budget.policies.BudgetPolicy` through the real
:class:`~server.engine.scheduler.BlockScheduler` (a fake clock; each image's per-exit
confidences precomputed with the model, which is what the runner would compute)
on consecutive batches of the test split, for a range of budgets, and compares
with the paper's fixed-threshold method (thresholds from the validation split,
applied to every image) at the same mean FLOPs.

``msdnet batch-eval [--checkpoint F] [--batch-size 100] [--json OUT]``.
FLOPs: multiply-accumulates of convs and linears per image (MSDNet paper), with
lazy evaluation.
"""

from __future__ import annotations

import numpy as np

from model import calibration as C
from model.checkpoint import Checkpoint
from model.curve import with_ends

from ..budget.policies import BudgetPolicy
from .scheduler import BlockScheduler, Task


def simulate_batch(conf: np.ndarray, budget: float, thresholds, exit_flops: list[float],
                   max_batch_size: int = 64) -> np.ndarray:
    """0-based exit of each image of one /batch request. ``conf`` (K, N)."""
    k_all, n = conf.shape
    policy = BudgetPolicy(budget, n, tuple(thresholds), exit_flops)
    sched = BlockScheduler(k_all, max_batch_size, 0.0, n)
    tasks = [Task(arrival=0.0, policy=policy, state=i) for i in range(n)]
    sched.submit(tasks)
    while (step := sched.next_step(0.0)) is not None:
        block, batch, _ = step
        sched.complete(block, batch, [float(conf[block, t.state]) for t in batch], 0.0)
    return np.array([t.exits_done - 1 for t in tasks])


def compare(ck: Checkpoint, logits, labels: np.ndarray, batch_size: int = 100) -> list[dict]:
    """For each calibration point as the per-image budget: /batch's accuracy and
    mean FLOPs on the test split, and the fixed-threshold method's accuracy at
    the same mean FLOPs: linear interpolation along its test curve (thresholds
    chosen on the validation split, as in the paper), and along that curve's upper
    envelope (the best fixed point at or below each cost, which peeks at test labels)."""
    cal = ck.calibration
    conf, pred = C.confidences(logits, cal.temperatures)
    flops = ck.exit_flops(lazy=True)
    n = conf.shape[1]
    curve = with_ends(list(cal.curve), flops)
    fixed = sorted(C.evaluate_thresholds(conf, pred, labels, list(p.thresholds), flops)[:2] for p in curve)
    fixed_cost, fixed_acc = np.array([f[0] for f in fixed]), np.array([f[1] for f in fixed])
    envelope = np.maximum.accumulate(fixed_acc)  # the best fixed point at or below each cost (uses test labels)
    rows = []
    for point in curve[1:-1:max(1, len(curve) // 12)]:
        per_image = point.mean_flops
        exits = np.concatenate([simulate_batch(conf[:, i:i + batch_size], per_image * min(batch_size, n - i),
                                               point.thresholds, flops) for i in range(0, n, batch_size)])
        mean = float(np.asarray(flops)[exits].mean())
        acc = float((pred[exits, np.arange(n)] == labels).mean())
        rows.append({"budget_per_image": per_image, "mean_flops": mean, "top1": acc,
                     "fixed_top1_at_same_flops": float(np.interp(mean, fixed_cost, fixed_acc)),
                     "fixed_envelope_top1_at_same_flops": float(np.interp(mean, fixed_cost, envelope))})
    return rows
