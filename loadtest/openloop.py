"""Open-loop load driver: requests at a fixed arrival rate, latency from the
*scheduled* send time.

A closed-loop client (wrk, a locust user waiting for its answer) sends less when
the server slows down, so a slow server hides its own tail ("coordinated
omission"). Here arrival times are drawn up front (Poisson, or constant spacing)
and each request's latency runs from its scheduled time to its answer, so any
queueing, in the server or in the client, counts.

Bounded: at most ``max_requests`` requests, none scheduled after
``warmup_s + duration_s``, each given up after ``timeout_s`` (recorded with
status 0). Loopback targets only.

Client: aiohttp (installed with ``tritonclient[http]`` of the test extras; its
C HTTP parser costs the shared CPUs less) or httpx.

    python -m loadtest.openloop --url http://127.0.0.1:8000 --rate 200 --duration 10 --deadline-ms 100

FLOPs in the records are the server's: multiply-accumulates of convs and linears
(MSDNet paper convention), cumulative to the exit the image left at.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import numpy as np


@dataclass(frozen=True)
class Request:
    """One HTTP request to send: ``POST url + path`` with ``body``."""

    path: str
    body: bytes
    content_type: str
    label: int | None = None          # true class, to score the answer
    deadline_ms: float | None = None  # the deadline the request carries (for scoring)
    tag: str = ""                     # free text kept on the record (e.g. a phase name)
    request_id: str | None = None     # sent as X-Request-ID (None: the server makes one)


@dataclass
class Record:
    """What happened to one request. Times in seconds from the run's start."""

    index: int
    scheduled_s: float                # when it was due to be sent
    sent_s: float                     # when the client actually sent it
    done_s: float                     # when its answer (or error) arrived
    latency_s: float                  # done_s - scheduled_s
    status: int                       # HTTP status; 0 = timeout or connection error
    warmup: bool = False              # scheduled in the warm-up period (not scored)
    exit: int | None = None
    flops: int | None = None
    label: int | None = None
    predicted: int | None = None
    correct: bool | None = None
    deadline_ms: float | None = None
    deadline_met: bool | None = None  # client's view: status 200 and latency <= deadline
    server_latency_ms: float | None = None
    tag: str = ""
    error: str | None = None


@dataclass
class RunResult:
    records: list[Record]
    rate: float
    arrivals: str
    duration_s: float
    warmup_s: float
    started_unix: float
    elapsed_s: float
    meta: dict = field(default_factory=dict)

    def scored(self) -> list[Record]:
        """Records outside the warm-up period."""
        return [r for r in self.records if not r.warmup]


def check_loopback(url: str) -> None:
    """Raises ValueError unless ``url`` names a loopback host (127.0.0.0/8, ::1, localhost)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"load tests target loopback only (127.0.0.1, ::1, localhost), not {host!r}")


def schedule(rate: float, duration_s: float, max_requests: int, arrivals: str = "poisson",
             seed: int = 0) -> np.ndarray:
    """Send times (s from start) for ``rate`` requests/s over ``duration_s``,
    at most ``max_requests``: exponential gaps (Poisson) or constant ones."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    n_max = min(max_requests, int(math.ceil(rate * duration_s * 1.5)) + 16)
    if arrivals == "poisson":
        gaps = np.random.default_rng(seed).exponential(1.0 / rate, n_max)
        times = np.cumsum(gaps) - gaps[0]
    elif arrivals == "constant":
        times = np.arange(n_max) / rate
    else:
        raise ValueError(f"arrivals must be 'poisson' or 'constant', not {arrivals!r}")
    return times[times < duration_s][:max_requests]


def _parse(rec: Record, req: Request, payload: bytes) -> None:
    try:
        body = json.loads(payload)
    except ValueError:
        return
    if not isinstance(body, dict):
        return
    if rec.status == 200:
        rec.exit = body.get("exit")
        rec.flops = body.get("flops", body.get("flops_used"))
        rec.predicted = body.get("class_id")
        rec.server_latency_ms = body.get("latency_ms")
        if req.label is not None and rec.predicted is not None:
            rec.correct = rec.predicted == req.label
    elif isinstance(body.get("error"), dict):
        rec.error = body["error"].get("code")


class _AiohttpClient:
    def __init__(self, max_connections: int, timeout_s: float):
        import aiohttp

        self._aiohttp = aiohttp
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=max_connections),
            timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def post(self, url: str, body: bytes, content_type: str, headers: dict | None = None) -> tuple[int, bytes]:
        async with self.session.post(url, data=body, headers={"content-type": content_type, **(headers or {})}) as resp:
            return resp.status, await resp.read()

    async def close(self) -> None:
        await self.session.close()


class _HttpxClient:
    def __init__(self, max_connections: int, timeout_s: float):
        import httpx

        self.client = httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections))

    async def post(self, url: str, body: bytes, content_type: str, headers: dict | None = None) -> tuple[int, bytes]:
        resp = await self.client.post(url, content=body, headers={"content-type": content_type, **(headers or {})})
        return resp.status_code, resp.content

    async def close(self) -> None:
        await self.client.aclose()


CLIENTS = {"aiohttp": _AiohttpClient, "httpx": _HttpxClient}


def phased_schedule(phases: Sequence[tuple[float, float]], max_requests: int, seed: int = 0) -> np.ndarray:
    """Poisson send times (s from start) for consecutive ``(seconds, requests/s)``
    phases (a rate of 0: silence), at most ``max_requests``."""
    parts, start = [], 0.0
    for i, (seconds, rate) in enumerate(phases):
        if rate > 0:
            parts.append(start + schedule(rate, seconds, max_requests, "poisson", seed + i))
        start += seconds
    times = np.concatenate(parts) if parts else np.zeros(0)
    return times[:max_requests]


async def run_async(url: str, make_request: Callable[[int], Request], rate: float, duration_s: float,
                    max_requests: int = 100_000, arrivals: str = "poisson", seed: int = 0, warmup_s: float = 0.0,
                    timeout_s: float = 10.0, max_connections: int = 512, client: str = "aiohttp",
                    times: np.ndarray | None = None) -> RunResult:
    """Send ``make_request(i)`` at the i-th scheduled time; see the module docstring.
    ``times`` (seconds from the start, increasing) replaces the schedule drawn from
    ``rate`` (a rate that varies over the run: :func:`phased_schedule`).

    ``warmup_s`` of traffic at the same rate comes first; its records are marked
    ``warmup`` (connections open, the server's caches fill). Returns when every
    request has an answer or has timed out.
    """
    check_loopback(url)
    base = url.rstrip("/")
    if times is None:
        times = schedule(rate, warmup_s + duration_s, max_requests, arrivals, seed)
    requests = [make_request(i) for i in range(len(times))]  # built before the clock starts
    # A full collection walks every object this process holds (in the benchmark: torch, the model,
    # the samples, ~180,000 objects) and stopped sending and reading for 80-100 ms, which open-loop
    # timing then charged to the server (a 5-s trial at 600 req/s failed its p99 on that alone).
    # Frozen, they are out of the collector's sight: collections during the run walk only what the
    # run allocates.
    thaw = gc.get_freeze_count() == 0  # a caller that froze objects itself keeps them frozen
    gc.collect()
    gc.freeze()
    http = CLIENTS[client](max_connections, timeout_s)
    loop = asyncio.get_running_loop()
    records: list[Record | None] = [None] * len(times)

    async def one(i: int, due: float, t0: float) -> None:
        req = requests[i]
        sent = loop.time() - t0
        status, payload, error = 0, b"", None
        try:
            status, payload = await http.post(base + req.path, req.body, req.content_type,
                                              {"x-request-id": req.request_id} if req.request_id else None)
        except TimeoutError:
            error = "timeout"
        except Exception as exc:  # connection refused/reset: a failed request, not a crash
            error = type(exc).__name__
        done = loop.time() - t0
        rec = Record(i, due, sent, done, done - due, status, warmup=due < warmup_s, label=req.label,
                     deadline_ms=req.deadline_ms, tag=req.tag, error=error)
        _parse(rec, req, payload)
        if req.deadline_ms is not None:
            rec.deadline_met = status == 200 and rec.latency_s * 1e3 <= req.deadline_ms
        records[i] = rec

    started_unix = time.time()
    t0 = loop.time()
    tasks = []
    try:
        for i, due in enumerate(times):
            delay = t0 + due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, float(due), t0)))
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await http.close()
        if thaw:
            gc.unfreeze()
    elapsed = loop.time() - t0
    return RunResult([r for r in records if r is not None], rate, arrivals, duration_s, warmup_s,
                     started_unix, elapsed, {"url": url, "client": client, "seed": seed})


def run(url: str, make_request: Callable[[int], Request], rate: float, duration_s: float, **kw) -> RunResult:
    """Synchronous wrapper of :func:`run_async` (own event loop)."""
    return asyncio.run(run_async(url, make_request, rate, duration_s, **kw))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, taking the next higher sample (no interpolation, so
    an ``inf`` standing for a failed request is never averaged away)."""
    if len(values) == 0:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q, method="higher"))


def summarise(records: Sequence[Record], duration_s: float | None = None) -> dict:
    """Counts, latency percentiles (ms; a request that failed counts as infinitely
    slow), throughput, accuracy, exits and deadlines of ``records``."""
    n = len(records)
    ok = [r for r in records if r.status == 200]
    lat = [r.latency_s * 1e3 if r.status == 200 else float("inf") for r in records]
    statuses: dict[str, int] = {}
    for r in records:
        key = str(r.status) if r.status else (r.error or "error")
        statuses[key] = statuses.get(key, 0) + 1
    scored = [r for r in ok if r.correct is not None]
    exits: dict[str, int] = {}
    for r in ok:
        if r.exit is not None:
            exits[str(r.exit)] = exits.get(str(r.exit), 0) + 1
    flops = [r.flops for r in ok if r.flops is not None]
    dl = [r for r in records if r.deadline_ms is not None]
    span = duration_s if duration_s else (max(r.scheduled_s for r in records) - min(r.scheduled_s for r in records)
                                          if n > 1 else float("nan"))
    lag = [(r.sent_s - r.scheduled_s) * 1e3 for r in records]
    return {
        "requests": n, "ok": len(ok), "statuses": statuses, "error_share": (n - len(ok)) / n if n else float("nan"),
        "p50_ms": percentile(lat, 50), "p90_ms": percentile(lat, 90), "p99_ms": percentile(lat, 99),
        "p999_ms": percentile(lat, 99.9), "max_ms": max(lat) if lat else float("nan"),
        "offered_rps": n / span if span else float("nan"), "ok_rps": len(ok) / span if span else float("nan"),
        "accuracy": sum(r.correct for r in scored) / len(scored) if scored else None, "scored": len(scored),
        "exits": dict(sorted(exits.items(), key=lambda kv: int(kv[0]))),
        "mean_flops": float(np.mean(flops)) if flops else None,
        "deadline_requests": len(dl),
        "deadline_met_share": sum(bool(r.deadline_met) for r in dl) / len(dl) if dl else None,
        "send_lag_p99_ms": percentile(lag, 99), "send_lag_max_ms": max(lag) if lag else float("nan"),
    }


def classify_requests(samples, deadlines_ms: Sequence[float] | None = None, seed: int = 0,
                      tag: str = "") -> Callable[[int], Request]:
    """Request i: POST /classify with sample i (cycling) as a raw body of its
    content type (``image/png`` for a sample without one); with ``deadlines_ms``, a
    deadline drawn from them (``?deadline_ms=``)."""
    rng = np.random.default_rng(seed)

    def make(i: int) -> Request:
        s = samples[i % len(samples)]
        ctype = getattr(s, "content_type", "image/png")
        if deadlines_ms:
            d = float(deadlines_ms[int(rng.integers(len(deadlines_ms)))])
            return Request(f"/classify?deadline_ms={d:g}", s.png, ctype, s.label, d, tag)
        return Request("/classify", s.png, ctype, s.label, None, tag)

    return make


def main(argv: list[str] | None = None) -> int:
    from .samples import load_samples

    p = argparse.ArgumentParser(prog="python -m loadtest.openloop", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--rate", type=float, required=True, help="arrivals per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of scored traffic")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of unscored traffic first")
    p.add_argument("--max-requests", type=int, default=100_000)
    p.add_argument("--arrivals", choices=["poisson", "constant"], default="poisson")
    p.add_argument("--deadline-ms", type=float, nargs="*", help="deadline(s) to draw from; none: no deadline")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before a request counts as failed")
    p.add_argument("--client", choices=list(CLIENTS), default="aiohttp")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: Debian's)")
    p.add_argument("--images", type=int, default=10_000, help="test images to cycle through")
    p.add_argument("--records", help="write every record as JSON lines here")
    args = p.parse_args(argv)
    samples = load_samples(args.data_dir, limit=args.images)
    result = run(args.url, classify_requests(samples, args.deadline_ms), args.rate, args.duration,
                 max_requests=args.max_requests, arrivals=args.arrivals, warmup_s=args.warmup,
                 timeout_s=args.timeout, client=args.client)
    print(json.dumps(summarise(result.scored(), args.duration), indent=2))
    if args.records:
        with open(args.records, "w") as f:
            for r in result.records:
                f.write(json.dumps(asdict(r)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
