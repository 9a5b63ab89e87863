"""Part b: budget controller tracking. Realised vs target FLOPs per request
through a switch of traffic mix (easy classes only, then hard classes only) and a
runtime change of target (``PUT /budget``). FLOPs = multiply-accumulates of convs
and linears (MSDNet paper), cumulative per exit."""

from __future__ import annotations

import time

import numpy as np

from .. import openloop as ol
from ..common import TARGET_FLOPS_ERROR, Plan, fmt, log
from ..samples import to_samples


def http_json(method: str, url: str, token: str | None = None, body: dict | None = None) -> dict:
    """One JSON request to a loopback ``url`` (``ValueError`` otherwise); raises
    ``httpx.HTTPStatusError`` on a non-2xx answer."""
    import httpx

    ol.check_loopback(url)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    r = httpx.request(method, url, json=body, headers=headers, timeout=10.0)
    r.raise_for_status()
    return r.json()


def controller_tracking(url: str, token: str, easy, hard, targets: tuple[float, float], rate: float,
                        plan: Plan) -> dict:
    """Four phases: easy @ T0, hard @ T0, (PUT /budget) hard @ T1, easy @ T1.
    ``targets``: (T0, T1) in MACs per request; ``rate`` in requests/s."""
    t0, t1 = targets
    phases = [("easy", t0, easy), ("hard", t0, hard), ("hard", t1, hard), ("easy", t1, easy)]
    rows, records, current = [], [], None
    for k, (mix, target, samples) in enumerate(phases):
        if target != current:
            state = http_json("PUT", url + "/budget", token, {"target_flops": target})
            current = state["target_flops"]
        n = plan.controller_phase
        r = ol.run(url, ol.classify_requests(samples, tag=f"{mix}@{target:.0f}", seed=k), rate,
                   1.3 * n / rate + 1.0, max_requests=n, timeout_s=plan.timeout_s, seed=2000 + k)
        recs = sorted(r.records, key=lambda x: x.done_s)
        for x in recs:
            records.append({"phase": k, "mix": mix, "target": target, "flops": x.flops, "status": x.status,
                            "correct": x.correct, "exit": x.exit})
        s = ol.summarise(recs)
        budget = http_json("GET", url + "/budget")
        rows.append({"phase": k + 1, "mix": mix, "target": target, "requests": s["requests"], "ok": s["ok"],
                     "mean_flops": s["mean_flops"], "accuracy": s["accuracy"], "exits": s["exits"],
                     "p99_ms": s["p99_ms"], "server_realised": budget["realised_flops"],
                     "thresholds_end": budget["thresholds"]})
        log(f"  phase {k + 1} {mix} @ {target / 1e6:.3f} MFLOPs: mean {fmt((s['mean_flops'] or 0) / 1e6, '{:.3f}')}"
            f" MFLOPs, acc {s['accuracy']}, exits {s['exits']}")
    ok = [r for r in records if r["status"] == 200 and r["flops"] is not None]
    f = np.array([r["flops"] for r in ok], dtype=np.float64)
    tgt = np.array([r["target"] for r in ok], dtype=np.float64)
    w = plan.controller_window
    windows = window_errors(f, tgt, w)
    for row in rows:
        row["mean_error"] = (row["mean_flops"] - row["target"]) / row["target"] if row["mean_flops"] else None
    time.sleep(plan.part_pause_s)
    return {"rate": rate, "targets": [t0, t1], "phases": rows, "window": w, **windows,
            "series": {"flops": f.tolist(), "target": tgt.tolist(), "phase": [r["phase"] for r in ok]}}


def window_errors(f: np.ndarray, target: np.ndarray, w: int) -> dict:
    """Relative error of each sliding window of ``w`` requests (completion order):
    mean FLOPs / mean target - 1. ``constant``: windows within one target only
    (they may span the easy->hard switch); ``all``: every window."""
    if len(f) < w:
        return {"max_abs_error_constant": None, "max_abs_error_all": None, "windows": 0}
    cf, ct = np.cumsum(np.r_[0.0, f]), np.cumsum(np.r_[0.0, target])
    mf, mt = (cf[w:] - cf[:-w]) / w, (ct[w:] - ct[:-w]) / w
    err = mf / mt - 1
    seg = np.r_[0, np.cumsum(target[1:] != target[:-1])]
    same = seg[w - 1:] == seg[: len(seg) - w + 1]
    blocks = [err[i] for i in range(0, len(err), w)]  # non-overlapping windows
    worst = int(np.argmax(np.where(same, np.abs(err), -1.0))) if same.any() else None
    return {"max_abs_error_constant": float(np.abs(err[same]).max()) if same.any() else None,
            "worst_window_start": worst,
            "max_abs_error_all": float(np.abs(err).max()), "windows": int(len(err)),
            "max_abs_error_disjoint": float(np.abs(blocks).max()), "window_errors": err.tolist()}


def run(url: str, token: str, test, easy: list[int], hard: list[int], cal_target: float, flops: list[int],
        capacity: float, plan: Plan) -> dict:
    """Part b on a started msdnet-serve at ``plan.controller_load`` of its ``capacity``
    (requests/s): T0 = the calibrated target, T1 = 0.75 T0 (or halfway to the last
    exit's cost when 0.75 T0 would come within 10% of exit 1's cost)."""
    t0 = cal_target
    t1 = 0.75 * t0 if 0.75 * t0 >= 1.1 * flops[0] else 0.5 * (t0 + flops[-1])
    rate = max(plan.controller_load * capacity, plan.min_rate)
    easy_s = to_samples(test, easy, seed=1)
    hard_s = to_samples(test, hard, seed=2)
    b = controller_tracking(url, token, easy_s, hard_s, (t0, t1), rate, plan)
    b["target_met"] = (b["max_abs_error_constant"] is not None
                       and b["max_abs_error_constant"] <= TARGET_FLOPS_ERROR)
    return b
