"""No stall: ``/healthz`` and a normal ``/classify`` while two floods arrive.

Starts ``msdnet serve`` (its defaults, or ``--workers``), then for ``--seconds``:

- flood 1: ``/batch`` requests of 4 RGBA 4096x4096 PNGs (large to decode, small
  on the wire), ``--batch-clients`` at a time, back to back;
- flood 2: bursts of 50 ``/classify`` requests of a 2048x2048 PNG whose
  ``deadline_ms=1`` has passed by the time they are read (they must cost no decoding);
- probes: ``GET /healthz`` every 20 ms and ``POST /classify`` of a real 28x28 test
  image every 50 ms, each timed from its send, each in its own process (the
  floods' 50 client threads would otherwise delay the probes' own timing).

Reports p50/p99/max of both probes (goal: ``/healthz`` p99 < 50 ms, ``/classify``
p99 < 100 ms), the floods' status counts, and the server's ``msdnet_rejected_requests_total
{reason="deadline"}``. All requests go to 127.0.0.1 and the run is bounded in time.

    python3 -m loadtest.stall --out DIR [--workers 2] [--seconds 20]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from ..common import log
from ..samples import load_samples
from ..servers import TreeServer


def big_rgba_png(side: int = 4096) -> bytes:
    """A flat RGBA picture: cheap to send (tens of KB), 64 MB of pixels to decode."""
    buf = io.BytesIO()
    Image.new("RGBA", (side, side), (120, 30, 200, 128)).save(buf, "PNG")
    return buf.getvalue()


def big_grey_png(side: int = 2048) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side), 90, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def percentiles(ms: list[float]) -> dict:
    if not ms:
        return {"n": 0}
    a = np.asarray(ms)
    return {"n": len(ms), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "max_ms": float(a.max())}


def probe(url: str, path: str, every_s: float, seconds: float, small_png: bytes, conn) -> None:
    """A probe in its own process (the floods' client threads must not delay its
    timing): ``path`` every ``every_s`` seconds for ``seconds``; sends back
    (latencies in ms, {status: count})."""
    latencies, codes = [], Counter()
    with httpx.Client(base_url=url, timeout=30) as c:
        start = nxt = time.monotonic()
        while time.monotonic() - start < seconds:
            t0 = time.monotonic()
            if path == "/healthz":
                r = c.get(path)
            else:
                r = c.post(path, content=small_png, headers={"content-type": "image/png"})
            codes[r.status_code] += 1
            latencies.append(1e3 * (time.monotonic() - t0))
            nxt += every_s
            time.sleep(max(0.0, nxt - time.monotonic()))
    conn.send((latencies, dict(codes)))


def run(url: str, seconds: float, batch_clients: int, small_png: bytes) -> dict:
    stop = threading.Event()
    lock = threading.Lock()
    health, classify, statuses = [], [], Counter()
    rgba, grey = big_rgba_png(), big_grey_png()

    def record(kind: str, code: int) -> None:
        with lock:
            statuses[f"{kind} {code}"] += 1

    def batch_flood() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            files = [("files", (f"{i}.png", rgba, "image/png")) for i in range(4)]
            while not stop.is_set():
                record("batch", c.post("/batch", files=files).status_code)

    def expired_flood() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                threads = [threading.Thread(target=lambda: record("expired", c.post(
                    "/classify?deadline_ms=1", content=grey, headers={"content-type": "image/png"}).status_code))
                    for _ in range(50)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                stop.wait(0.2)

    spawn = multiprocessing.get_context("spawn")
    probes = []
    for path, every in (("/healthz", 0.02), ("/classify", 0.05)):
        mine, theirs = spawn.Pipe()
        proc = spawn.Process(target=probe, args=(url, path, every, seconds, small_png, theirs))
        proc.start()
        probes.append((path, proc, mine))
    workers = [threading.Thread(target=batch_flood) for _ in range(batch_clients)]
    workers.append(threading.Thread(target=expired_flood))
    for t in workers:
        t.start()
    for path, proc, conn in probes:
        latencies, codes = conn.recv()  # the probe's run is bounded by ``seconds``
        proc.join(30)
        (health if path == "/healthz" else classify).extend(latencies)
        for code, n in codes.items():
            statuses[f"probe {path} {code}"] += n
    stop.set()
    for t in workers:
        t.join(120)
    metrics = httpx.get(url + "/metrics").text
    refused = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith('msdnet_rejected_requests_total{reason="deadline"}'))
    return {"healthz": percentiles(health), "classify": percentiles(classify), "statuses": dict(statuses),
            "rejected_deadline": refused}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m loadtest.stall", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, help="MSDNET_WORKERS (default: the server's default)")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--batch-clients", type=int, default=2)
    p.add_argument("--data-dir")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"MSDNET_ACCESS_LOG": "false", "MSDNET_LOG_LEVEL": "warning"}
    if args.workers:
        env["MSDNET_WORKERS"] = str(args.workers)
    small = load_samples(args.data_dir, limit=1)[0].png
    with TreeServer([shutil.which("python3") or "python3", "-m", "server.cli", "serve"], env, name="stall") as srv:
        res = run(srv.url, args.seconds, args.batch_clients, small)
    res.update(workers=args.workers or "default", seconds=args.seconds, batch_clients=args.batch_clients)
    (out / "stall.json").write_text(json.dumps(res, indent=1))
    log(f"/healthz {res['healthz']}  /classify {res['classify']}  {res['statuses']}  "
        f"refused for deadline: {res['rejected_deadline']:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
