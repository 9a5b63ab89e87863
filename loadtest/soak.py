"""Soak benchmark: does the server's resident memory level off under steady load?

Starts ``msdnet serve`` (access log off, as in ``loadtest.servers``), sends real
Fashion-MNIST test PNGs to ``POST /classify`` at a fixed open-loop rate for
``--minutes`` (default 30), and samples the server process's resident set size
(``VmRSS`` in ``/proc/<pid>/status``) and its answered-request count (from
``/metrics``) every ``--interval`` seconds. Writes into ``--out``:

- ``soak.csv``: one row per sample (time, RSS, requests answered, load average);
- ``SOAK.md``: RSS at minute 5 and at the end (medians over a minute: RSS is a
  sawtooth, the runner trims the heap every ~10 s), the growth between them in %,
  and the slope after the warm-up (least squares) in KB/min and KB/request;
- ``soak.png``: RSS over time.

Rate: ``--rate`` requests/s, or ``--load`` (default 0.8) x ``--capacity``; with
neither given the capacity is measured first (``loadtest.parts.capacity.find_capacity``,
short trials). Goal (issue 10, item 15): under 2% growth from minute 5 to the end.

    python -m loadtest.soak --rate 250 --minutes 15 --out /tmp/soak

Load runs in chunks of ``--chunk`` seconds (each an open-loop run with its own
connections; a chunk's records are summarised and dropped so the client's own
memory stays flat). Loopback only.

Probes (diagnosis only; they go into ``--out/probe/`` through a ``sitecustomize``
module put on the server's ``PYTHONPATH``, and run after each chunk once the
server has had 3 s to drain): ``--mallinfo`` appends glibc's ``mallinfo2()``
(arena bytes in use and free) and RSS to ``mallinfo.jsonl``; ``--tracemalloc``
dumps a Python heap snapshot (compare two with ``--compare A B``; it slows the
server several fold, so use a low rate). See docs/SOAK.md for what they showed.
"""

# long file: one benchmark with its diagnostics (tracemalloc, mallinfo, re-analysis) and report.

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import openloop as ol
from .harness import process_tree
from .servers import ServerProcess

GOAL_GROWTH = 0.02  # issue 10, item 15: under 2% growth from minute 5 to minute 30

SITECUSTOMIZE = '''\
# Written by loadtest.soak --tracemalloc / --mallinfo: probes inside the server.
# SIGUSR1: the first starts tracemalloc (start-up and warm-up stay untraced: they
# would be slow under it), each later one dumps a snapshot. SIGUSR2: appends
# glibc's mallinfo2() and VmRSS as one JSON line to mallinfo.jsonl.
import ctypes, json, os, signal, time, tracemalloc
_dir = os.environ["MSDNET_SOAK_PROBE_DIR"]
_n = [0]
def _on_usr1(signum, frame):
    if not tracemalloc.is_tracing():
        tracemalloc.start(int(os.environ.get("MSDNET_SOAK_TRACEMALLOC_FRAMES", "6")))
        return
    tracemalloc.take_snapshot().dump(os.path.join(_dir, f"snap-{_n[0]:04d}-{int(time.time())}.pickle"))
    _n[0] += 1
class _MallInfo2(ctypes.Structure):
    _fields_ = [(k, ctypes.c_size_t) for k in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
def _on_usr2(signum, frame):
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    rss = [int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmRSS")][0]
    row = {"t": time.time(), "rss_kib": rss, **{k: getattr(m, k) for k, _ in _MallInfo2._fields_}}
    with open(os.path.join(_dir, "mallinfo.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\\n")
    if os.environ.get("MSDNET_SOAK_TRIM") and not row.get("trimmed"):  # then trim, and record again
        libc.malloc_trim(0)
        m = libc.mallinfo2()
        rss = [int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmRSS")][0]
        row = {"t": time.time(), "rss_kib": rss, "trimmed": True, **{k: getattr(m, k) for k, _ in _MallInfo2._fields_}}
        with open(os.path.join(_dir, "mallinfo.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\\n")
if os.environ.get("MSDNET_SOAK_TRACEMALLOC"):
    signal.signal(signal.SIGUSR1, _on_usr1)
signal.signal(signal.SIGUSR2, _on_usr2)
'''


@dataclass
class Sample:
    """One reading: seconds since the load started, RSS in KiB, answered requests."""

    t_s: float
    rss_kb: int
    answered: int | None
    loadavg_1m: float


def rss_kb(pid: int) -> int:
    """Resident set size in KiB of ``pid`` and every process under it (``VmRSS`` of
    ``/proc/<pid>/status``, summed: with ``--workers N`` the HTTP workers and the
    engine process; pages they share are counted once per process).

    Raises:
        OSError: when ``pid`` is gone or /proc is missing.
    """
    total = 0
    for p in [pid, *process_tree(pid)]:
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:
            if p == pid:
                raise
            continue  # a child that just left
        total += next((int(x.split()[1]) for x in lines if x.startswith("VmRSS:")), 0)
    if total == 0:
        raise OSError(f"no VmRSS for pid {pid}")
    return total


_ANSWERED = re.compile(r'^msdnet_requests_total\{endpoint="/classify",status="200"\} ([0-9.e+]+)$', re.M)


def answered(url: str) -> int | None:
    """``/classify`` requests answered 200 so far, from the server's ``/metrics``; None on failure."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            m = _ANSWERED.search(r.read().decode())
        return int(float(m.group(1))) if m else 0
    except (OSError, ValueError):
        return None


class Sampler(threading.Thread):
    """Reads RSS and the answered count every ``interval_s`` until stopped."""

    def __init__(self, pid: int, url: str, interval_s: float, t0: float):
        super().__init__(name="soak-sampler", daemon=True)
        self.pid, self.url, self.interval_s, self.t0 = pid, url, interval_s, t0
        self.samples: list[Sample] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            try:
                kb = rss_kb(self.pid)
            except OSError:
                return
            self.samples.append(Sample(time.monotonic() - self.t0, kb, answered(self.url), os.getloadavg()[0]))
            if self._stop_event.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def analyse(samples: list[Sample], warmup_s: float, window_s: float = 60.0) -> dict:
    """Figures of a soak: RSS (MB = 10^6 bytes) just after ``warmup_s`` and at the
    end (each the median of the samples in a ``window_s`` window: the minute after
    the warm-up, the last minute), growth between them, and least-squares slopes of RSS after ``warmup_s``
    against time (KB/min, KB = 1000 bytes) and against requests answered (KB/request).

    Raises:
        ValueError: fewer than 3 samples after the warm-up.
    """
    after = [s for s in samples if s.t_s >= warmup_s]
    if len(after) < 3:
        raise ValueError(f"{len(after)} samples after the {warmup_s:g}-s warm-up; run longer")
    t = np.array([s.t_s for s in after])
    rss = np.array([s.rss_kb * 1.024 for s in after])  # KB (10^3 bytes)
    slope_per_s = float(np.polyfit(t, rss, 1)[0])
    counted = [(s.answered, r) for s, r in zip(after, rss) if s.answered is not None]
    per_request = None
    if len(counted) >= 3 and counted[-1][0] > counted[0][0]:
        per_request = float(np.polyfit([c[0] for c in counted], [c[1] for c in counted], 1)[0])
    # RSS is a sawtooth (the runner trims the heap every ~10 s): take the median of
    # the minute after the warm-up and of the last minute, not single samples.
    end = samples[-1]
    warm_kb = float(np.median([s.rss_kb for s in after if s.t_s < warmup_s + window_s]))
    end_kb = float(np.median([s.rss_kb for s in after if s.t_s > end.t_s - window_s]))
    growth = (end_kb - warm_kb) / warm_kb
    # The floor (lowest sample of a window, right after a trim) is what stays once in-flight work is done.
    floor_warm = min(s.rss_kb for s in after if s.t_s < warmup_s + window_s)
    floor_end = min(s.rss_kb for s in after if s.t_s > end.t_s - window_s)
    return {"warmup_s": warmup_s, "duration_s": end.t_s, "samples": len(samples), "window_s": window_s,
            "rss_start_mb": samples[0].rss_kb * 1024 / 1e6, "rss_warm_mb": warm_kb * 1024 / 1e6,
            "rss_warm_at_s": after[0].t_s, "rss_end_mb": end_kb * 1024 / 1e6,
            "rss_max_mb": max(s.rss_kb for s in samples) * 1024 / 1e6,
            "growth": growth, "floor_warm_mb": floor_warm * 1024 / 1e6, "floor_end_mb": floor_end * 1024 / 1e6,
            "floor_growth": (floor_end - floor_warm) / floor_warm,
            "slope_kb_per_min": slope_per_s * 60, "slope_kb_per_request": per_request,
            "answered": end.answered, "plateau": growth < GOAL_GROWTH,
            "loadavg_1m_mean": float(np.mean([s.loadavg_1m for s in samples]))}


def write_csv(samples: list[Sample], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "rss_kib", "answered_200", "loadavg_1m"])
        for s in samples:
            w.writerow([f"{s.t_s:.1f}", s.rss_kb, "" if s.answered is None else s.answered, f"{s.loadavg_1m:.2f}"])


def read_csv(path: Path) -> list[Sample]:
    with open(path) as f:
        return [Sample(float(r["t_s"]), int(r["rss_kib"]), int(r["answered_200"]) if r["answered_200"] else None,
                       float(r["loadavg_1m"])) for r in csv.DictReader(f)]


def plot(samples: list[Sample], fig: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([s.t_s for s in samples]) / 60
    mb = np.array([s.rss_kb for s in samples]) * 1024 / 1e6
    f, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(t, mb, lw=1.2, label="server RSS")
    ax.axvline(fig["warmup_s"] / 60, color="grey", ls=":", lw=1, label="end of warm-up")
    ax.set_xlabel("minutes under load")
    ax.set_ylabel("RSS (MB)")
    ax.set_ylim(0, max(mb) * 1.15)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    f.tight_layout()
    f.savefig(path, dpi=110)
    plt.close(f)


def report(fig: dict, meta: dict) -> str:
    per_req = fig["slope_kb_per_request"]
    lines = [
        "## Latest soak run",
        "",
        f"`python -m loadtest.soak {meta['argv']}` on {meta['date']} ({meta['cpus']} CPUs, shared: mean 1-min "
        f"load average {fig['loadavg_1m_mean']:.2f} during the run). `msdnet serve` with its defaults "
        f"(access log off{', ' + meta['env'] if meta['env'] else ''}), open-loop Poisson arrivals of real "
        f"Fashion-MNIST test PNGs on `POST /classify` at {meta['rate']:g} requests/s{meta['rate_how']}. "
        f"RSS = `VmRSS` summed over the server's process tree (with `--workers N`: the supervising CLI, the engine "
        f"and the HTTP workers), sampled every {meta['interval_s']:g} s; MB = 10^6 bytes, "
        "KB = 10^3 bytes.",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| duration under load | {fig['duration_s'] / 60:.1f} min |",
        f"| requests answered (200) | {fig['answered']:,} |" if fig["answered"] is not None else
        "| requests answered (200) | unknown |",
        f"| load | {meta['load_summary']} |" if meta.get("load_summary") else None,
        f"| RSS at the start of the load | {fig['rss_start_mb']:.1f} MB |",
        f"| RSS at minute {fig['rss_warm_at_s'] / 60:.1f} (end of warm-up; median of the next "
        f"{fig['window_s']:g} s) | {fig['rss_warm_mb']:.1f} MB |",
        f"| RSS at the end (median of the last {fig['window_s']:g} s) | {fig['rss_end_mb']:.1f} MB "
        f"(max over the run {fig['rss_max_mb']:.1f} MB) |",
        f"| growth, warm-up to end | **{100 * fig['growth']:+.2f}%** (goal: under {100 * GOAL_GROWTH:g}%: "
        f"{'met' if fig['plateau'] else 'NOT met'}) |",
        f"| floor (lowest sample) of the minute after warm-up / of the last minute | {fig['floor_warm_mb']:.1f} / "
        f"{fig['floor_end_mb']:.1f} MB ({100 * fig['floor_growth']:+.2f}%) |",
        f"| slope after warm-up (least squares) | {fig['slope_kb_per_min']:+.1f} KB/min |",
        f"| slope per request after warm-up | {per_req:+.4f} KB/request |" if per_req is not None else
        "| slope per request after warm-up | unknown |",
        "",
        "![RSS over time](soak.png)",
        "",
    ]
    return "\n".join(line for line in lines if line is not None)


BEGIN, END = "<!-- soak:begin (written by python -m loadtest.soak) -->", "<!-- soak:end -->"


def write_report(path: Path, text: str) -> None:
    """Put ``text`` between the soak markers of ``path``, keeping the rest of the
    file (the hand-written investigation in docs/SOAK.md); a new file is just the report."""
    block = f"{BEGIN}\n{text.rstrip()}\n{END}\n"
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        block = head + block + rest.split(END, 1)[1].lstrip("\n")
    path.write_text(block)


def _load(url: str, samples, rate: float, seconds: float, chunk_s: float, timeout_s: float, tally: dict,
          stop: threading.Event, between=None) -> None:
    """Open-loop load in chunks until ``seconds`` have passed; counts into ``tally``;
    calls ``between()`` before the first chunk and after each one."""
    end = time.monotonic() + seconds
    i = 0
    if between is not None:
        between()
    while not stop.is_set():
        left = end - time.monotonic()
        if left <= 0.5:
            return
        r = ol.run(url, ol.classify_requests(samples, seed=i), rate, min(chunk_s, left), seed=i,
                   timeout_s=timeout_s, max_requests=10_000_000)
        s = ol.summarise(r.records, min(chunk_s, left))
        tally["requests"] += s["requests"]
        tally["ok"] += s["ok"]
        tally["p99_ms"].append(s["p99_ms"])
        for k, v in s["statuses"].items():
            tally["statuses"][k] = tally["statuses"].get(k, 0) + v
        print(f"[soak {time.strftime('%H:%M:%S')}] chunk {i}: {s['requests']} requests, ok {s['ok']}, "
              f"p99 {s['p99_ms']:.1f} ms, load {os.getloadavg()[0]:.2f}", flush=True)
        i += 1
        if between is not None:
            between()


def _measure_capacity(srv: ServerProcess, samples) -> float:
    from .common import Plan
    from .parts import capacity

    plan = Plan(start=100.0, trial_s=6.0, warmup_s=1.0, pause_s=1.0, max_trials=8, max_search_s=120.0)
    return capacity.find_capacity(srv, capacity.make_requests(samples, "png"), plan, 100.0, "soak")["capacity_rps"]


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _env_pairs(pairs: list[str]) -> dict:
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep:
            raise SystemExit(f"--env wants NAME=VALUE, not {p!r}")
        out[k] = v
    return out


def compare_snapshots(a: str, b: str, top: int = 15) -> str:
    """The ``top`` allocation sites whose Python-heap size grew most from
    snapshot ``a`` to ``b`` (``tracemalloc`` pickles), as text."""
    import tracemalloc

    old, new = tracemalloc.Snapshot.load(a), tracemalloc.Snapshot.load(b)
    flt = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
           tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>")]
    old, new = old.filter_traces(flt), new.filter_traces(flt)
    total = sum(s.size for s in new.statistics("filename")) - sum(s.size for s in old.statistics("filename"))
    out = [f"Python heap traced: {sum(s.size for s in old.statistics('filename')) / 1e6:.2f} MB -> "
           f"{sum(s.size for s in new.statistics('filename')) / 1e6:.2f} MB ({total / 1e3:+.1f} KB)"]
    for st in new.compare_to(old, "traceback")[:top]:
        frames = list(st.traceback)  # oldest first
        own = [f for f in frames if "/server/" in f.filename or "/model/" in f.filename]
        where = f"{frames[-1].filename}:{frames[-1].lineno}"
        if own and own[-1] is not frames[-1]:
            where += f" (from {own[-1].filename}:{own[-1].lineno})"
        out.append(f"{st.size_diff / 1e3:+9.1f} KB {st.count_diff:+7d} blocks  {where}")
    return "\n".join(out)


def finish(data: list[Sample], warmup_s: float, meta: dict, out: Path) -> dict:
    """Figures, soak.json, soak.png and the report section of SOAK.md in ``out``."""
    fig = analyse(data, min(warmup_s, data[-1].t_s / 3))
    (out / "soak.json").write_text(json.dumps({"figures": fig, "meta": meta}, indent=2))
    plot(data, fig, out / "soak.png", f"msdnet serve at {meta['rate']:g} requests/s: growth after warm-up "
                                      f"{100 * fig['growth']:+.2f}%, {fig['slope_kb_per_min']:+.0f} KB/min")
    write_report(out / "SOAK.md", report(fig, meta))
    print(json.dumps(fig, indent=2))
    return fig


def reanalyse(src: Path, out: Path, warmup_s: float) -> int:
    out.mkdir(parents=True, exist_ok=True)
    data = read_csv(src / "soak.csv")
    meta = json.loads((src / "soak.json").read_text())["meta"]
    if src.resolve() != out.resolve():
        write_csv(data, out / "soak.csv")
    return 0 if finish(data, warmup_s, meta, out)["plateau"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, help="requests/s (default: --load x capacity)")
    p.add_argument("--capacity", type=float, help="requests/s the server sustains (default: measured first)")
    p.add_argument("--load", type=float, default=0.8, help="share of capacity when --rate is not given")
    p.add_argument("--minutes", type=float, default=30.0, help="minutes under load")
    p.add_argument("--warmup-minutes", type=float, default=5.0, help="growth and slope are measured after this")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--chunk", type=float, default=60.0, help="seconds per open-loop run")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before a request counts as failed")
    p.add_argument("--images", type=int, default=10_000, help="test images to cycle through")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: Debian's)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment of the server (e.g. MALLOC_ARENA_MAX=8), repeatable")
    p.add_argument("--tracemalloc", action="store_true", help="dump tracemalloc snapshots of the server (slow)")
    p.add_argument("--mallinfo", action="store_true", help="record glibc mallinfo2() of the server after each chunk")
    p.add_argument("--reanalyse", metavar="DIR", help="only redo the figures of an earlier run's soak.csv and "
                   "soak.json in DIR, writing into --out")
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="only print the growth between two snapshots")
    p.add_argument("--out", default="docs", help="output folder (soak.csv, SOAK.md, soak.png)")
    args = p.parse_args(argv)
    if args.compare:
        print(compare_snapshots(*args.compare))
        return 0
    if args.reanalyse:
        return reanalyse(Path(args.reanalyse), Path(args.out), args.warmup_minutes * 60)
    from .samples import load_samples

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = _env_pairs(args.env)
    extra_env = dict(env)
    if args.tracemalloc or args.mallinfo:
        tm = out / "probe"
        tm.mkdir(exist_ok=True)
        (tm / "sitecustomize.py").write_text(SITECUSTOMIZE)
        extra_env.update(PYTHONPATH=os.pathsep.join([str(tm.resolve()), os.environ.get("PYTHONPATH", "")]),
                         MSDNET_SOAK_PROBE_DIR=str(tm.resolve()),
                         MSDNET_SOAK_TRACEMALLOC="1" if args.tracemalloc else "")
    samples = load_samples(args.data_dir, limit=args.images)
    signal.signal(signal.SIGTERM, _interrupt)  # stop the server and write what was sampled
    seconds = args.minutes * 60
    with ServerProcess.msdnet(env=extra_env) as srv:
        rate, how = args.rate, ""
        if rate is None:
            cap = args.capacity or _measure_capacity(srv, samples)
            rate, how = round(args.load * cap, 1), f" ({100 * args.load:g}% of a capacity of {cap:g} requests/s)"
        print(f"[soak {time.strftime('%H:%M:%S')}] server pid {srv.proc.pid}, {rate:g} requests/s for "
              f"{args.minutes:g} min", flush=True)
        tally = {"requests": 0, "ok": 0, "p99_ms": [], "statuses": {}}
        stop = threading.Event()
        t0 = time.monotonic()
        sampler = Sampler(srv.proc.pid, srv.url, args.interval, t0)
        sampler.start()
        try:
            between = None
            if args.tracemalloc or args.mallinfo:  # idle the server (no request in flight), then probe

                def between():
                    time.sleep(3.0)
                    for sig, on in ((signal.SIGUSR1, args.tracemalloc), (signal.SIGUSR2, args.mallinfo)):
                        if on:
                            os.kill(srv.proc.pid, sig)
                            time.sleep(1.0)
            _load(srv.url, samples, rate, seconds, args.chunk, args.timeout, tally, stop, between)
        except KeyboardInterrupt:
            print("[soak] interrupted: writing what was sampled", flush=True)
        finally:
            stop.set()
            sampler.stop()
        data = sampler.samples
    write_csv(data, out / "soak.csv")
    p99 = [v for v in tally["p99_ms"] if np.isfinite(v)]
    meta = {"argv": " ".join(argv if argv is not None else sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
            "cpus": os.cpu_count(), "env": ", ".join(f"`{k}={v}`" for k, v in env.items()), "rate": rate,
            "rate_how": how, "interval_s": args.interval,
            "load_summary": f"{tally['requests']:,} requests sent, {tally['ok']:,} answered 200, statuses "
                            f"{json.dumps(tally['statuses'])}, p99 per {args.chunk:g}-s chunk "
                            f"{min(p99, default=float('nan')):.0f}-{max(p99, default=float('nan')):.0f} ms"}
    fig = finish(data, args.warmup_minutes * 60, meta, out)
    return 0 if fig["plateau"] else 1


if __name__ == "__main__":
    sys.exit(main())
