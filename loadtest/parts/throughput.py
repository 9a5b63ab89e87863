"""Part a: throughput at a p99 SLO (open loop, latency from the scheduled send
time) and served accuracy, for msdnet-serve with the budget controller on, the
same server forced to the last exit, and the naive baseline."""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from pathlib import Path

from .. import openloop as ol
from ..common import TARGET_ACC_DROP_POINTS, TARGET_SPEEDUP, Plan, fmt, log
from ..servers import ServerProcess


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def server_configs(checkpoint: Path, threads: int, msd_env: dict, token: str, flops: list[int],
                   cal_target: float) -> list[tuple[str, str, Callable[[], ServerProcess], str]]:
    """The three servers of part a as ``(key, label, make, how)``; ``make()`` gives an
    unstarted :class:`ServerProcess`. ``flops``: cumulative MACs per exit (lazy);
    ``cal_target``: the checkpoint's calibrated target, MACs per request."""
    return [
        ("msdnet", "msdnet-serve, controller on, calibrated target",
         lambda: ServerProcess.msdnet(checkpoint, threads, {**msd_env, "MSDNET_BUDGET_TOKEN": token}),
         f"`msdnet serve`, target = the checkpoint's calibrated {cal_target / 1e6:.2f} MFLOPs per request, "
         "budget controller on."),
        ("last_exit", "msdnet-serve, forced to the last exit",
         lambda: ServerProcess.msdnet(checkpoint, threads, {**msd_env, "MSDNET_TARGET_FLOPS": str(flops[-1])}),
         f"`msdnet serve` with `MSDNET_TARGET_FLOPS={flops[-1]}` (the last exit's cost): the controller's "
         "command is clipped to the all-last-exit operating point (thresholds ∞…∞, 0), so every image runs all "
         "blocks, still with block-level batching."),
        ("naive", "naive FastAPI, whole network per request",
         lambda: ServerProcess.naive(checkpoint, threads),
         "`python -m loadtest.naive_server`: one handler per request decodes the image "
         "(`server.images.decode`) and runs `model(x)[-1]` at batch 1 in Starlette's thread pool; no batching, "
         "no early exit."),
    ]


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
            f"server {fmt(s['server_cpu_ms'], '{:.2f}')} client {s['client_cpu_ms']:.2f}  "
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


def measure(srv: ServerProcess, key: str, label: str, how: str, samples, plan: Plan, slo_ms: float) -> dict:
    """Capacity search, then the accuracy run at the capacity found, on a started server."""
    search = find_capacity(srv, samples, plan, slo_ms, key)
    cap = search["capacity_rps"]
    acc = accuracy_run(srv.url, samples, cap if cap > 0 else plan.min_rate, plan,
                       plan.confirm_max_s_naive if key == "naive" else plan.confirm_max_s)
    log(f"  capacity {cap} req/s; accuracy {acc['accuracy']} on {acc['images']} images; "
        f"p99 {acc['p99_ms']:.1f} ms")
    return {"label": label, "how": how, "capacity_rps": cap, "search": search, "accuracy_run": acc}


def compare(a: dict) -> dict:
    """Add to part a's ``{"servers": ...}`` the capacity ratios, the accuracy of the
    two msdnet-serve servers on the images both answered, and whether the target
    (speed-up and accuracy drop) is met. Returns ``a``."""
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
    return a
