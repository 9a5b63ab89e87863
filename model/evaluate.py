"""Offline calibration and evaluation of a checkpoint.

- :func:`calibrate`: per-exit temperatures and the budgeted-batch curve on the
  validation split held out at training time (never the test split).
- :func:`evaluate`: the anytime table (per exit: test top-1, cumulative FLOPs,
  parameters, CPU latency at batch 1 and 64) and the budgeted-batch curve
  (thresholds from the validation split, accuracy and mean FLOPs on the test split).

FLOPs: cumulative multiply-accumulates of convs and linears per image, as the
MSDNet paper counts them. Served costs use lazy evaluation (``flops_lazy``).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from . import calibration as C
from . import checkpoint as ckpt
from . import data as D
from .curve import OperatingPoint, pareto


@torch.no_grad()
def collect_logits(model, images: D.ImageSet, mean, std, batch_size: int = 500) -> Tensor:
    """Logits of every exit: (K, N, num_classes), test-time transforms."""
    model.eval()
    chunks = [torch.stack(model(x)) for x, _ in D.batches(images, batch_size, mean, std)]
    return torch.cat(chunks, dim=1)


def _from_folder(ck: ckpt.Checkpoint, data: str | None) -> bool:
    return data == ckpt.FOLDER or (data is None and ck.validation is not None and ck.validation.from_folder)


def _recorded(ck: ckpt.Checkpoint) -> ckpt.ValidationSplit:
    """The checkpoint's validation split.

    Raises:
        ValueError: when the checkpoint records none (a file written without one).
    """
    if ck.validation is None:
        raise ValueError("the checkpoint records no validation split: give --data (and --data-dir)")
    return ck.validation


def _folder(ck: ckpt.Checkpoint, data_dir: str | None, split: str) -> D.ImageSet:
    """The user's class folder ``data_dir/split/<class>/*``, through the checkpoint's
    input contract, classes checked against the checkpoint's."""
    if data_dir is None:
        raise D.DataError("folder data needs --data-dir (a folder of <split>/<class>/<images>)")
    cfg = ck.config
    return D.load_folder(data_dir, split, cfg.image_size, cfg.in_channels, contract=ck.transforms,
                         classes=ck.classes, progress=True)


def validation_set(ck: ckpt.Checkpoint, data_dir: str | None = None, data: str | None = None,
                   split: str = "val") -> D.ImageSet:
    """Calibration images: the validation split recorded in the checkpoint (data
    set, seed, size), or with ``data="folder"`` (or a checkpoint imported without
    a data set) the user's folder ``data_dir/split/<class>/*``."""
    if _from_folder(ck, data):
        return _folder(ck, data_dir, split)
    v = _recorded(ck)
    cfg = ck.config
    full = D.load(data or v.dataset, "train", data_dir, cfg.image_size, cfg.in_channels)
    _, val_idx = D.validation_split(len(full), v.size, v.seed)
    return full.subset(val_idx)


def test_set(ck: ckpt.Checkpoint, data_dir: str | None = None, data: str | None = None,
             split: str = "test") -> D.ImageSet:
    """Evaluation images: the test split of ``data`` (default: the recorded data set), or the user's folder
    ``data_dir/split/<class>/*`` (see :func:`validation_set`)."""
    if _from_folder(ck, data):
        return _folder(ck, data_dir, split)
    cfg = ck.config
    return D.load(data or _recorded(ck).dataset, "test", data_dir, cfg.image_size, cfg.in_channels)


def default_operating_point(curve: list[OperatingPoint], max_drop: float) -> OperatingPoint:
    """The cheapest validation operating point whose top-1 is within ``max_drop``
    (a fraction, e.g. 0.002 = 0.2 points) of the most expensive point's."""
    full = max(curve, key=lambda o: o.mean_flops)
    ok = [o for o in curve if o.top1 >= full.top1 - max_drop]
    return min(ok, key=lambda o: (o.mean_flops, -o.top1))


def calibrate(ck: ckpt.Checkpoint, data_dir: str | None = None, target_flops: float | None = None,
              max_drop: float = 0.002, data: str | None = None, split: str = "val") -> ckpt.Calibration:
    """Fit temperatures, build the budgeted curve and pick the default thresholds:
    those for ``target_flops`` (FLOPs per image) if given, else the cheapest point
    within ``max_drop`` of the last exit's validation top-1. Stores and returns
    it in the checkpoint. Images: :func:`validation_set` (``data``, ``split``).

    Raises:
        ValueError: when ``target_flops`` is below the cheapest operating point.
    """
    val = validation_set(ck, data_dir, data, split)
    t = ck.transforms
    logits = collect_logits(ck.model, val, t.mean, t.std)
    labels = val.labels
    temperatures = [C.fit_temperature(logits[k], labels) for k in range(logits.shape[0])]
    conf, pred = C.confidences(logits, temperatures)
    flops = ck.exit_flops(lazy=True)
    curve = C.budgeted_curve(conf, pred, labels.numpy(), flops)
    point = C.solve_for_budget(curve, target_flops) if target_flops else default_operating_point(curve, max_drop)
    ck.calibration = ckpt.Calibration(
        mean_confidence=tuple(float(c) for c in conf.mean(axis=1)),
        temperatures=tuple(float(t) for t in temperatures),
        thresholds=tuple(float(t) for t in point.thresholds),
        target_flops=float(point.mean_flops),
        curve=tuple(pareto(curve)),
        p=point.p,
        val_top1=point.top1,
        val_exit_shares=tuple(point.exit_shares),
        cost="flops_lazy",
        rule=(f"target {target_flops:.0f} FLOPs" if target_flops else
              f"cheapest validation point within {max_drop * 100:.2f} points of the last exit"),
        images_source=f"{data_dir}/{split}" if _from_folder(ck, data) else _recorded(ck).dataset,
        images_count=len(val),
    )
    return ck.calibration


def _calibration(ck: ckpt.Checkpoint) -> ckpt.Calibration:
    """The checkpoint's calibration.

    Raises:
        ValueError: when the checkpoint is not calibrated.
    """
    if ck.calibration is None:
        raise ValueError("checkpoint is not calibrated: run 'msdnet calibrate --checkpoint FILE' first")
    return ck.calibration


def add_figures(ck: ckpt.Checkpoint, data_dir: str | None = None, data: str | None = None,
                split: str = "val") -> ckpt.Calibration:
    """Add the per-exit agreement and accuracy figures (:func:`model.calibration.exit_figures`)
    to every point of a calibrated checkpoint's curve, and the mean confidence per exit,
    keeping its temperatures, thresholds and curve: a checkpoint calibrated before they
    existed gets them without recalibrating. Images: :func:`validation_set`. Stores and
    returns the new calibration in the checkpoint.

    Raises:
        ValueError: when the checkpoint is not calibrated.
    """
    cal = _calibration(ck)
    val = validation_set(ck, data_dir, data, split)
    t = ck.transforms
    conf, pred = C.confidences(collect_logits(ck.model, val, t.mean, t.std), list(cal.temperatures))
    labels = val.labels.numpy()
    ck.calibration = replace(cal, curve=tuple(C.with_figures(p, conf, pred, labels) for p in cal.curve),
                             mean_confidence=tuple(float(c) for c in conf.mean(axis=1)))
    return ck.calibration


def _latency_ms(model, x: Tensor, repeats: int) -> list[float]:
    """Median wall time (ms) to reach each exit with the staged forward."""
    times = np.zeros((repeats, model.num_exits))
    with torch.no_grad():
        for r in range(repeats + 1):
            state = model.start(x)
            t0 = time.perf_counter()
            for k in range(model.num_exits):
                _, state = model.advance(state)
                if r > 0:  # the first pass warms up
                    times[r - 1, k] = (time.perf_counter() - t0) * 1e3
    return np.median(times, axis=0).tolist()


def evaluate(ck: ckpt.Checkpoint, data_dir: str | None = None, latency_repeats: int = 20,
             data: str | None = None, split: str = "test") -> dict:
    """Anytime table and budgeted-batch curve on the test split.

    Returns ``{"anytime": [{"exit", "top1", "flops", "flops_lazy", "params",
    "latency_ms_b1", "latency_ms_b64"}], "budgeted": [{"p", "mean_flops", "top1",
    "val_mean_flops", "val_top1", "exit_shares"}], "default": {...}}``; the default's
    ``agreement`` is the fraction of test images whose served class equals the last exit's.

    Raises:
        ValueError: when the checkpoint is not calibrated.
    """
    cal = _calibration(ck)
    test = test_set(ck, data_dir, data, split)
    t = ck.transforms
    logits = collect_logits(ck.model, test, t.mean, t.std)
    labels = test.labels.numpy()
    top1 = (logits.argmax(2).numpy() == labels[None]).mean(axis=1)
    x1 = D.normalise(test.images[:1], t.mean, t.std)
    x64 = D.normalise(test.images[:64], t.mean, t.std)
    lat1, lat64 = _latency_ms(ck.model, x1, latency_repeats), _latency_ms(ck.model, x64, max(3, latency_repeats // 4))
    anytime = [{"exit": c.exit, "top1": float(top1[i]), "flops": c.flops, "flops_lazy": c.flops_lazy,
                "params": c.params, "latency_ms_b1": lat1[i], "latency_ms_b64": lat64[i]}
               for i, c in enumerate(ck.costs)]
    conf, pred = C.confidences(logits, cal.temperatures)
    flops = ck.exit_flops(lazy=True)
    budgeted = []
    for point in cal.curve:
        mean, acc, shares = C.evaluate_thresholds(conf, pred, labels, list(point.thresholds), flops)
        budgeted.append({"p": point.p, "mean_flops": mean, "top1": acc, "val_mean_flops": point.mean_flops,
                         "val_top1": point.top1, "exit_shares": shares})
    mean, acc, shares = C.evaluate_thresholds(conf, pred, labels, list(cal.thresholds), flops)
    served = pred[C.exit_of(conf, list(cal.thresholds)), np.arange(len(labels))]
    default = {"thresholds": list(cal.thresholds), "mean_flops": mean, "top1": acc, "exit_shares": shares,
               "val_mean_flops": cal.target_flops, "agreement": float((served == pred[-1]).mean())}
    return {"anytime": anytime, "budgeted": budgeted, "default": default,
            "unit": "FLOPs = multiply-accumulates of convs and linears per image (cumulative, batch 1)"}


def plot(result: dict, path: str) -> None:
    """Accuracy against mean FLOPs: the anytime exits and the budgeted curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    a = result["anytime"]
    ax.plot([r["flops_lazy"] / 1e6 for r in a], [100 * r["top1"] for r in a], "o-", label="anytime (each exit)")
    b = sorted(result["budgeted"], key=lambda r: r["mean_flops"])
    ax.plot([r["mean_flops"] / 1e6 for r in b], [100 * r["top1"] for r in b], "-", label="budgeted batch (test)")
    d = result["default"]
    ax.plot([d["mean_flops"] / 1e6], [100 * d["top1"]], "k*", ms=10, label="default thresholds")
    ax.set_xlabel("mean MFLOPs per image (multiply-accumulates, lazy evaluation)")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
