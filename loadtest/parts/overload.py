"""Issue 25's benchmark part: the latency objective under step, burst and steady overload.

    python3 -m loadtest.overload --size fashion --out docs            # the shipped 28x28 model
    python3 -m loadtest.overload --size cifar100-7 --out docs         # speed-only real sizes
    python3 -m loadtest.overload --size imagenet-5 --out docs

For one network, in one run, open-loop (``loadtest.openloop``; latency from each
request's scheduled send time), with msdnet-serve at its defaults plus
``MSDNET_LATENCY_SLO_MS``:

1. capacities at p99 <= the objective: at the configured target with no objective
   (C), and forced to exit 1 (C1, the physical limit of degrading);
2. a step trace 0.5C -> 1.5C -> 3C -> 0.5C (``--phase-s`` each) and an on/off burst
   trace (3C for 2 s, 0.5C for 4 s); per second: p50/p99, the share answered within
   the objective, the target in force (polled from ``GET /budget``), mean exit,
   refusals (503) and their latency;
3. steady rates from 0.5C to 1.25 x C1: the share within the objective, refused,
   and how fast refusals come back;
4. effective accuracy (correct answers within the objective / requests sent) at
   1.5C and 3C against LitServe and Ray Serve at the same absolute rates (whole
   network, their own queueing); labelled only for the shipped model (the real
   sizes have random weights: exits and FLOPs only).

Writes ``overload-NAME.json`` and ``overload-NAME.png``. FLOPs are multiply-
accumulates of convs and linears (MSDNet paper convention), per request,
cumulative to the exit taken. Loopback only; every run bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import openloop as ol
from .. import servers
from ..common import FULL, SMOKE
from . import capacity as cap

SIZES = {"fashion": None, "cifar100-7": "cifar100-7", "imagenet-5": "imagenet-5"}


def log(msg: str) -> None:
    print(f"[overload {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class BudgetPoller:
    """Polls ``GET /budget`` every ``interval_s`` on a thread: (Unix time, target in
    force in FLOPs, state, forecast wait in ms)."""

    def __init__(self, url: str, interval_s: float = 0.25):
        import httpx

        self.url, self.interval_s, self.samples = url, interval_s, []
        self._client = httpx.Client(timeout=2.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                b = self._client.get(self.url + "/budget").json()
                o = b.get("objective") or {}
                self.samples.append((time.time(), b["in_force_flops"], o.get("state", "off"),
                                     o.get("wait_ms")))
            except Exception:  # noqa: BLE001 - a missed poll (the server is busy) is a gap, not a failure
                pass
            self._stop.wait(self.interval_s)

    def __enter__(self) -> BudgetPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self._client.close()


def per_second(records: list[ol.Record], polls: list[tuple], objective_ms: float, seconds: float) -> list[dict]:
    """Per second of the run (by scheduled send time): requests, p50/p99 of the
    answered (ms), share answered within the objective, refused (503) count, mean
    exit and FLOPs, and the mean target in force polled in that second (FLOPs)."""
    rows = []
    for s in range(int(math.ceil(seconds))):
        rs = [r for r in records if s <= r.scheduled_s < s + 1]
        ok = [r for r in rs if r.status == 200]
        lat = [r.latency_s * 1e3 for r in ok]
        force = [p[1] for p in polls if s <= p[0] < s + 1]
        rows.append({"t": s, "requests": len(rs), "p50_ms": ol.percentile(lat, 50) if lat else None,
                     "p99_ms": ol.percentile(lat, 99) if lat else None,
                     "within": sum(r.latency_s * 1e3 <= objective_ms for r in ok) / len(rs) if rs else None,
                     "refused": sum(r.status == 503 for r in rs), "errors": sum(r.status not in (200, 503) for r in rs),
                     "mean_exit": float(np.mean([r.exit for r in ok if r.exit])) if ok else None,
                     "mean_flops": float(np.mean([r.flops for r in ok if r.flops])) if ok else None,
                     "in_force_flops": float(np.mean(force)) if force else None,
                     # The client's own lateness (it shares the cores): above a few ms, its figures blur.
                     "send_lag_p99_ms": ol.percentile([(r.sent_s - r.scheduled_s) * 1e3 for r in rs], 99)
                     if rs else None})
    return rows


def score(records: list[ol.Record], objective_ms: float) -> dict:
    """Whole-run figures: sent, within the objective (share), refused (share and the
    p99 of a refusal's latency, ms), effective accuracy (correct within the
    objective / sent; None without labels), mean exit and FLOPs of the answered."""
    n = len(records) or 1
    ok = [r for r in records if r.status == 200]
    within = [r for r in ok if r.latency_s * 1e3 <= objective_ms]
    refused = [r for r in records if r.status == 503]
    labelled = [r for r in records if r.label is not None]
    return {"sent": len(records), "within_share": len(within) / n, "refused_share": len(refused) / n,
            "other_failures": sum(r.status not in (200, 503) for r in records),
            "refusal_p99_ms": ol.percentile([r.latency_s * 1e3 for r in refused], 99) if refused else None,
            "answered_p99_ms": ol.percentile([r.latency_s * 1e3 for r in ok], 99) if ok else None,
            "effective_accuracy": (sum(bool(r.correct) for r in within) / len(labelled)) if labelled else None,
            "mean_exit": float(np.mean([r.exit for r in ok if r.exit])) if ok and ok[0].exit else None,
            "mean_flops": float(np.mean([r.flops for r in ok if r.flops])) if ok and ok[0].flops else None}


def settle(polls: list[tuple], start: float, end: float) -> dict:
    """The target in force over [start, end) s: min, max and swing (max/min - 1)."""
    vals = [p[1] for p in polls if start <= p[0] < end]
    if not vals:
        return {"min": None, "max": None, "swing": None}
    return {"min": min(vals), "max": max(vals), "swing": max(vals) / min(vals) - 1}


def back_to_target(polls: list[tuple], after: float, target: float) -> float | None:
    """Seconds from ``after`` until the polled target in force is the configured one again."""
    return next((p[0] - after for p in polls if p[0] >= after and p[1] >= target * 0.999), None)


def traced_run(cfg: servers.ServerConfig, make, phases: list[tuple[float, float]], objective_ms: float,
               seed: int = 0, timeout_s: float = 10.0) -> tuple[list[ol.Record], list[tuple], float]:
    """Start ``cfg``, run the ``phases`` open-loop while polling ``/budget``; returns
    (records, polls, seconds). Polls start with the first send (shared clock)."""
    total = sum(s for s, _ in phases)
    times = ol.phased_schedule(phases, max_requests=int(sum(s * r for s, r in phases) * 1.3) + 100, seed=seed)
    with cfg.make() as srv:
        ol.run(srv.url, make, 1.0, 0.5, warmup_s=0.0, timeout_s=timeout_s, times=np.arange(20) * 0.02)  # warm
        with BudgetPoller(srv.url) as poller:
            r = ol.run(srv.url, make, max(r for _, r in phases), total, timeout_s=timeout_s, times=times)
        polls = [(t - r.started_unix, *rest) for t, *rest in poller.samples]
    return r.records, polls, total


def main(argv: list[str] | None = None) -> int:
    from model import DEFAULT_CHECKPOINT
    from model.checkpoint import load

    from .. import realsize
    from ..machine import machine_info
    from ..samples import samples_for

    p = argparse.ArgumentParser(prog="python3 -m loadtest.overload", description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(SIZES), help="fashion (the shipped model) or a speed-only real size")
    p.add_argument("--checkpoint", help="any calibrated checkpoint instead of --size")
    p.add_argument("--out", required=True)
    p.add_argument("--slo-ms", type=float, help="the objective (default: 100 ms, 500 ms at ImageNet size)")
    p.add_argument("--phase-s", type=float, default=30.0, help="seconds per step-trace phase")
    p.add_argument("--capacity", type=float, help="skip the search: C (req/s) at the configured target")
    p.add_argument("--capacity-exit1", type=float, help="skip the search: C1 (req/s) at exit 1")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None,
                   help="effective accuracy against LitServe and Ray Serve (default: on for the labelled model)")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    if a.checkpoint:
        checkpoint, name = a.checkpoint, Path(a.checkpoint).stem
    else:
        size = a.size or "fashion"
        checkpoint = str(realsize.make(size, log=log)) if SIZES[size] else str(DEFAULT_CHECKPOINT)
        name = size
    ck = load(checkpoint)
    exits = [int(f) for f in ck.exit_flops(lazy=True)]
    slo = a.slo_ms or cap.default_slo_ms(checkpoint)
    samples, source = samples_for(checkpoint, limit=60 if a.smoke else 2000)
    make = ol.classify_requests(samples)
    phase = 3.0 if a.smoke else a.phase_s
    plan = replace(SMOKE if a.smoke else FULL, start=max(5.0, min(400.0, 0.4 * 80e9 / exits[-1])),
                   images=len(samples))
    env = {"MSDNET_LATENCY_SLO_MS": str(slo)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"network": name, "checkpoint": checkpoint, "images": source, "objective_ms": slo,
                 "exit_flops": exits, "machine": machine_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    # 1. Capacities: configured target with no objective, and exit 1 alone.
    if a.capacity:
        c_target = a.capacity
    else:
        log("capacity at the configured target (no objective)")
        with servers.msdnet(checkpoint, None).make() as srv:
            c_target = cap.find_capacity(srv, make, plan, slo, "target")["capacity_rps"]
    if a.capacity_exit1:
        c_exit1 = a.capacity_exit1
    else:
        log("capacity at exit 1 alone")
        with servers.msdnet(checkpoint, None, target_flops=exits[0]).make() as srv:
            c_exit1 = cap.find_capacity(srv, make, replace(plan, start=c_target), slo, "exit 1")["capacity_rps"]
    res.update(capacity_rps=c_target, capacity_exit1_rps=c_exit1)
    log(f"C = {c_target:.1f} req/s at the target, C1 = {c_exit1:.1f} req/s at exit 1 (p99 <= {slo:g} ms)")
    served = servers.msdnet(checkpoint, None, env=env, tag="slo")
    target = float(ck.calibration.target_flops)
    res["target_flops"] = target

    # 2. Step and burst traces.
    steps = [(phase, 0.5 * c_target), (phase, 1.5 * c_target), (phase, 3 * c_target), (phase, 0.5 * c_target)]
    log(f"step trace: {' -> '.join(f'{r:.0f}' for _, r in steps)} req/s, {phase:g} s each")
    recs, polls, total = traced_run(served, make, steps, slo)
    res["step"] = {"phases": steps, "per_second": per_second(recs, polls, slo, total),
                   "phase_scores": [score([r for r in recs if i * phase <= r.scheduled_s < (i + 1) * phase], slo)
                                    for i in range(len(steps))],
                   "steady_1p5x": settle(polls, 1.5 * phase, 2 * phase),
                   "back_after_s": back_to_target(polls, 3 * phase, target), "polls": polls}
    cycles = 2 if a.smoke else 5
    burst = [(2.0, 3 * c_target), (4.0, 0.5 * c_target)] * cycles
    log(f"burst trace: {cycles} x (2 s at {3 * c_target:.0f}, 4 s at {0.5 * c_target:.0f} req/s)")
    recs, polls, total = traced_run(served, make, burst, slo, seed=7)
    res["burst"] = {"phases": burst, "per_second": per_second(recs, polls, slo, total), "score": score(recs, slo),
                    "back_after_s": [back_to_target(polls, 6.0 * k + 2.0, target) for k in range(cycles)],
                    "polls": polls}

    # 3. Steady rates up to past the physical limit (one server, a pause between rates).
    shares = [0.5, 1.0, 1.5, 2.0, 3.0] if not a.smoke else [1.0, 3.0]
    rates = sorted({round(c_target * s, 1) for s in shares if c_target * s < c_exit1}
                   | {round(c_exit1 * 0.9, 1), round(c_exit1 * 1.25, 1)})
    sweep = []
    seconds = 4.0 if a.smoke else 12.0
    with served.make() as srv:
        for rate in rates:
            r = ol.run(srv.url, make, rate, seconds, warmup_s=2.0, timeout_s=10.0, seed=int(rate))
            s = {"rate": rate, **score(r.scored(), slo)}
            sweep.append(s)
            log(f"  {rate:7.1f} req/s: within {s['within_share']:.2%}, refused {s['refused_share']:.2%}, "
                f"refusal p99 {s['refusal_p99_ms']} ms, mean FLOPs {s['mean_flops']}")
            time.sleep(2.0)
    res["sweep"] = sweep

    # 4. Effective accuracy against the peers at 1.5C and 3C.
    peers = a.peers if a.peers is not None else samples[0].label is not None
    if peers:
        runs = {"msdnet-serve (objective)": served, "LitServe": servers.litserve(checkpoint, 1, 1, 1),
                "Ray Serve": servers.ray(checkpoint, 1, 1)}
        eff = {}
        for key, cfg in runs.items():
            if not cfg.installed():
                continue
            with cfg.make() as srv:
                for mult in (1.5, 3.0):
                    r = ol.run(srv.url, make, mult * c_target, seconds, warmup_s=2.0, timeout_s=10.0, seed=3)
                    eff[f"{key} @ {mult}x"] = score(r.scored(), slo)
                    log(f"  {key} at {mult}x: {eff[f'{key} @ {mult}x']}")
                    time.sleep(2.0)
        res["effective"] = eff

    import os

    res["loadavg_at_end"] = os.getloadavg()  # other work on the machine blurs these figures
    path = out / f"overload-{name}.json"
    path.write_text(json.dumps(res, indent=1, default=float))
    plot(res, out / f"overload-{name}.png")
    log(f"wrote {path}")
    return 0


def plot(res: dict, path: Path) -> None:
    """Target in force, p99 and refusals per second through the step and burst traces."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(12, 8), sharex="col")
    for col, part in enumerate(("step", "burst")):
        rows = res[part]["per_second"]
        t = [r["t"] for r in rows]
        polls = res[part]["polls"]
        axes[0][col].plot([p[0] for p in polls], [p[1] / 1e6 for p in polls], lw=1)
        axes[0][col].axhline(res["target_flops"] / 1e6, ls="--", c="grey", lw=0.8)
        axes[0][col].axhline(res["exit_flops"][0] / 1e6, ls=":", c="grey", lw=0.8)
        axes[0][col].set_ylabel("target in force\n(MFLOPs per request)")
        axes[1][col].plot(t, [r["p99_ms"] or np.nan for r in rows], label="p99")
        axes[1][col].plot(t, [r["p50_ms"] or np.nan for r in rows], label="p50")
        axes[1][col].axhline(res["objective_ms"], ls="--", c="red", lw=0.8)
        axes[1][col].set_yscale("log")
        axes[1][col].set_ylabel("latency (ms)")
        axes[1][col].legend(fontsize=7)
        axes[2][col].bar(t, [r["requests"] for r in rows], color="lightgrey", label="sent")
        axes[2][col].bar(t, [r["refused"] for r in rows], color="tab:red", label="refused (503)")
        axes[2][col].set_ylabel("requests per second")
        axes[2][col].set_xlabel("seconds")
        axes[2][col].legend(fontsize=7)
        axes[0][col].set_title(f"{res['network']}: {part} trace, objective {res['objective_ms']:g} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
