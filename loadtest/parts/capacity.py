"""Capacity of msdnet-serve against serving peers: ``python3 -m loadtest.capacity --out DIR [--smoke]``.

Part a of ``python -m loadtest.bench``, and a tool of its own. For each server
configuration (LitServe and Ray Serve running the checkpoint's whole network,
``loadtest/peers/``; msdnet-serve with its budget controller on, and forced to
the last exit) and each request encoding (raw image body, encoding
key ``png``: ``image/png`` or ``image/jpeg``, as the sample file is; JSON
``{"image": base64}``), it finds the *capacity*: the highest Poisson arrival
rate whose p99 latency (open loop, from the scheduled send time,
``loadtest/openloop.py``) is <= ``--slo-ms`` with no failed request. Search
(``loadtest.search``, sized by ``loadtest.common.Plan``): start at ``start``
requests/s, double until a rate fails, then bisect geometrically, each trial
``warmup_s`` unscored + ``trial_s`` scored seconds, at most ``max_trials`` trials
or ``max_search_s`` per search.

Per trial it records the CPU seconds of the server's whole process tree (psutil:
API processes, workers, Ray's daemons) and of this client process, per request
and as cores busy, and the served accuracy (the sample images' labels are
known), and the peak resident set size of the server's process tree (sum of
RSS, sampled every 0.25 s). Writes ``DIR/capacity.json``, ``DIR/CAPACITY.md``
(tables, ``loadtest.capacityreport``), ``DIR/capacity.png`` (capacity per server
and configuration) and ``DIR/latency.png`` (p99 against load, every trial).

Images and SLO follow ``--checkpoint`` (``loadtest.samples.samples_for``): the
shipped 28 x 28 model gets Fashion-MNIST test images, any other checkpoint the
files of ``--data-dir`` or generated images at its input contract (speed-only);
the SLO is p99 <= 100 ms for 28 x 28 and CIFAR-size networks, <= 500 ms for
ImageNet-size ones (:func:`default_slo_ms`; ``--slo-ms`` overrides).

Forced last exit, as ``loadtest.bench`` does it: ``MSDNET_TARGET_FLOPS`` = the
last exit's cost, so the controller's command is clipped to thresholds that never
exit early; every image runs all blocks.

``--smoke``: every server (one configuration each) for a couple of seconds at a
low rate with both encodings; every answer must be 200 with the class the
model gives in-process at the exit the answer reports (the last exit for the
peers). Exit status 1 otherwise, or when a peer is not installed.

FLOPs = multiply-accumulates of convs and linears (MSDNet paper convention),
cumulative to the exit an image leaves at.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import os
import resource
import shlex
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import openloop as ol
from ..common import ENCODINGS, FULL, SMOKE, Plan, log
from ..samples import Sample, samples_for
from ..search import search_capacity
from ..servers import ServerConfig, TreeServer, litserve, msdnet, ray


# ---------------------------------------------------------------------------- the grid
def grid(checkpoint: str, last_exit_flops: int, smoke: bool) -> list[ServerConfig]:
    """The configurations searched: process and thread counts that make sense on
    2 cores (one per server for ``smoke``)."""
    if smoke:
        return [litserve(checkpoint, 1, 1, 1), ray(checkpoint, 1, 1), msdnet(checkpoint, None),
                msdnet(checkpoint, None, last_exit_flops)]
    return [litserve(checkpoint, 1, 1, 1), litserve(checkpoint, 2, 1, 1), litserve(checkpoint, 1, 2, 1),
            ray(checkpoint, 1, 1), ray(checkpoint, 2, 1),
            msdnet(checkpoint, None), msdnet(checkpoint, None, workers=1), msdnet(checkpoint, None, workers=2),
            msdnet(checkpoint, None, workers=3), msdnet(checkpoint, 1, backend="torch"),
            msdnet(checkpoint, 2, backend="torch"),
            msdnet(checkpoint, None, last_exit_flops), msdnet(checkpoint, None, last_exit_flops, workers=1),
            msdnet(checkpoint, None, last_exit_flops, workers=2), msdnet(checkpoint, None, last_exit_flops, workers=3),
            msdnet(checkpoint, 1, last_exit_flops, backend="torch"),
            msdnet(checkpoint, 2, last_exit_flops, backend="torch")]


def bench_grid(checkpoint: str, last_exit_flops: int, smoke: bool) -> list[ServerConfig]:
    """``make bench``'s configurations: each peer's process and thread counts for 2
    cores, msdnet-serve's defaults (and 1 and 3 HTTP workers, to show the default is
    its best) and its defaults forced to the last exit. ``smoke``: one of each server."""
    if smoke:
        return grid(checkpoint, last_exit_flops, smoke=True)
    return [litserve(checkpoint, 1, 1, 1), litserve(checkpoint, 2, 1, 1), litserve(checkpoint, 1, 2, 1),
            ray(checkpoint, 1, 1), ray(checkpoint, 2, 1),
            msdnet(checkpoint, None), msdnet(checkpoint, None, workers=1), msdnet(checkpoint, None, workers=3),
            msdnet(checkpoint, None, last_exit_flops)]


# ---------------------------------------------------------------------------- requests
def json_body(png: bytes) -> bytes:
    """msdnet-serve's JSON encoding of one image: ``{"image": base64}``."""
    return json.dumps({"image": base64.b64encode(png).decode("ascii")}).encode()


def make_requests(samples: list[Sample], encoding: str) -> Callable[[int], ol.Request]:
    """Request i: ``POST /classify`` with sample i (cycling), as a raw PNG body or as JSON."""
    if encoding == "png":
        return ol.classify_requests(samples)
    if encoding != "json":
        raise ValueError(f"encoding must be 'png' or 'json', not {encoding!r}")
    bodies = [json_body(s.png) for s in samples]
    return lambda i: ol.Request("/classify", bodies[i % len(samples)], "application/json",
                                samples[i % len(samples)].label)


def reference_classes(checkpoint: str, samples: list[Sample], chunk: int = 32) -> np.ndarray:
    """(N, exits) int: the class the model gives in-process for each sample at each
    exit, after msdnet-serve's own decoding (torch eager, batches of ``chunk``)."""
    import torch

    from model.checkpoint import load
    from server.images import decode

    ck = load(checkpoint)
    spec = ck.transforms
    out = []
    for i in range(0, len(samples), chunk):
        x = torch.from_numpy(np.stack([decode(s.png, spec, 4096 * 4096) for s in samples[i:i + chunk]]))
        with torch.inference_mode():
            logits = ck.model.eval()(x)
        out.append(torch.stack([lg.argmax(1) for lg in logits], 1).numpy())
    return np.concatenate(out)


def default_slo_ms(checkpoint: str) -> float:
    """The p99 bound of a capacity search by network size: 500 ms for an
    ImageNet-size input (side over 64 pixels), 100 ms otherwise (28 x 28, CIFAR)."""
    from model.checkpoint import load

    from ..imagegen import is_photo_contract

    return 500.0 if is_photo_contract(load(checkpoint).transforms) else 100.0


# ---------------------------------------------------------------------------- search
def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def trial(srv: TreeServer, make: Callable[[int], ol.Request], rate: float, plan: Plan, slo_ms: float,
          seed: int = 0) -> tuple[dict, ol.RunResult]:
    """One open-loop run at ``rate``; its summary with ``passed`` (p99 <= slo, no
    failure) and CPU: ``server_cpu_ms``/``client_cpu_ms`` per request sent,
    ``server_cores``/``client_cores`` busy over the run."""
    peak = [0]
    done = threading.Event()

    def sample_rss() -> None:
        while True:
            with contextlib.suppress(Exception):
                peak[0] = max(peak[0], srv.rss_bytes())
            if done.wait(0.25):
                return

    sampler = threading.Thread(target=sample_rss, daemon=True) if hasattr(srv, "rss_bytes") else None
    if sampler is not None:
        sampler.start()
    s0, c0, t0 = srv.cpu_s(), _cpu_self(), time.monotonic()
    try:
        r = ol.run(srv.url, make, rate, plan.trial_s, warmup_s=plan.warmup_s, timeout_s=plan.timeout_s, seed=seed)
    finally:
        done.set()
        if sampler is not None:
            sampler.join()
    s1, c1, wall = srv.cpu_s(), _cpu_self(), time.monotonic() - t0
    s = ol.summarise(r.scored(), plan.trial_s)
    n_all = len(r.records) or 1
    s.update(rate=rate, passed=bool(s["ok"] > 0 and s["ok"] == s["requests"] and s["p99_ms"] <= slo_ms),
             server_cpu_ms=1e3 * (s1 - s0) / n_all, client_cpu_ms=1e3 * (c1 - c0) / n_all,
             server_cores=(s1 - s0) / wall, client_cores=(c1 - c0) / wall, wall_s=wall,
             loadavg_1min=os.getloadavg()[0], server_rss_peak_mib=peak[0] / 2**20 if sampler else None)
    return s, r


def find_capacity(srv: TreeServer, make: Callable[[int], ol.Request], plan: Plan, slo_ms: float,
                  name: str) -> dict:
    """The capacity of ``srv`` for the requests ``make`` gives: :func:`loadtest.search.search_capacity`
    over :func:`trial` (each trial passes when its p99 is <= ``slo_ms`` ms and no request
    failed; ``plan.pause_s`` seconds between trials). Returns ``capacity_rps`` (the
    highest passing rate, requests/s; 0 when none passed), ``first_fail_rps`` (the
    lowest failing rate above it, None when none failed), ``at_capacity`` (that
    trial's summary), ``trials`` (every summary in order) and ``search_s`` (seconds)."""
    trials: list[dict] = []
    started = time.monotonic()

    def passes(rate: float) -> bool:
        s, _ = trial(srv, make, rate, plan, slo_ms, seed=len(trials))
        trials.append(s)
        log(f"  {name}: {s['rate']:7.1f} req/s  p50 {s['p50_ms']:7.1f}  p99 {s['p99_ms']:8.1f} ms  "
            f"ok {s['ok']}/{s['requests']}  cores server {s['server_cores']:.2f} client {s['client_cores']:.2f}  "
            f"{'pass' if s['passed'] else 'FAIL'}")
        time.sleep(plan.pause_s)
        return s["passed"]

    found = search_capacity(passes, plan)
    best = max((t for t in trials if t["passed"]), key=lambda t: t["rate"], default=None)
    return {"capacity_rps": best["rate"] if best else 0.0, "first_fail_rps": found.hi, "at_capacity": best,
            "trials": trials, "search_s": time.monotonic() - started}


# ---------------------------------------------------------------------------- smoke
def smoke_check(records: list[ol.Record], expected: np.ndarray, n_samples: int, family: str) -> list[str]:
    """Problems with a smoke run's answers: any non-200, or a class other than the
    in-process class at the reported exit (the last exit for peers and forced
    msdnet-serve). ``expected``: :func:`reference_classes` of the samples."""
    problems = []
    num_exits = expected.shape[1]
    for r in records:
        if r.status != 200:
            problems.append(f"request {r.index}: status {r.status} {r.error or ''}")
            continue
        exit_ = r.exit if family == "msdnet" else num_exits
        if family != "msdnet" and r.exit not in (None, num_exits):
            problems.append(f"request {r.index}: exit {r.exit}, expected the last ({num_exits})")
        if exit_ is None or not 1 <= exit_ <= num_exits:
            problems.append(f"request {r.index}: no valid exit ({r.exit})")
            continue
        want = int(expected[r.index % n_samples, exit_ - 1])
        if r.predicted != want:
            problems.append(f"request {r.index}: class {r.predicted}, expected {want} (exit {exit_})")
    return problems


# ---------------------------------------------------------------------------- the grid
def smoke_trial(srv: TreeServer, cfg: ServerConfig, enc: str, samples: list[Sample], plan: Plan,
                expected: np.ndarray) -> tuple[dict, list[str]]:
    """One short trial of encoding ``enc`` at ``plan.start`` requests/s whose answers
    must be right (:func:`smoke_check` against ``expected``). Returns the run as a
    search would store it (capacity 0, the trial's summary with its first 20
    ``problems``) and the failure lines (at most 5 wrong answers, or that no request was sent)."""
    s, r = trial(srv, make_requests(samples, enc), plan.start, plan, float("inf"))
    problems = smoke_check(r.records, expected, len(samples), cfg.family)
    s["problems"] = problems[:20]
    log(f"  {enc}: {s['ok']}/{s['requests']} answered 200, {len(problems)} problem(s) {problems[:3]}")
    failures = [f"{cfg.key} {enc}: {x}" for x in problems[:5]]
    if not r.records:
        failures.append(f"{cfg.key} {enc}: no request sent")
    return {"capacity_rps": 0.0, "at_capacity": s, "trials": [s]}, failures


# ---------------------------------------------------------------------------- the grid
def measure_configs(configs: list[ServerConfig], samples: list[Sample], plan: Plan, slo_ms: float,
                    expected: np.ndarray | None = None, encodings: tuple[str, ...] = ENCODINGS,
                    observe: Callable[[ServerConfig, TreeServer], Callable[[], dict]] | None = None,
                    ) -> tuple[dict, list[str]]:
    """Start each configuration in turn and search its capacity per encoding (p99 <=
    ``slo_ms`` ms); with ``expected`` (:func:`reference_classes` of ``samples``) run
    the smoke instead: one short trial per encoding whose answers must be right
    (:func:`smoke_trial`). ``observe(cfg, srv)``, called before each encoding's run,
    returns a function called after it whose fields join that run (``loadtest.realbench``:
    the batch sizes the server formed). ``plan.pause_s`` seconds after each
    configuration. Returns ``(servers, failures)``: per configuration key its family,
    labels and per-encoding run (as written to capacity.json, with ``rss_peak_mib``:
    the server tree's peak resident memory over its trials, MiB), and one line per
    problem (not installed, did not start, wrong answer)."""
    servers: dict = {}
    failures: list[str] = []
    for cfg in configs:
        short = cfg.key.split("-", 1)[-1] if cfg.family in ("litserve", "ray") else cfg.key
        entry = {"family": cfg.family, "label": cfg.label, "config": cfg.config, "encodings": {}, "key_short": short}
        servers[cfg.key] = entry
        if not cfg.installed():
            entry["error"] = f"not installed ({cfg.module}): pip install -e '.[bench]'"
            failures.append(f"{cfg.key}: {entry['error']}")
            log(f"{cfg.key}: {entry['error']}")
            continue
        log(f"{cfg.key}: {cfg.label}, {cfg.config}")
        try:
            with cfg.make() as srv:
                for enc in encodings:
                    after = observe(cfg, srv) if observe is not None else dict
                    if expected is not None:
                        run, bad = smoke_trial(srv, cfg, enc, samples, plan, expected)
                        failures += bad
                    else:
                        run = find_capacity(srv, make_requests(samples, enc), plan, slo_ms, f"{cfg.key} {enc}")
                        log(f"  {enc}: capacity {run['capacity_rps']} req/s")
                    run["rss_peak_mib"] = max((t.get("server_rss_peak_mib") or 0.0 for t in run["trials"]),
                                              default=None)
                    run.update(after())
                    entry["encodings"][enc] = run
        except RuntimeError as exc:  # did not start
            entry["error"] = str(exc).splitlines()[0][:300]
            failures.append(f"{cfg.key}: {entry['error']}")
            log(f"{cfg.key}: {exc}"[:2000])
        time.sleep(plan.pause_s)
    return servers, failures


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """``python3 -m loadtest.capacity``; returns the exit status (1: a smoke found a
    wrong answer, a missing peer or a server that did not start)."""
    from model.checkpoint import DEFAULT_CHECKPOINT
    from model.checkpoint import load as load_checkpoint

    from ..capacityreport import report
    from ..plots import plot_capacity, plot_latency

    p = argparse.ArgumentParser(prog="python3 -m loadtest.capacity", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for capacity.json, CAPACITY.md, capacity.png, latency.png")
    p.add_argument("--smoke", action="store_true", help="seconds per server, checks answers (CI)")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: Debian's) for a 28x28 checkpoint; "
                   "for another, a folder of real images DIR/<class>/<file> (default: generated, speed-only)")
    p.add_argument("--slo-ms", type=float, help="p99 bound (default: 100 ms; 500 ms for ImageNet-size networks)")
    p.add_argument("--camera-share", type=float, default=0.01,
                   help="share of generated ImageNet-size images at 4000x3000")
    p.add_argument("--only", nargs="*", help="configuration keys or families to run (default: all)")
    p.add_argument("--max-search-s", type=float, help="seconds per search (default: the plan's)")
    args = p.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    if args.max_search_s:
        plan = replace(plan, max_search_s=args.max_search_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ck = load_checkpoint(args.checkpoint)
    last_flops = int(ck.exit_flops(lazy=True)[-1])
    samples, source = samples_for(args.checkpoint, args.data_dir, limit=plan.images, camera_share=args.camera_share)
    if args.slo_ms is None:
        args.slo_ms = default_slo_ms(args.checkpoint)
    expected = reference_classes(args.checkpoint, samples) if args.smoke else None
    configs = [c for c in grid(args.checkpoint, last_flops, args.smoke)
               if not args.only or c.key in args.only or c.family in args.only]
    res: dict = {"smoke": args.smoke, "plan": plan.search_dict(), "slo_ms": args.slo_ms, "images": len(samples),
                 "images_source": source,
                 "command": "python3 -m loadtest.capacity " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                 "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
                 "machine": {"cpus": len(os.sched_getaffinity(0)), "logical_cpus": os.cpu_count()},
                 "loadavg_at_start": os.getloadavg(), "checkpoint": args.checkpoint, "servers": {}}
    res["servers"], failures = measure_configs(configs, samples, plan, args.slo_ms, expected)
    res["loadavg_at_end"] = os.getloadavg()
    res["failures"] = failures
    (out / "capacity.json").write_text(json.dumps(res, indent=1, default=float))
    (out / "CAPACITY.md").write_text("## Capacity against serving peers\n\n" + report(res))
    plot_capacity(res, out / "capacity.png")
    plot_latency(res, out / "latency.png")
    log(f"wrote {out / 'CAPACITY.md'}; {len(failures)} failure(s)")
    for f in failures:
        log(f"  FAIL {f}")
    return 1 if (args.smoke and failures) else 0


if __name__ == "__main__":
    sys.exit(main())
