"""Capacity of msdnet-serve against serving peers: ``python3 -m loadtest.capacity --out DIR [--smoke]``.

For each server configuration (LitServe and Ray Serve running the checkpoint's
whole network, ``loadtest/peers/``; msdnet-serve with its budget controller on,
and forced to the last exit) and each request encoding (raw image body, encoding
key ``png``: ``image/png`` or ``image/jpeg``, as the sample file is; JSON
``{"image": base64}``), it finds the *capacity*: the highest Poisson arrival
rate whose p99 latency (open loop, from the scheduled send time,
``loadtest/openloop.py``) is <= ``--slo-ms`` with no failed request. Search:
start at ``start`` requests/s, double until a rate fails, then bisect
geometrically, each trial ``warmup_s`` unscored + ``trial_s`` scored seconds,
at most ``max_trials`` trials or ``max_search_s`` per search.

Per trial it records the CPU seconds of the server's whole process tree (psutil:
API processes, workers, Ray's daemons) and of this client process, per request
and as cores busy, and the served accuracy (the sample images' labels are
known), and the peak resident set size of the server's process tree (sum of
RSS, sampled every 0.25 s). Writes ``DIR/capacity.json``, ``DIR/CAPACITY.md``
(tables) and ``DIR/capacity.png`` (capacity per server and configuration).

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

# long file: the grid, search, trials and report of one benchmark (the report could move out).

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import importlib.util
import json
import math
import os
import resource
import shlex
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import openloop as ol
from .samples import Sample, load_samples, samples_for  # noqa: F401 - load_samples: the tests' name
from .servers import ServerProcess

ENCODINGS = ("png", "json")
ENCODING_LABELS = {"png": "raw image/png", "json": "JSON base64"}


@dataclass(frozen=True)
class Plan:
    """Sizes of a run. Rates in requests/s, times in seconds."""

    start: float = 150.0
    max_rate: float = 3200.0
    min_rate: float = 5.0
    trial_s: float = 5.0
    warmup_s: float = 1.0
    pause_s: float = 1.0
    timeout_s: float = 5.0
    stop_ratio: float = 1.12       # bisect until hi / lo < this
    max_trials: int = 8            # from 150 req/s: 5 doublings to 4800, then 3 bisections
    max_search_s: float = 80.0     # per (configuration, encoding)
    images: int = 2000             # test images cycled through


FULL = Plan()
SMOKE = Plan(start=15.0, trial_s=2.0, warmup_s=0.5, pause_s=0.2, max_trials=1, max_search_s=10.0, images=60)


def log(msg: str) -> None:
    print(f"[capacity {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------- processes
class TreeServer(ServerProcess):
    """A :class:`ServerProcess` whose CPU time and shutdown cover its whole
    process tree (LitServe's API and worker processes outlive a SIGTERM to their
    parent; Ray's daemons are the server's work too)."""

    def _tree(self) -> list:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except (psutil.NoSuchProcess, AttributeError):
            return []

    def cpu_s(self) -> float | None:
        """CPU seconds (user + system) of every live process in the tree."""
        import psutil

        total = 0.0
        for p in self._tree():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def rss_bytes(self) -> int:
        """Sum of the resident set sizes of every live process in the tree (shared
        pages count once per process, so an upper bound of the memory used)."""
        import psutil

        total = 0
        for p in self._tree():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += p.memory_info().rss
        return total

    def stop(self) -> int | None:
        import psutil

        children = self._tree()[1:]
        code = super().stop()
        for p in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(children, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        return code


@dataclass(frozen=True)
class ServerConfig:
    """One server in one configuration. ``family``: litserve, ray, msdnet, msdnet-last."""

    key: str
    family: str
    label: str
    config: str
    make: Callable[[], TreeServer] = field(repr=False, compare=False)
    module: str | None = None  # import needed (the bench extra)

    def installed(self) -> bool:
        return self.module is None or importlib.util.find_spec(self.module) is not None


def _py(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def litserve(checkpoint: str, api_servers: int, workers: int, threads: int, runtime: str = "torch") -> ServerConfig:
    """LitServe with the whole network; ``runtime`` ``onnxruntime``: family ``litserve-ort``."""
    cmd = _py("loadtest.peers.litserve_app", "--checkpoint", checkpoint, "--api-servers", str(api_servers),
              "--workers", str(workers), "--threads", str(threads), "--runtime", runtime)
    ort = runtime == "onnxruntime"
    return ServerConfig(f"litserve{'-ort' if ort else ''}-a{api_servers}-w{workers}-t{threads}",
                        "litserve-ort" if ort else "litserve",
                        "LitServe, whole network" + (" in ONNX Runtime" if ort else ""),
                        f"{api_servers} API process(es), {workers} inference worker(s), "
                        f"{'ORT' if ort else 'torch'} {threads} thread(s)",
                        lambda: TreeServer(cmd, ready_path="/health", name="litserve", ready_timeout_s=600),
                        "litserve")


def ray(checkpoint: str, replicas: int, threads: int, runtime: str = "torch") -> ServerConfig:
    """Ray Serve with the whole network; ``runtime`` ``onnxruntime``: family ``ray-ort``."""
    cmd = _py("loadtest.peers.ray_app", "--checkpoint", checkpoint, "--replicas", str(replicas),
              "--threads", str(threads), "--runtime", runtime)
    ort = runtime == "onnxruntime"
    return ServerConfig(f"ray{'-ort' if ort else ''}-r{replicas}-t{threads}", "ray-ort" if ort else "ray",
                        "Ray Serve, whole network" + (" in ONNX Runtime" if ort else ""),
                        f"{replicas} replica(s), {'ORT' if ort else 'torch'} {threads} thread(s)",
                        lambda: TreeServer(cmd, {"RAY_USAGE_STATS_ENABLED": "0"}, ready_path="/readyz", name="ray",
                                           ready_timeout_s=600),
                        "ray.serve")


# Settings a configuration leaves at the server's default unless it sets them (not inherited).
_DEFAULTED = ("MSDNET_TORCH_THREADS", "MSDNET_WORKERS", "MSDNET_TARGET_FLOPS", "MSDNET_BACKEND", "MSDNET_MODEL_THREADS")


def msdnet(checkpoint: str, threads: int | None, last_exit_flops: int | None = None,
           backend: str | None = None, workers: int | None = None, *, target_flops: float | None = None,
           env: dict[str, str] | None = None, tag: str | None = None) -> ServerConfig:
    """msdnet-serve; ``threads`` None: its default threads; with ``last_exit_flops``:
    forced to the last exit (``MSDNET_TARGET_FLOPS``); ``backend``: ``MSDNET_BACKEND``,
    ``workers``: ``MSDNET_WORKERS`` (None: the server's defaults); ``target_flops``:
    the controller's target (``MSDNET_TARGET_FLOPS``, FLOPs per request); ``env``:
    any other ``MSDNET_*`` settings (listed in the configuration's label); ``tag``:
    the key's suffix (default: made from the settings)."""
    extra = dict(env or {})
    env = {"MSDNET_ACCESS_LOG": "false", "MSDNET_LOG_LEVEL": "warning"}
    if workers is not None:
        env["MSDNET_WORKERS"] = str(workers)
    if backend is not None:
        env["MSDNET_BACKEND"] = backend
    if threads is not None:
        env["MSDNET_TORCH_THREADS"] = str(threads)
    family, label = "msdnet", "msdnet-serve, controller on"
    if target_flops is not None:
        env["MSDNET_TARGET_FLOPS"] = str(int(target_flops))
        label += f" (target {target_flops / 1e6:.1f} MFLOPs)"
    if last_exit_flops is not None:
        env["MSDNET_TARGET_FLOPS"] = str(last_exit_flops)
        family, label = "msdnet-last", "msdnet-serve, forced to the last exit"
    config = "defaults" if threads is None else f"{threads} thread(s)"
    if backend is not None:
        config += f", backend {backend}"
    if workers is not None:
        config += f", {workers} HTTP worker(s)" + (" + engine process" if workers > 1 else "")
    for k, v in extra.items():
        config += f", {k}={v}"
    env.update(extra)

    def make() -> TreeServer:
        base = {k: v for k, v in os.environ.items() if k not in _DEFAULTED}
        srv = TreeServer(_py("server.cli", "serve", "--checkpoint", checkpoint), name=family, ready_timeout_s=600)
        srv.env = {**base, **env}
        return srv

    suffix = ("" if backend is None else f"-{backend}") + ("" if workers is None else f"-w{workers}")
    if tag is not None:
        suffix += f"-{tag}"
    return ServerConfig(f"{family}-{'default' if threads is None else f't{threads}'}{suffix}", family, label,
                        config + ", access log off", make)


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

    from .imagegen import is_photo_contract

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
    """Highest passing rate: double from ``plan.start`` until a rate fails (halve
    while the first fails), then bisect geometrically; bounded by ``max_trials``
    and ``max_search_s``. ``capacity_rps`` 0 when no rate passed."""
    trials: list[dict] = []
    started = time.monotonic()

    def budget_left() -> bool:
        return len(trials) < plan.max_trials and time.monotonic() - started < plan.max_search_s

    def run(rate: float) -> bool:
        s, _ = trial(srv, make, round(rate, 1), plan, slo_ms, seed=len(trials))
        trials.append(s)
        log(f"  {name}: {s['rate']:7.1f} req/s  p50 {s['p50_ms']:7.1f}  p99 {s['p99_ms']:8.1f} ms  "
            f"ok {s['ok']}/{s['requests']}  cores server {s['server_cores']:.2f} client {s['client_cores']:.2f}  "
            f"{'pass' if s['passed'] else 'FAIL'}")
        time.sleep(plan.pause_s)
        return s["passed"]

    lo = hi = None
    rate = plan.start
    while budget_left() and rate <= plan.max_rate:
        if run(rate):
            lo, rate = rate, rate * 2
        else:
            hi = rate
            break
    while lo is None and hi is not None and hi / 2 >= plan.min_rate and budget_left():
        if run(hi / 2):
            lo = hi / 2
        else:
            hi = hi / 2
    while lo is not None and hi is not None and hi / lo >= plan.stop_ratio and budget_left():
        mid = math.sqrt(lo * hi)
        if run(mid):
            lo = mid
        else:
            hi = mid
    best = max((t for t in trials if t["passed"]), key=lambda t: t["rate"], default=None)
    return {"capacity_rps": best["rate"] if best else 0.0, "first_fail_rps": hi, "at_capacity": best,
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
def measure_configs(configs: list[ServerConfig], samples: list[Sample], plan: Plan, slo_ms: float,
                    expected: np.ndarray | None = None) -> tuple[dict, list[str]]:
    """Start each configuration in turn and search its capacity per encoding; with
    ``expected`` (:func:`reference_classes` of ``samples``) run the smoke instead: one
    short trial per encoding whose answers must be right. Returns ``(servers, failures)``:
    per configuration key its family, labels and per-encoding search (as written to
    capacity.json), and one line per problem (not installed, did not start, wrong answer)."""
    smoke = expected is not None
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
                for enc in ENCODINGS:
                    make = make_requests(samples, enc)
                    if smoke:
                        s, r = trial(srv, make, plan.start, plan, float("inf"))
                        problems = smoke_check(r.records, expected, len(samples), cfg.family)
                        s["problems"] = problems[:20]
                        entry["encodings"][enc] = {"capacity_rps": 0.0, "at_capacity": s, "trials": [s]}
                        log(f"  {enc}: {s['ok']}/{s['requests']} answered 200, {len(problems)} problem(s) "
                            f"{problems[:3]}")
                        failures += [f"{cfg.key} {enc}: {x}" for x in problems[:5]]
                        if not r.records:
                            failures.append(f"{cfg.key} {enc}: no request sent")
                    else:
                        entry["encodings"][enc] = find_capacity(srv, make, plan, slo_ms, f"{cfg.key} {enc}")
                        log(f"  {enc}: capacity {entry['encodings'][enc]['capacity_rps']} req/s")
        except RuntimeError as exc:  # did not start
            entry["error"] = str(exc).splitlines()[0][:200]
            failures.append(f"{cfg.key}: {entry['error']}")
            log(f"{cfg.key}: {exc}")
        time.sleep(plan.pause_s)
    return servers, failures


# ---------------------------------------------------------------------------- report
def _f(v, fmt="{:.1f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return fmt.format(v)


def best_per_family(res: dict) -> dict:
    """{family: {encoding: (key, capacity)}} of the best configuration per encoding."""
    out: dict = {}
    for key, srv in res["servers"].items():
        for enc, run in srv.get("encodings", {}).items():
            cur = out.setdefault(srv["family"], {}).get(enc)
            if cur is None or run["capacity_rps"] > cur[1]:
                out[srv["family"]][enc] = (key, run["capacity_rps"])
    return out


FAMILY_ORDER = ("litserve-ort", "litserve", "ray-ort", "ray", "msdnet", "msdnet-last")


def report(res: dict) -> str:
    """The Markdown tables of a run (``res`` as written to capacity.json)."""
    plan, lines = res["plan"], []
    w = lines.append
    la0 = ", ".join(f"{x:.2f}" for x in res["loadavg_at_start"])
    la1 = ", ".join(f"{x:.2f}" for x in res.get("loadavg_at_end", []))
    w(f"Command: `{res['command']}` ({res['started']} UTC{', smoke: numbers mean nothing' if res['smoke'] else ''}); "
      f"{res['machine']['cpus']} CPUs (affinity), load average at start {la0}, at end {la1} (1, 5, 15 min).")
    w("")
    w(f"Capacity = highest Poisson rate with p99 ≤ {res['slo_ms']:g} ms and no failed request; each trial "
      f"{plan['warmup_s']:g} s warm-up + {plan['trial_s']:g} s scored; search from {plan['start']:g} req/s, doubling, "
      f"then geometric bisection to a ratio < {plan['stop_ratio']:g} (≤ {plan['max_trials']} trials). Client and "
      f"servers share the CPUs. Accuracy: the answers of the trial at capacity ({res['images']} "
      f"{res.get('images_source', 'Fashion-MNIST test images')} cycled). CPU: cores busy over that trial, "
      "server = its whole process tree (psutil), client = this process. MFLOPs per image = multiply-accumulates "
      "of convs and linears (MSDNet paper convention), mean over the answers.")
    w("")
    best = best_per_family(res)
    w("### Best configuration per server")
    w("")
    w("| server | encoding | best configuration | capacity (req/s) | p99 at capacity (ms) | accuracy served | "
      "MFLOPs per image | CPU cores busy: server + client | CPU ms per request: server / client |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for fam in FAMILY_ORDER:
        for enc in ENCODINGS:
            if enc not in best.get(fam, {}):
                continue
            key, cap = best[fam][enc]
            srv = res["servers"][key]
            t = srv["encodings"][enc]["at_capacity"] or {}
            w(f"| {srv['label']} | {ENCODING_LABELS[enc]} | {srv['config']} | **{_f(cap)}** | {_f(t.get('p99_ms'))} | "
              f"{_f(None if t.get('accuracy') is None else 100 * t['accuracy'], '{:.2f}%')} ({t.get('scored', 0)}) | "
              f"{_f(None if t.get('mean_flops') is None else t['mean_flops'] / 1e6, '{:.2f}')} | "
              f"{_f(t.get('server_cores'), '{:.2f}')} + {_f(t.get('client_cores'), '{:.2f}')} | "
              f"{_f(t.get('server_cpu_ms'), '{:.2f}')} / {_f(t.get('client_cpu_ms'), '{:.2f}')} |")
    w("")
    ratios = []
    for enc in ENCODINGS:
        m = best.get("msdnet", {}).get(enc, (None, 0))[1]
        ml = best.get("msdnet-last", {}).get(enc, (None, 0))[1]
        for fam, name in (("litserve", "LitServe"), ("ray", "Ray Serve")):
            p = best.get(fam, {}).get(enc, (None, 0))[1]
            if p:
                ratios.append(f"{ENCODING_LABELS[enc]}: controller on / {name} = **{m / p:.2f}×**, forced last "
                              f"exit / {name} = {ml / p:.2f}×")
    if ratios:
        w("Ratios of the best configurations (issue 12 judges msdnet-serve by its defaults, in the goals table; "
          "goal: controller on ≥ 2.5× each peer; forced last exit ≥ 1× the best peer): "
          + "; ".join(ratios) + ".")
        w("")
    w("### Every configuration")
    w("")
    w("| server | configuration | " + " | ".join(f"capacity, {ENCODING_LABELS[e]} (req/s)" for e in ENCODINGS)
      + " | trials |")
    w("| --- | --- | " + " | ".join("---" for _ in ENCODINGS) + " | --- |")
    for srv in res["servers"].values():
        if srv.get("error"):
            w(f"| {srv['label']} | {srv['config']} | " + " | ".join("–" for _ in ENCODINGS) + f" | {srv['error']} |")
            continue
        caps = [_f(srv["encodings"].get(e, {}).get("capacity_rps")) for e in ENCODINGS]
        trials = "; ".join(f"{e}: " + ", ".join(f"{t['rate']:g}{'✓' if t['passed'] else '✗'}"
                                                for t in srv["encodings"].get(e, {}).get("trials", []))
                           for e in ENCODINGS)
        w(f"| {srv['label']} | {srv['config']} | " + " | ".join(caps) + f" | {trials} |")
    w("")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = [(k, s) for k, s in res["servers"].items() if s.get("encodings")]
    if not servers:
        return
    x = np.arange(len(servers))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(servers) + 2), 4.5))
    for j, enc in enumerate(ENCODINGS):
        caps = [s["encodings"].get(enc, {}).get("capacity_rps", 0) for _, s in servers]
        bars = ax.bar(x + (j - 0.5) * 0.38, caps, 0.38, label=ENCODING_LABELS[enc])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(x, [f"{s['label'].split(',')[0]}\n{s['key_short']}" for _, s in servers], fontsize=7)
    ax.set_ylabel(f"capacity (req/s at p99 ≤ {res['slo_ms']:g} ms)")
    ax.set_title("Capacity per server and configuration (same client, same images, same CPUs)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_latency(res: dict, path: Path) -> None:
    """p99 latency against offered load: every trial of every configuration, one
    panel per encoding (log scale; the SLO as a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ENCODINGS), figsize=(11, 4.2), sharey=True)
    for ax, enc in zip(np.atleast_1d(axes), ENCODINGS):
        for key, srv in res["servers"].items():
            trials = sorted(srv.get("encodings", {}).get(enc, {}).get("trials", []), key=lambda t: t["rate"])
            if trials:
                ax.plot([t["rate"] for t in trials], [max(t["p99_ms"], 1.0) for t in trials], "o-", ms=3,
                        label=key)
        ax.axhline(res["slo_ms"], color="grey", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("offered load (requests/s, Poisson)")
        ax.set_title(ENCODING_LABELS[enc], fontsize=9)
    np.atleast_1d(axes)[0].set_ylabel("p99 latency (ms)")
    np.atleast_1d(axes)[-1].legend(fontsize=6)
    fig.suptitle("Latency against load, every trial of the capacity search (same client, same CPUs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    from model.checkpoint import DEFAULT_CHECKPOINT
    from model.checkpoint import load as load_checkpoint

    p = argparse.ArgumentParser(prog="python3 -m loadtest.capacity", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for capacity.json, CAPACITY.md, capacity.png")
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
    res: dict = {"smoke": args.smoke, "plan": asdict(plan), "slo_ms": args.slo_ms, "images": len(samples),
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
    plot(res, out / "capacity.png")
    plot_latency(res, out / "latency.png")
    log(f"wrote {out / 'CAPACITY.md'}; {len(failures)} failure(s)")
    for f in failures:
        log(f"  FAIL {f}")
    return 1 if (args.smoke and failures) else 0


if __name__ == "__main__":
    sys.exit(main())
