"""Benchmark report: ``python -m loadtest.bench --out docs [--smoke]``.

In one run on one machine, starting the server processes itself (loopback only),
it measures and writes ``<out>/BENCHMARKS.md`` and PNG plots:

a. throughput at an SLO (p99 <= 100 ms, open loop, latency from the scheduled
   send time) and served accuracy, for (i) msdnet-serve at the checkpoint's
   calibrated target with the budget controller on, (ii) the same server forced to
   the last exit (``MSDNET_TARGET_FLOPS`` = the last exit's cost), (iii) the naive
   baseline (``loadtest.naive_server``: whole network per request, no batching);
b. controller tracking: realised vs target FLOPs per request through a switch of
   traffic mix (easy classes only, then hard classes only) and a runtime change of
   target (``PUT /budget``);
c. deadlines met at 50/80/100/120% of (i)'s capacity, and the exits taken;
d. compute efficiency: attained multiply-accumulates per second per block at
   batch 1 and 64 against a large matrix multiply and against ONNX Runtime.

FLOPs everywhere = multiply-accumulates of convs and linears as the MSDNet paper
counts them, cumulative per exit (served costs use lazy evaluation).

``--smoke`` runs every part tiny (seconds each) to show the scripts work; its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import math
import os
import platform
import resource
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import openloop as ol
from .samples import load_test_set, to_samples
from .servers import ServerProcess

PNGS = {"throughput": "bench_throughput.png", "controller": "bench_controller.png",
        "deadlines": "bench_deadlines.png", "efficiency": "bench_efficiency.png"}
TARGET_SPEEDUP = 2.5
TARGET_ACC_DROP_POINTS = 0.3
TARGET_DEADLINE_SHARE = 0.999
TARGET_FLOPS_ERROR = 0.02


@dataclass(frozen=True)
class Plan:
    """Sizes of every part. Rates in requests/s, times in seconds."""

    search_start: float = 100.0   # first rate tried; doubled until the SLO fails, then bisected
    search_max: float = 6400.0
    min_rate: float = 5.0
    trial_s: float = 15.0         # scored seconds per rate tried
    warmup_s: float = 1.5         # unscored seconds before each run
    pause_s: float = 2.0          # between runs (the server drains)
    timeout_s: float = 5.0        # a request not answered by then failed
    bisect_steps: int = 4
    max_trials: int = 12
    confirm_images: int = 10_000  # accuracy run: each test image once ...
    confirm_max_s: float = 110.0  # ... unless that takes longer at capacity
    confirm_max_s_naive: float = 30.0  # the baseline's answers are the last exit's: fewer images will do
    controller_phase: int = 3000  # requests per phase of part b
    controller_window: int = 1000
    controller_load: float = 0.5  # part b's rate, as a fraction of (i)'s capacity
    deadline_s: float = 15.0      # per load level of part c
    loads: tuple[float, ...] = (0.5, 0.8, 1.0, 1.2)
    eff_repeats_b1: int = 300
    eff_repeats_b64: int = 30
    peak_n: int = 2048
    images: int | None = None     # test images used (None: all 10,000)
    warmup_rounds: int = 5        # the server's MSDNET_WARMUP_ROUNDS


FULL = Plan()
SMOKE = Plan(search_start=20.0, search_max=40.0, trial_s=0.6, warmup_s=0.2, pause_s=0.1, timeout_s=5.0,
             bisect_steps=1, max_trials=2, confirm_images=100, confirm_max_s=0.8, confirm_max_s_naive=0.8,
             controller_phase=24,
             controller_window=12, controller_load=0.5, deadline_s=0.5, eff_repeats_b1=5, eff_repeats_b64=2,
             peak_n=256, images=200, warmup_rounds=1)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------- machine
def machine_info() -> dict:
    info = {"cpu": platform.processor() or "unknown", "logical_cpus": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform()}
    with contextlib.suppress(Exception):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu"] = fields.get("Model name", info["cpu"])
        for key in ("Thread(s) per core", "Core(s) per socket", "Socket(s)"):
            if key in fields:
                info[key] = fields[key]
    import torch

    info["torch"] = torch.__version__
    with contextlib.suppress(ImportError):
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    with contextlib.suppress(Exception):
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10, cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).parent).stdout.strip()
        info["git"] = rev + (" (uncommitted changes)" if dirty else "")
    info["loadavg_at_start"] = os.getloadavg()
    return info


# ---------------------------------------------------------------------------- offline
def offline_eval(ck, test) -> dict:
    """Test-split accuracy per exit, at the calibrated thresholds, and per class at exit 1."""
    from model import calibration as C
    from model.evaluate import collect_logits

    t = ck.transforms
    logits = collect_logits(ck.model, test, t.mean, t.std)
    labels = test.labels.numpy()
    pred = logits.argmax(2).numpy()
    top1 = (pred == labels[None]).mean(axis=1)
    flops = ck.exit_flops(lazy=True)
    cal = ck.calibration
    conf, cpred = C.confidences(logits, cal["temperatures"])
    mean, acc, shares = C.evaluate_thresholds(conf, cpred, labels, cal["thresholds"], flops)
    per_class = []
    for c, name in enumerate(ck.classes):
        m = labels == c
        per_class.append({"class": c, "name": name, "n": int(m.sum()),
                          "exit1_top1": float((pred[0][m] == c).mean()) if m.any() else float("nan")})
    return {"n": int(len(labels)), "exit_top1": top1.tolist(), "exit_flops": flops,
            "calibrated": {"target_flops": cal["target_flops"], "mean_flops": mean, "top1": acc,
                           "exit_shares": shares, "rule": cal.get("rule")},
            "per_class": per_class}


def easy_hard(per_class: list[dict]) -> tuple[list[int], list[int]]:
    """Easy: the better half of the classes by exit-1 accuracy; hard: the worse
    (n-1)//2 (the middle class, for 10, is in neither)."""
    order = sorted(per_class, key=lambda r: -r["exit1_top1"])
    n = len(order)
    return [r["class"] for r in order[: (n + 1) // 2]], [r["class"] for r in order[n - (n - 1) // 2:]]


# ---------------------------------------------------------------------------- HTTP helpers
def http_json(method: str, url: str, token: str | None = None, body: dict | None = None) -> dict:
    import httpx

    ol.check_loopback(url)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    r = httpx.request(method, url, json=body, headers=headers, timeout=10.0)
    r.raise_for_status()
    return r.json()


# ---------------------------------------------------------------------------- part a
def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def find_capacity(srv: ServerProcess, samples, plan: Plan, slo_ms: float, name: str) -> dict:
    """Highest arrival rate whose p99 (failures count as infinitely slow) stays <= ``slo_ms``:
    double from ``search_start`` until a rate fails, then bisect (geometric). Each
    trial also records the CPU time per request of the server and of this client."""
    trials: list[dict] = []

    def trial(rate: float) -> bool:
        rate = float(round(rate, 1))
        srv0, me0 = srv.cpu_s(), _cpu_self()
        r = ol.run(srv.url, ol.classify_requests(samples), rate, plan.trial_s, warmup_s=plan.warmup_s,
                   timeout_s=plan.timeout_s, seed=len(trials))
        srv1, me1 = srv.cpu_s(), _cpu_self()
        s = ol.summarise(r.scored(), plan.trial_s)
        n_all = len(r.records) or 1
        s.update(rate=rate, passed=bool(s["ok"] > 0 and s["p99_ms"] <= slo_ms),
                 server_cpu_ms=None if srv0 is None or srv1 is None else 1e3 * (srv1 - srv0) / n_all,
                 client_cpu_ms=1e3 * (me1 - me0) / n_all)
        trials.append(s)
        log(f"  {name}: {rate:7.1f} req/s  p50 {s['p50_ms']:7.1f} ms  p99 {s['p99_ms']:8.1f} ms  "
            f"ok {s['ok']}/{s['requests']}  send lag p99 {s['send_lag_p99_ms']:.1f} ms  CPU ms/request "
            f"server {_f(s['server_cpu_ms'], '{:.2f}')} client {s['client_cpu_ms']:.2f}  "
            f"{'pass' if s['passed'] else 'FAIL'}")
        time.sleep(plan.pause_s)
        return s["passed"]

    lo = hi = None
    rate = plan.search_start
    while len(trials) < plan.max_trials and rate <= plan.search_max:
        if trial(rate):
            lo, rate = rate, rate * 2
        else:
            hi = rate
            break
    while lo is None and hi is not None and hi / 2 >= plan.min_rate and len(trials) < plan.max_trials:
        rate = hi / 2
        if trial(rate):
            lo = rate
        else:
            hi = rate
    for _ in range(plan.bisect_steps):
        if lo is None or hi is None or hi / lo < 1.06 or len(trials) >= plan.max_trials:
            break
        mid = math.sqrt(lo * hi)
        if trial(mid):
            lo = mid
        else:
            hi = mid
    return {"capacity_rps": round(lo, 1) if lo else 0.0, "first_fail_rps": hi, "trials": trials,
            "hit_search_max": hi is None}


def accuracy_run(url: str, samples, rate: float, plan: Plan, max_s: float) -> dict:
    """Each test image once (or as many as ``max_s`` allows) at ``rate``, in the
    shared shuffled order (so every server sees the same first images): accuracy
    over all of them, latency over those after the warm-up. ``correct[i]``: whether
    image i (of that order) was answered right (None: not answered)."""
    n = int(min(len(samples), plan.confirm_images, max(rate, 1.0) * max_s))
    duration = 1.3 * n / rate + 1.0
    r = ol.run(url, ol.classify_requests(samples), rate, duration, max_requests=n, warmup_s=0.0,
               timeout_s=plan.timeout_s, seed=1000)
    scored = [x for x in r.records if x.scheduled_s >= plan.warmup_s]
    span = max(x.scheduled_s for x in r.records) - plan.warmup_s if len(r.records) > 1 else None
    s = ol.summarise(scored, span if span and span > 0 else None)
    everything = ol.summarise(r.records)
    correct: list[bool | None] = [None] * n
    for x in r.records:
        correct[x.index] = x.correct
    s.update(rate=rate, images=everything["scored"], accuracy=everything["accuracy"],
             exits=everything["exits"], mean_flops=everything["mean_flops"], correct=correct)
    time.sleep(plan.pause_s)
    return s


# ---------------------------------------------------------------------------- part b
def controller_tracking(url: str, token: str, easy, hard, targets: tuple[float, float], rate: float,
                        plan: Plan) -> dict:
    """Four phases: easy @ T0, hard @ T0, (PUT /budget) hard @ T1, easy @ T1."""
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
        log(f"  phase {k + 1} {mix} @ {target / 1e6:.3f} MFLOPs: mean {_f((s['mean_flops'] or 0) / 1e6, '{:.3f}')}"
            f" MFLOPs, acc {s['accuracy']}, exits {s['exits']}")
    ok = [r for r in records if r["status"] == 200 and r["flops"] is not None]
    f = np.array([r["flops"] for r in ok], dtype=np.float64)
    tgt = np.array([r["target"] for r in ok], dtype=np.float64)
    w = plan.controller_window
    windows = window_errors(f, tgt, w)
    for row in rows:
        row["mean_error"] = (row["mean_flops"] - row["target"]) / row["target"] if row["mean_flops"] else None
    time.sleep(plan.pause_s)
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


# ---------------------------------------------------------------------------- part c
def deadline_runs(url: str, samples, capacity: float, deadlines: tuple[float, ...], plan: Plan) -> list[dict]:
    rows = []
    for j, load in enumerate(plan.loads):
        rate = max(capacity * load, 1.0)
        r = ol.run(url, ol.classify_requests(samples, deadlines, seed=3000 + j), rate, plan.deadline_s,
                   warmup_s=plan.warmup_s, timeout_s=plan.timeout_s, seed=3000 + j)
        recs = r.scored()
        s = ol.summarise(recs, plan.deadline_s)
        per = {}
        for d in deadlines:
            sub = [x for x in recs if x.deadline_ms == d]
            per[f"{d:g}"] = {"n": len(sub), "met": sum(bool(x.deadline_met) for x in sub) / len(sub) if sub else None,
                             "server_met": (sum(x.status == 200 and x.server_latency_ms is not None
                                                and x.server_latency_ms <= d for x in sub) / len(sub)
                                            if sub else None)}
        server_met = (sum(x.status == 200 and x.server_latency_ms is not None and x.server_latency_ms <= x.deadline_ms
                          for x in recs) / len(recs)) if recs else None
        rows.append({"load": load, "rate": rate, "requests": s["requests"], "met": s["deadline_met_share"],
                     "server_met": server_met,
                     "per_deadline": per, "statuses": s["statuses"], "exits": s["exits"], "p99_ms": s["p99_ms"],
                     "accuracy": s["accuracy"], "mean_flops": s["mean_flops"],
                     "send_lag_p99_ms": s["send_lag_p99_ms"]})
        log(f"  {load:.0%} of capacity ({rate:.1f} req/s): met {s['deadline_met_share']}, "
            f"statuses {s['statuses']}, exits {s['exits']}")
        time.sleep(plan.pause_s)
    return rows


# ---------------------------------------------------------------------------- part d
def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def efficiency(ck, test, threads: int, plan: Plan) -> dict:
    """Per block: attained MAC/s of the staged forward at batch 1 and 64; the
    practical peak (a large float32 matmul); the full all-exits forward in torch
    and in ONNX Runtime."""
    import torch

    from model.data import normalise

    torch.set_num_threads(threads)
    model = ck.model.eval()
    t = ck.transforms
    lazy = ck.exit_flops(lazy=True)
    block = [lazy[0]] + [lazy[k] - lazy[k - 1] for k in range(1, len(lazy))]
    full_flops = ck.exit_flops(lazy=False)[-1]  # the plain forward computes every node
    out = {"threads": threads, "block_flops": block, "exit_flops": lazy, "full_flops": full_flops, "batches": {}}
    with torch.inference_mode():
        for b, reps in ((1, plan.eff_repeats_b1), (64, plan.eff_repeats_b64)):
            x = normalise(test.images[:b], t.mean, t.std)
            if x.shape[0] < b:
                x = x.repeat(math.ceil(b / x.shape[0]), 1, 1, 1)[:b]
            times = np.zeros((reps, model.num_exits))
            for r in range(reps + 1):
                state = model.start(x)
                for k in range(model.num_exits):
                    t0 = time.perf_counter()
                    _, state = model.advance(state)
                    if r:
                        times[r - 1, k] = time.perf_counter() - t0
            med = np.median(times, axis=0)
            full_s = _median_time(lambda x=x: model(x), reps)
            out["batches"][b] = {"block_s": med.tolist(),
                                 "block_macs_per_s": [block[k] * b / med[k] for k in range(len(block))],
                                 "staged_total_s": float(med.sum()),
                                 "staged_macs_per_s": lazy[-1] * b / float(med.sum()),
                                 "torch_full_s": full_s, "torch_full_macs_per_s": full_flops * b / full_s,
                                 "x": x}
        n = plan.peak_n
        a, bm = torch.randn(n, n), torch.randn(n, n)
        mm_s = _median_time(lambda: torch.mm(a, bm), max(5, plan.eff_repeats_b64 // 3))
        out["peak"] = {"n": n, "seconds": mm_s, "macs_per_s": n ** 3 / mm_s}
    out["onnx"] = onnx_bench(model, out["batches"], threads, plan, full_flops)
    for v in out["batches"].values():
        v.pop("x")
    return out


def onnx_bench(model, batches: dict, threads: int, plan: Plan, full_flops: int) -> dict:
    try:
        import onnxruntime as ort
        import torch
    except ImportError as exc:
        return {"error": f"onnxruntime not installed ({exc}); pip install onnx onnxruntime"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "msdnet.onnx")
        x1 = batches[1]["x"].clone()  # a normal tensor: the timed ones were made in inference mode
        names = [f"exit{k + 1}" for k in range(model.num_exits)]
        exporter = "torch.onnx.export (TorchScript exporter, opset 17)"
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x1,), path, dynamo=False, opset_version=17, input_names=["x"],
                                  output_names=names, dynamic_axes={"x": {0: "n"}, **{k: {0: "n"} for k in names}})
        except Exception as first:
            exporter = "torch.onnx.export (dynamo exporter)"
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    torch.onnx.export(model, (x1,), path, dynamo=True, input_names=["x"], output_names=names,
                                      dynamic_shapes={"x": {0: torch.export.Dim("n", min=1, max=4096)}})
            except Exception as second:
                return {"error": f"ONNX export failed: {first!r}; {second!r}"}
            log(f"  TorchScript ONNX exporter failed ({first!r}); used the dynamo exporter")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        res = {"exporter": exporter, "batches": {}}
        for b, reps in ((1, plan.eff_repeats_b1), (64, plan.eff_repeats_b64)):
            x = batches[b]["x"]
            xn = x.numpy()
            outs = sess.run(None, {"x": xn})
            with torch.inference_mode():
                ref = [o.numpy() for o in model(x)]
            diff = max(float(np.abs(o - r).max()) for o, r in zip(outs, ref))
            s = _median_time(lambda xn=xn: sess.run(None, {"x": xn}), reps)
            res["batches"][b] = {"seconds": s, "macs_per_s": full_flops * b / s, "max_abs_diff": diff}
        return res


# ---------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(a: dict, slo_ms: float, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for res in a["servers"].values():
        tr = sorted(res["search"]["trials"], key=lambda s: s["rate"])
        p99 = [min(s["p99_ms"], 1e5) for s in tr]
        ax.plot([s["rate"] for s in tr], p99, "o-", label=f"{res['label']} (capacity {res['capacity_rps']:g}/s)")
    ax.axhline(slo_ms, color="k", ls="--", lw=1, label=f"SLO p99 = {slo_ms:g} ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    rates = [s["rate"] for res in a["servers"].values() for s in res["search"]["trials"]]
    if rates:
        ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
                 if min(rates) / 1.5 <= t <= max(rates) * 1.5]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel("arrival rate (requests/s, Poisson, open loop)")
    ax.set_ylabel("p99 latency from scheduled send (ms)")
    ax.set_title("Throughput at the SLO (failed requests count as infinitely slow)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_controller(b: dict, path: Path) -> None:
    plt = _plt()
    s = b["series"]
    f, tgt, ph = np.array(s["flops"]) / 1e6, np.array(s["target"]) / 1e6, np.array(s["phase"])
    w = b["window"]
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    x = np.arange(len(f))
    ax.scatter(x, f, s=1, alpha=0.15, color="tab:gray", label="per request (the exit's cumulative cost)")
    if len(f) >= w:
        roll = np.convolve(f, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w - 1, len(f)), roll, color="tab:blue", lw=1.5, label=f"mean of the last {w} requests")
    ax.step(x, tgt, where="post", color="tab:red", lw=1.2, label="target")
    top = f.max() if len(f) else 1.0
    for k, row in enumerate(b["phases"]):
        idx = np.nonzero(ph == k)[0]
        if len(idx):
            ax.axvline(idx[0], color="k", lw=0.5, ls=":")
            ax.text(idx[0] + 5, top * 0.98, f"{row['mix']}\n@{row['target'] / 1e6:.2f}M", fontsize=7, va="top")
    ax.set_xlabel("request (completion order)")
    ax.set_ylabel("MFLOPs per request (multiply-accumulates)")
    ax.set_title("Budget controller: realised vs target FLOPs; traffic mix switch and PUT /budget", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_deadlines(rows: list[dict], num_exits: int, path: Path) -> None:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 3.8), dpi=110)
    loads = [f"{r['load']:.0%}" for r in rows]
    ax1.bar(loads, [100 * (r["met"] or 0) for r in rows], color="tab:green")
    ax1.axhline(100 * TARGET_DEADLINE_SHARE, color="k", ls="--", lw=1, label="target 99.9%")
    lo = min([100 * (r["met"] or 0) for r in rows] + [99.0])
    ax1.set_ylim(max(0, lo - 2), 100.2)
    ax1.set_ylabel("deadlines met (%)")
    ax1.set_xlabel("load (share of capacity)")
    ax1.legend(fontsize=7)
    bottom = np.zeros(len(rows))
    for k in range(0, num_exits + 1):
        share = []
        for r in rows:
            n = r["requests"] or 1
            share.append(100 * (r["statuses"].get("504", 0) if k == 0 else r["exits"].get(str(k), 0)) / n)
        ax2.bar(loads, share, bottom=bottom, label="504 (nothing computed)" if k == 0 else f"exit {k}")
        bottom += np.array(share)
    ax2.set_ylabel("requests (%)")
    ax2.set_xlabel("load (share of capacity)")
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Deadlines: met share and exits taken", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_efficiency(d: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=110)
    k = len(d["block_flops"])
    width = 0.38
    for j, b in enumerate((1, 64)):
        v = np.array(d["batches"][b]["block_macs_per_s"]) / 1e9
        ax.bar(np.arange(k) + (j - 0.5) * width, v, width, label=f"staged block, batch {b}")
    ax.axhline(d["peak"]["macs_per_s"] / 1e9, color="k", ls="--", lw=1,
               label=f"float32 matmul {d['peak']['n']}² (practical peak)")
    for b, ls in ((1, ":"), (64, "-.")):
        ax.axhline(d["batches"][b]["torch_full_macs_per_s"] / 1e9, color="tab:purple", ls=ls, lw=1,
                   label=f"torch full forward, batch {b}")
        if "batches" in d["onnx"]:
            ax.axhline(d["onnx"]["batches"][b]["macs_per_s"] / 1e9, color="tab:olive", ls=ls, lw=1,
                       label=f"ONNX Runtime full forward, batch {b}")
    ax.set_xticks(np.arange(k), [f"block {i + 1}" for i in range(k)])
    ax.set_ylabel("GMAC/s (multiply-accumulates per second)")
    ax.set_yscale("log")
    ax.set_title(f"Compute efficiency, {d['threads']} thread(s)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, axis="y", which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------- report
def _f(v, fmt="{:.1f}", none="–"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return fmt.format(v)


def _pct(v, fmt="{:.2f}") -> str:
    """A fraction as a percentage (without the % sign); '–' for None."""
    return _f(None if v is None else 100 * v, fmt)


def _cpu_cells(r: dict) -> str:
    """CPU per request and cores busy in the search trial at the capacity rate."""
    t = next((s for s in r["search"]["trials"] if s["rate"] == r["capacity_rps"] and s["passed"]), None)
    if t is None or t.get("server_cpu_ms") is None:
        return "– | –"
    srv, cli, rate = t["server_cpu_ms"], t["client_cpu_ms"], t["rate"]
    return f"{srv:.2f} / {cli:.2f} | {srv * rate / 1e3:.2f} + {cli * rate / 1e3:.2f}"


def _server_met(row: dict) -> str:
    """Share met by the server's own clock (its ``latency_ms``, from the handler's start), 504 = miss."""
    v = row.get("server_met")
    if v is None and row.get("per_deadline"):  # older JSON: from the per-deadline shares
        per = [d for d in row["per_deadline"].values() if d.get("server_met") is not None and d["n"]]
        v = sum(d["server_met"] * d["n"] for d in per) / sum(d["n"] for d in per) if per else None
    return _f(None if v is None else 100 * v, "{:.2f}%")


def where_time_goes(res: dict) -> str:
    """A two-point fit of server CPU per request against mean FLOPs, from the
    capacity trials of the two msdnet-serve servers."""
    a, d = res["a"], res.get("d")
    pts = []
    for key in ("msdnet", "last_exit"):
        r = a["servers"][key]
        t = next((s for s in r["search"]["trials"] if s["rate"] == r["capacity_rps"] and s["passed"]), None)
        if t is None or t.get("server_cpu_ms") is None or not t.get("mean_flops"):
            return ""
        pts.append((t["mean_flops"] / 1e6, t["server_cpu_ms"], t["server_cpu_ms"] * t["rate"] / 1e3))
    (f1, c1, u1), (f2, c2, u2) = pts
    if abs(f2 - f1) < 1e-9:
        return ""
    slope = (c2 - c1) / (f2 - f1)  # ms per MFLOP
    fixed = c1 - slope * f1
    text = (f"Where the time goes: at capacity each msdnet-serve process keeps about {u1:.2f} and {u2:.2f} CPU cores "
            f"busy (of {res['machine']['logical_cpus']}; the event loop and the model thread share one interpreter), "
            f"so the two saturate alike and the throughput ratio tracks "
            f"the ratio of server CPU per request ({c2:.2f} / {c1:.2f} ms = {c2 / c1:.2f}). A straight line through "
            f"the two points gives ≈ {fixed:.2f} ms per request whatever the FLOPs (HTTP, PNG decoding, scheduling, "
            f"JSON) plus {slope:.3f} ms per MFLOP, i.e. the model part runs at ≈ {1 / slope:.1f} GMAC/s")
    if d:
        b1 = d["batches"][1]["staged_macs_per_s"] / 1e9
        b64 = d["batches"][64]["staged_macs_per_s"] / 1e9
        text += (f", close to the staged forward at batch 1 ({b1:.1f} GMAC/s in part d) rather than at batch 64 "
                 f"({b64:.1f} GMAC/s), which suggests the block steps run on small batches at these arrival rates")
    return text + ". (A two-point estimate, not a profile.)\n"


def _yes(ok) -> str:
    return "**met**" if ok else "**not met**"


def report(res: dict) -> str:
    m, plan, off = res["machine"], res["plan"], res["offline"]
    a, b, c, d = res.get("a"), res.get("b"), res.get("c"), res.get("d")
    mf = 1e6
    L = []
    w = L.append
    w("# Benchmarks")
    w("")
    if res["smoke"]:
        w("> **Smoke run** (`--smoke`): every part tiny, to show the scripts work. The numbers mean nothing.")
        w("")
    w("FLOPs in this report = multiply-accumulates (MACs) of convolutions and linear layers, as the MSDNet "
      "paper counts them, cumulative per exit, at batch size 1; served costs use lazy evaluation. "
      "1 MFLOPs = 10⁶ of them.")
    w("")
    w("| | |")
    w("| --- | --- |")
    w(f"| machine | {m['cpu']}; {m['logical_cpus']} logical CPUs (threads per core {m.get('Thread(s) per core', '?')}, "
      f"cores per socket {m.get('Core(s) per socket', '?')}, sockets {m.get('Socket(s)', '?')}) |")
    w(f"| software | Python {m['python']}, torch {m['torch']}, onnxruntime {m.get('onnxruntime', '–')}; "
      f"{m['platform']} |")
    w(f"| date | {res['started']} to {res['finished']} (UTC), {res['wall_s'] / 60:.1f} min |")
    w(f"| command | `{res['command']}` |")
    w(f"| code | git {m.get('git', '?')} |")
    if res.get("rendered"):
        w(f"| report | {res['rendered']} |")
    w(f"| checkpoint | `{res['checkpoint']}` |")
    w(f"| load average at start | {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])} (1, 5, 15 min) |")
    w(f"| servers | uvicorn, 1 process each, torch threads {res['torch_threads']}; msdnet-serve with its "
      "defaults (max batch 64, block-1 queue delay 2 ms, queue 1,024) except access log off; the load client "
      "runs in the benchmark process on the same CPUs |")
    w("")
    w("Latency is measured by an open-loop client (`loadtest/openloop.py`, aiohttp): Poisson arrivals at a fixed "
      "rate, each request timed from its *scheduled* send time to its answer, so queueing anywhere (server or "
      "client) counts and a slow server cannot hide its tail (no coordinated omission). Requests are real "
      "Fashion-MNIST test images sent as PNG (`POST /classify`, body `image/png`). A failed request (non-200, "
      "timeout) counts as infinitely slow in percentiles.")
    w("")

    # ---- targets
    w("## Targets")
    w("")
    w("| target | result | |")
    w("| --- | --- | --- |")
    if a:
        sp, drop = a.get("speedup_vs_last_exit"), a.get("accuracy_drop_points")
        ok = sp is not None and drop is not None and sp >= TARGET_SPEEDUP and drop <= TARGET_ACC_DROP_POINTS
        w(f"| throughput at p99 ≤ {res['slo_ms']:g} ms ≥ {TARGET_SPEEDUP}× the forced-last-exit server's, at "
          f"accuracy within {TARGET_ACC_DROP_POINTS} points | {_f(sp, '{:.2f}')}×, accuracy "
          f"{_f(None if drop is None else -drop, '{:+.2f}')} points vs the forced last exit (on the "
          f"{a['common']['images']:,} test images both answered) | {_yes(ok)} |")
    if c:
        r80 = next((r for r in c["rows"] if abs(r["load"] - 0.8) < 1e-9), None)
        if r80:
            ok = r80["met"] is not None and r80["met"] >= TARGET_DEADLINE_SHARE
            w(f"| ≥ {TARGET_DEADLINE_SHARE:.1%} of deadlines met at 80% of capacity (504 = miss) | "
              f"{_f(100 * r80['met'] if r80['met'] is not None else None, '{:.2f}')}% of {r80['requests']} | "
              f"{_yes(ok)} |")
    if b:
        e = b["max_abs_error_constant"]
        ok = e is not None and e <= TARGET_FLOPS_ERROR
        w(f"| mean FLOPs within ±{TARGET_FLOPS_ERROR:.0%} of target (every {b['window']}-request window) | "
          f"max \\|error\\| {_f(100 * e if e is not None else None, '{:.2f}')}% | {_yes(ok)} |")
    w("")

    # ---- offline
    w("## The model (offline, test split)")
    w("")
    w(f"Test top-1 on {off['n']:,} images, computed in-process from the checkpoint (reference for the served "
      "numbers below):")
    w("")
    w("| exit | cumulative MFLOPs (lazy) | top-1 |")
    w("| --- | --- | --- |")
    for k, (fl, acc) in enumerate(zip(off["exit_flops"], off["exit_top1"]), start=1):
        w(f"| {k} | {fl / mf:.2f} | {100 * acc:.2f}% |")
    cal = off["calibrated"]
    w(f"| calibrated thresholds | mean {cal['mean_flops'] / mf:.2f} (validation target {cal['target_flops'] / mf:.2f}) "
      f"| {100 * cal['top1']:.2f}% |")
    w("")
    w(f"Calibration rule: {cal['rule']}. Per-class exit-1 accuracy picks the traffic of part b: easy = "
      f"{', '.join(res['easy_names'])}; hard = {', '.join(res['hard_names'])}.")
    w("")
    w("| class | " + " | ".join(r["name"] for r in off["per_class"]) + " |")
    w("| --- |" + " --- |" * len(off["per_class"]))
    w("| exit-1 top-1 | " + " | ".join(f"{100 * r['exit1_top1']:.1f}%" for r in off["per_class"]) + " |")
    w("")

    # ---- a
    if a:
        w(f"## a. Throughput at an SLO (p99 ≤ {res['slo_ms']:g} ms)")
        w("")
        w(f"Search: start at {plan['search_start']:g} requests/s, double until p99 > {res['slo_ms']:g} ms (or a "
          f"request fails), then bisect geometrically ({plan['bisect_steps']} steps); each rate "
          f"{plan['warmup_s']:g} s warm-up + {plan['trial_s']:g} s scored. Capacity = the highest passing rate. "
          "Accuracy: a second run at that rate sends each test image once, all servers in the same shuffled "
          f"order (as many as fit in {plan['confirm_max_s']:g} s; {plan['confirm_max_s_naive']:g} s for the naive "
          "baseline, whose answers are the last exit's anyway); its p50/p99 (after the warm-up) are a longer check "
          "of the capacity.")
        w("")
        w("| server | capacity (req/s) | p50 / p99 at capacity (ms) | accuracy served (images) | "
          "mean MFLOPs per request | exits (share) | CPU ms per request: server / client | CPU cores busy: "
          "server + client |")
        w("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in a["servers"].values():
            acc = r["accuracy_run"]
            ex = acc["exits"]
            tot = sum(ex.values()) or 1
            exs = ", ".join(f"{k}: {100 * v / tot:.0f}%" for k, v in ex.items())
            ge = "≥ " if r["search"]["hit_search_max"] else ""
            w(f"| {r['label']} | **{ge}{r['capacity_rps']:g}** | {_f(acc['p50_ms'])} / {_f(acc['p99_ms'])} | "
              f"{_f(100 * acc['accuracy'] if acc['accuracy'] is not None else None, '{:.2f}')}% ({acc['images']:,}) | "
              f"{_f(acc['mean_flops'] / mf if acc['mean_flops'] else None, '{:.2f}')} | {exs} | "
              f"{_cpu_cells(r)} |")
        w("")
        slow = [r["label"] for r in a["servers"].values() if r["accuracy_run"]["p99_ms"] > res["slo_ms"]]
        if slow:
            w(f"Over the SLO in the longer accuracy run at the capacity found: {'; '.join(slow)}. The capacity "
              f"from {plan['trial_s']:g}-s trials is optimistic there; p99 at rates near capacity varies from run "
              "to run by tens of ms.")
            w("")
        cm = a["common"]
        w(f"Accuracy on the {cm['images']:,} test images both msdnet-serve servers answered: controller on "
          f"{_pct(cm['msdnet'])}%, forced last exit {_pct(cm['last_exit'])}% (offline, all {off['n']:,}: last exit "
          f"{100 * off['exit_top1'][-1]:.2f}%, calibrated thresholds {100 * cal['top1']:.2f}%).")
        w("")
        w(f"Ratios: msdnet-serve / forced last exit = **{_f(a.get('speedup_vs_last_exit'), '{:.2f}')}×**; "
          f"msdnet-serve / naive = **{_f(a.get('speedup_vs_naive'), '{:.2f}')}×**; forced last exit / naive = "
          f"{_f(a.get('last_exit_vs_naive'), '{:.2f}')}×. Accuracy of msdnet-serve minus forced last exit: "
          f"{_f(-a['accuracy_drop_points'] if a.get('accuracy_drop_points') is not None else None, '{:+.2f}')} "
          f"points (target: no worse than −{TARGET_ACC_DROP_POINTS}). Target: ≥ {TARGET_SPEEDUP}× at that "
          f"accuracy: {_yes(a.get('target_met'))}.")
        w("")
        for r in a["servers"].values():
            w(f"- {r['label']}: {r['how']}")
        w("")
        w(where_time_goes(res))
        if any(r["search"]["hit_search_max"] for r in a["servers"].values()):
            w(f"≥: the search stopped at its highest rate ({plan['search_max']:g} requests/s) without failing.")
            w("")
        w(f"![throughput]({PNGS['throughput']})")
        w("")
        w("<details><summary>Every rate tried</summary>")
        w("")
        w("| server | rate (req/s) | requests | ok | p50 (ms) | p99 (ms) | p99.9 (ms) | client send lag p99 (ms) | "
          "CPU ms per request: server / client | mean MFLOPs | SLO |")
        w("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in a["servers"].values():
            for s in r["search"]["trials"]:
                w(f"| {r['label']} | {s['rate']:g} | {s['requests']} | {s['ok']} | {_f(s['p50_ms'])} | "
                  f"{_f(s['p99_ms'])} | {_f(s['p999_ms'])} | {_f(s['send_lag_p99_ms'])} | "
                  f"{_f(s.get('server_cpu_ms'), '{:.2f}')} / {_f(s.get('client_cpu_ms'), '{:.2f}')} | "
                  f"{_f(s['mean_flops'] / mf if s['mean_flops'] else None, '{:.2f}')} | "
                  f"{'pass' if s['passed'] else 'fail'} |")
        w("")
        w("</details>")
        w("")

    # ---- b
    if b:
        w("## b. Controller tracking")
        w("")
        w(f"msdnet-serve (the server of a(i), `MSDNET_BUDGET_TOKEN` set) at {b['rate']:g} requests/s "
          f"({plan['controller_load']:.0%} of its capacity), {plan['controller_phase']:,} requests per phase: easy "
          "classes only, then hard classes only at the calibrated target T0, then `PUT /budget` to T1, then hard "
          "and easy again. Error of a window = its mean FLOPs per request / the mean target of its requests − 1, "
          f"over every window of {b['window']:,} consecutive answers (completion order).")
        w("")
        w("| phase | traffic | target (MFLOPs) | requests | realised mean (MFLOPs) | error | accuracy | exits |")
        w("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in b["phases"]:
            ex = ", ".join(f"{k}: {v}" for k, v in r["exits"].items())
            w(f"| {r['phase']} | {r['mix']} | {r['target'] / mf:.3f} | {r['ok']}/{r['requests']} | "
              f"{_f(r['mean_flops'] / mf if r['mean_flops'] else None, '{:.3f}')} | "
              f"{_f(100 * r['mean_error'] if r['mean_error'] is not None else None, '{:+.2f}')}% | "
              f"{_f(100 * r['accuracy'] if r['accuracy'] is not None else None, '{:.1f}')}% | {ex} |")
        w("")
        w(f"Max |error| of {b['window']:,}-request windows: "
          f"**{_pct(b['max_abs_error_constant'])}%** "
          "over windows under one target (these include the easy→hard and hard→easy switches); "
          f"{_pct(b['max_abs_error_all'])}% over all "
          "windows, including those spanning the PUT; "
          f"{_f(100 * b['max_abs_error_disjoint'] if b.get('max_abs_error_disjoint') is not None else None, '{:.2f}')}"
          f"% over disjoint windows. Target ±{TARGET_FLOPS_ERROR:.0%}: {_yes(b['target_met'])}.")
        if b.get("worst_window_start") is not None:
            ph = b["series"]["phase"]
            i = b["worst_window_start"]
            k = ph[i]
            w("")
            w(f"The worst window under one target starts {i - ph.index(k):,} requests into phase {k + 1} "
              f"({b['phases'][k]['mix']} @ {b['phases'][k]['target'] / mf:.3f} MFLOPs) and ends in phase "
              f"{ph[i + b['window'] - 1] + 1}.")
        w("")
        w(f"![controller]({PNGS['controller']})")
        w("")

    # ---- c
    if c:
        w("## c. Deadlines")
        w("")
        w(f"msdnet-serve (a(i)) at shares of its capacity ({c['capacity']:g} requests/s); every request carries a "
          f"deadline drawn uniformly from {', '.join(f'{x:g}' for x in c['deadlines'])} ms "
          "(`?deadline_ms=`). Met = answered 200 within the deadline measured by the client from the scheduled "
          f"send time; 504 and 503 are misses. {plan['deadline_s']:g} s scored per level. \"By the server's "
          "clock\": the answer's own `latency_ms` (from the handler's start, which is where the server starts the "
          "deadline) within the deadline; the difference is time spent before the handler (socket, event loop, "
          "client).")
        w("")
        per_cols = " | ".join(f"met, {x:g} ms" for x in c["deadlines"])
        w(f"| load | rate (req/s) | requests | **met** | {per_cols} | met by the server's clock | 504 | 503 | "
          "p99 (ms) | exits of answered | mean MFLOPs |")
        w("| --- | --- | --- | --- |" + " --- |" * len(c["deadlines"]) + " --- | --- | --- | --- | --- | --- |")
        for r in c["rows"]:
            per = " | ".join(_f(100 * r["per_deadline"][f"{x:g}"]["met"]
                                if r["per_deadline"][f"{x:g}"]["met"] is not None else None, "{:.2f}%")
                             for x in c["deadlines"])
            tot = sum(r["exits"].values()) or 1
            ex = ", ".join(f"{k}: {100 * v / tot:.0f}%" for k, v in r["exits"].items())
            w(f"| {r['load']:.0%} | {r['rate']:.1f} | {r['requests']} | "
              f"**{_f(100 * r['met'] if r['met'] is not None else None, '{:.2f}')}%** | {per} | "
              f"{_server_met(r)} | "
              f"{r['statuses'].get('504', 0)} | {r['statuses'].get('503', 0)} | {_f(r['p99_ms'])} | {ex} | "
              f"{_f(r['mean_flops'] / mf if r['mean_flops'] else None, '{:.2f}')} |")
        w("")
        w(f"Target: ≥ {TARGET_DEADLINE_SHARE:.1%} met at 80% of capacity: {_yes(c.get('target_met'))}.")
        w("")
        w(f"![deadlines]({PNGS['deadlines']})")
        w("")

    # ---- d
    if d:
        w("## d. Compute efficiency")
        w("")
        w(f"In-process, {d['threads']} torch thread(s) (as the servers), real test images. Staged forward "
          "(`model.start`/`model.advance`, lazy evaluation, classifier included) timed per block, median of "
          f"{plan['eff_repeats_b1']} (batch 1) and {plan['eff_repeats_b64']} (batch 64) passes; MACs per block "
          "from the checkpoint's `costs` (`flops_lazy` differences). Practical peak: a float32 "
          f"{d['peak']['n']}×{d['peak']['n']} matrix multiply, {d['peak']['n']}³ MACs.")
        w("")
        w("| block | MFLOPs (MACs) | batch 1: ms | GMAC/s | % of peak | batch 64: ms | GMAC/s | % of peak |")
        w("| --- | --- | --- | --- | --- | --- | --- | --- |")
        pk = d["peak"]["macs_per_s"]
        b1, b64 = d["batches"][1], d["batches"][64]
        for k, fl in enumerate(d["block_flops"]):
            w(f"| {k + 1} | {fl / mf:.2f} | {1e3 * b1['block_s'][k]:.3f} | {b1['block_macs_per_s'][k] / 1e9:.2f} | "
              f"{100 * b1['block_macs_per_s'][k] / pk:.1f}% | {1e3 * b64['block_s'][k]:.2f} | "
              f"{b64['block_macs_per_s'][k] / 1e9:.2f} | {100 * b64['block_macs_per_s'][k] / pk:.1f}% |")
        w(f"| all (staged) | {d['exit_flops'][-1] / mf:.2f} | {1e3 * b1['staged_total_s']:.3f} | "
          f"{b1['staged_macs_per_s'] / 1e9:.2f} | {100 * b1['staged_macs_per_s'] / pk:.1f}% | "
          f"{1e3 * b64['staged_total_s']:.2f} | {b64['staged_macs_per_s'] / 1e9:.2f} | "
          f"{100 * b64['staged_macs_per_s'] / pk:.1f}% |")
        w("")
        w(f"Practical peak (matmul): **{pk / 1e9:.1f} GMAC/s** ({1e3 * d['peak']['seconds']:.1f} ms).")
        w("")
        w(f"Full all-exits forward ({d['full_flops'] / mf:.2f} MFLOPs per image), torch vs ONNX Runtime "
          f"({d['onnx'].get('exporter', '')}; CPU provider, {d['threads']} intra-op thread(s), all graph "
          "optimisations):")
        w("")
        w("| batch | torch ms | torch GMAC/s | ONNX Runtime ms | ONNX Runtime GMAC/s | ORT / torch | "
          "max abs diff of logits |")
        w("| --- | --- | --- | --- | --- | --- | --- |")
        for bb in (1, 64):
            tb = d["batches"][bb]
            ob = d["onnx"].get("batches", {}).get(bb)
            if ob:
                w(f"| {bb} | {1e3 * tb['torch_full_s']:.3f} | {tb['torch_full_macs_per_s'] / 1e9:.2f} | "
                  f"{1e3 * ob['seconds']:.3f} | {ob['macs_per_s'] / 1e9:.2f} | "
                  f"{ob['macs_per_s'] / tb['torch_full_macs_per_s']:.2f}× | {ob['max_abs_diff']:.1e} |")
            else:
                w(f"| {bb} | {1e3 * tb['torch_full_s']:.3f} | {tb['torch_full_macs_per_s'] / 1e9:.2f} | "
                  "– | – | – | – |")
        if "error" in d["onnx"]:
            w("")
            w(f"ONNX: {d['onnx']['error']}")
        w("")
        w(f"![efficiency]({PNGS['efficiency']})")
        w("")
    w("## Reproduce")
    w("")
    w("```sh")
    w("pip install -e '.[test]'           # locust, onnx, onnxruntime, aiohttp (via tritonclient[http])")
    w(f"{res['command']}   # this report")
    w("python -m loadtest.bench --out /tmp/bench-smoke --smoke   # every part tiny, seconds each")
    w("locust -f loadtest/locustfile.py --headless -u 20 -r 5 -t 30s --host http://127.0.0.1:8000 \\")
    w("    --csv /tmp/msdnet-locust --only-summary            # mixed traffic against a running server")
    w("python -m loadtest.openloop --url http://127.0.0.1:8000 --rate 200 --duration 10 --deadline-ms 50 100")
    w("```")
    w("")
    return "\n".join(L)


# ---------------------------------------------------------------------------- main
def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and (math.isinf(o) or math.isnan(o)):
        return str(o)
    if isinstance(o, np.generic):
        return o.item()
    return o


def _restore(o):
    """Undo :func:`_jsonable` (non-finite floats as strings)."""
    if isinstance(o, dict):
        return {k: _restore(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_restore(v) for v in o]
    if o in ("inf", "-inf", "nan"):
        return float(o)
    return o


def write_outputs(res: dict, out: Path) -> None:
    num_exits = len(res["offline"]["exit_flops"])
    if "a" in res:
        plot_throughput(res["a"], res["slo_ms"], out / PNGS["throughput"])
    if "b" in res:
        plot_controller(res["b"], out / PNGS["controller"])
    if "c" in res:
        plot_deadlines(res["c"]["rows"], num_exits, out / PNGS["deadlines"])
    if "d" in res:
        plot_efficiency(res["d"], out / PNGS["efficiency"])
    (out / "BENCHMARKS.md").write_text(report(res))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m loadtest.bench", description="Benchmark report: "
                                "docs/BENCHMARKS.md and PNG plots (see the module docstring).")
    p.add_argument("--out", required=True, help="folder for BENCHMARKS.md and the PNGs")
    p.add_argument("--smoke", action="store_true", help="every part tiny (seconds), to show the scripts work")
    p.add_argument("--checkpoint", help="checkpoint to serve (default: the shipped model)")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: /usr/share/datasets/fashion-mnist)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads of every server and of part d")
    p.add_argument("--slo-ms", type=float, default=100.0, help="p99 latency SLO of part a")
    p.add_argument("--deadlines-ms", default="25,50,100", help="deadlines drawn from in part c (comma-separated)")
    p.add_argument("--parts", default="abcd", help="which parts to run (b and c need a)")
    p.add_argument("--json", help="also write every measurement as JSON here")
    p.add_argument("--render", metavar="JSON", help="measure nothing: rewrite the report and plots from a --json "
                   "file of an earlier run")
    args = p.parse_args(argv)
    if args.render:
        res = _restore(json.loads(Path(args.render).read_text()))
        if "d" in res:  # batch sizes are int keys in part d
            res["d"]["batches"] = {int(k): v for k, v in res["d"]["batches"].items()}
            if "batches" in res["d"]["onnx"]:
                res["d"]["onnx"]["batches"] = {int(k): v for k, v in res["d"]["onnx"]["batches"].items()}
        res["rendered"] = f"re-rendered from that run's measurements (`--render`) on " \
                          f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M')} UTC"
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_outputs(res, out)
        log(f"wrote {out / 'BENCHMARKS.md'} from {args.render}")
        return 0

    import torch

    from model.checkpoint import DEFAULT_CHECKPOINT
    from model.checkpoint import load as load_checkpoint

    started = time.time()
    plan = SMOKE if args.smoke else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.checkpoint or DEFAULT_CHECKPOINT)
    ck = load_checkpoint(checkpoint)
    if ck.calibration is None:
        raise SystemExit(f"{checkpoint} is not calibrated: run 'msdnet calibrate --checkpoint {checkpoint}'")
    deadlines = tuple(float(x) for x in args.deadlines_ms.split(","))
    parts = set(args.parts)
    res: dict = {"smoke": args.smoke, "plan": asdict(plan), "machine": machine_info(),
                 "command": "python -m loadtest.bench " + " ".join(shlex.quote(a) for a in argv),
                 "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"), "checkpoint": str(checkpoint),
                 "torch_threads": args.torch_threads, "slo_ms": args.slo_ms}
    log(f"machine: {res['machine']['cpu']}, {res['machine']['logical_cpus']} CPUs; plan: "
        f"{'smoke' if args.smoke else 'full'}")

    test = load_test_set(args.data_dir)
    if plan.images is not None:
        test = test.subset(torch.arange(min(plan.images, len(test))))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    log(f"offline evaluation on {len(test)} test images")
    off = offline_eval(ck, test)
    res["offline"] = off
    easy, hard = easy_hard(off["per_class"])
    res["easy_names"] = [ck.classes[c] for c in easy]
    res["hard_names"] = [ck.classes[c] for c in hard]
    samples = to_samples(test, seed=0)
    flops = ck.exit_flops(lazy=True)
    cal_target = float(ck.calibration["target_flops"])
    torch.set_num_threads(args.torch_threads)

    msd_env = {"MSDNET_WARMUP_ROUNDS": str(plan.warmup_rounds)}
    token = secrets.token_hex(16)
    if "a" in parts:
        a = {"servers": {}}
        configs = [
            ("msdnet", "msdnet-serve, controller on, calibrated target",
             lambda: ServerProcess.msdnet(checkpoint, args.torch_threads, {**msd_env, "MSDNET_BUDGET_TOKEN": token}),
             f"`msdnet serve`, target = the checkpoint's calibrated {cal_target / 1e6:.2f} MFLOPs per request, "
             "budget controller on."),
            ("last_exit", "msdnet-serve, forced to the last exit",
             lambda: ServerProcess.msdnet(checkpoint, args.torch_threads,
                                          {**msd_env, "MSDNET_TARGET_FLOPS": str(flops[-1])}),
             f"`msdnet serve` with `MSDNET_TARGET_FLOPS={flops[-1]}` (the last exit's cost): the controller's "
             "command is clipped to the all-last-exit operating point (thresholds ∞…∞, 0), so every image runs all "
             "blocks, still with block-level batching."),
            ("naive", "naive FastAPI, whole network per request",
             lambda: ServerProcess.naive(checkpoint, args.torch_threads),
             "`python -m loadtest.naive_server`: one handler per request decodes the image "
             "(`server.images.decode`) and runs `model(x)[-1]` at batch 1 in Starlette's thread pool; no batching, "
             "no early exit."),
        ]
        for key, label, make, how in configs:
            log(f"part a: {label}")
            with make() as srv:
                search = find_capacity(srv, samples, plan, args.slo_ms, key)
                cap = search["capacity_rps"]
                acc = accuracy_run(srv.url, samples, cap if cap > 0 else plan.min_rate, plan,
                                   plan.confirm_max_s_naive if key == "naive" else plan.confirm_max_s)
                log(f"  capacity {cap} req/s; accuracy {acc['accuracy']} on {acc['images']} images; "
                    f"p99 {acc['p99_ms']:.1f} ms")
                a["servers"][key] = {"label": label, "how": how, "capacity_rps": cap, "search": search,
                                     "accuracy_run": acc}
                if key == "msdnet":
                    if "c" in parts:
                        log("part c: deadlines")
                        rows = deadline_runs(srv.url, samples, max(cap, plan.min_rate), deadlines, plan)
                        r80 = next((r for r in rows if abs(r["load"] - 0.8) < 1e-9), None)
                        res["c"] = {"capacity": cap, "deadlines": list(deadlines), "rows": rows,
                                    "target_met": bool(r80 and r80["met"] is not None
                                                       and r80["met"] >= TARGET_DEADLINE_SHARE)}
                    if "b" in parts:
                        log("part b: controller tracking")
                        t0 = cal_target
                        t1 = 0.75 * t0 if 0.75 * t0 >= 1.1 * flops[0] else 0.5 * (t0 + flops[-1])
                        rate = max(plan.controller_load * cap, plan.min_rate)
                        easy_s = to_samples(test, easy, seed=1)
                        hard_s = to_samples(test, hard, seed=2)
                        b = controller_tracking(srv.url, token, easy_s, hard_s, (t0, t1), rate, plan)
                        b["target_met"] = (b["max_abs_error_constant"] is not None
                                           and b["max_abs_error_constant"] <= TARGET_FLOPS_ERROR)
                        res["b"] = b
        s = a["servers"]
        cap_m, cap_l, cap_n = (s[k]["capacity_rps"] for k in ("msdnet", "last_exit", "naive"))
        # Accuracy compared on the images both servers answered (same order, so a common prefix).
        cm, cl = s["msdnet"]["accuracy_run"]["correct"], s["last_exit"]["accuracy_run"]["correct"]
        both = [(x, y) for x, y in zip(cm, cl) if x is not None and y is not None]
        acc_m = sum(x for x, _ in both) / len(both) if both else None
        acc_l = sum(y for _, y in both) / len(both) if both else None
        a["common"] = {"images": len(both), "msdnet": acc_m, "last_exit": acc_l}
        a["speedup_vs_last_exit"] = cap_m / cap_l if cap_l else None
        a["speedup_vs_naive"] = cap_m / cap_n if cap_n else None
        a["last_exit_vs_naive"] = cap_l / cap_n if cap_n else None
        a["accuracy_drop_points"] = 100 * (acc_l - acc_m) if acc_m is not None and acc_l is not None else None
        a["target_met"] = bool(a["speedup_vs_last_exit"] is not None and a["accuracy_drop_points"] is not None
                               and a["speedup_vs_last_exit"] >= TARGET_SPEEDUP
                               and a["accuracy_drop_points"] <= TARGET_ACC_DROP_POINTS)
        res["a"] = a
    if "d" in parts:
        log("part d: compute efficiency")
        res["d"] = efficiency(ck, test, args.torch_threads, plan)

    res["finished"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
    res["wall_s"] = time.time() - started
    write_outputs(res, out)
    if args.json:
        slim = dict(res)
        if "b" in slim:
            slim["b"] = {k: v for k, v in slim["b"].items() if k not in ("window_errors",)}
        Path(args.json).write_text(json.dumps(_jsonable(slim), indent=1))
    log(f"wrote {out / 'BENCHMARKS.md'} in {res['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
