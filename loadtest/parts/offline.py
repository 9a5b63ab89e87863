"""The model offline: test-split accuracy per exit and at the calibrated
thresholds, and per-class exit-1 accuracy (which picks part b's easy and hard traffic)."""

from __future__ import annotations


def offline_eval(ck, test, logits=None) -> dict:
    """Test-split accuracy per exit, at the calibrated thresholds, and per class at exit 1.

    ``ck``: a loaded calibrated checkpoint; ``test``: a dataset with ``images``
    (N, 1, 28, 28) and ``labels`` (N,); ``logits``: (exits, N, classes) of ``test``
    if already computed. ``exit_flops``: cumulative multiply-accumulates per exit
    with lazy evaluation (MSDNet paper convention)."""
    import numpy as np
    import torch

    from model import calibration as C
    from model.evaluate import collect_logits

    if logits is None:
        t = ck.transforms
        logits = collect_logits(ck.model, test, t.mean, t.std)
    logits = np.asarray(logits)
    labels = test.labels.numpy()
    pred = logits.argmax(2)
    top1 = (pred == labels[None]).mean(axis=1)
    flops = ck.exit_flops(lazy=True)
    cal = ck.calibration
    conf, cpred = C.confidences(torch.from_numpy(logits), cal.temperatures)
    mean, acc, shares = C.evaluate_thresholds(conf, cpred, labels, list(cal.thresholds), flops)
    per_class = []
    for c, name in enumerate(ck.classes):
        m = labels == c
        per_class.append({"class": c, "name": name, "n": int(m.sum()),
                          "exit1_top1": float((pred[0][m] == c).mean()) if m.any() else float("nan")})
    return {"n": int(len(labels)), "exit_top1": top1.tolist(), "exit_flops": flops,
            "calibrated": {"target_flops": cal.target_flops, "mean_flops": mean, "top1": acc,
                           "exit_shares": shares, "rule": cal.rule},
            "per_class": per_class}


def easy_hard(per_class: list[dict]) -> tuple[list[int], list[int]]:
    """Easy: the better half of the classes by exit-1 accuracy; hard: the worse
    (n-1)//2 (the middle class, for 10, is in neither)."""
    order = sorted(per_class, key=lambda r: -r["exit1_top1"])
    n = len(order)
    return [r["class"] for r in order[: (n + 1) // 2]], [r["class"] for r in order[n - (n - 1) // 2:]]
