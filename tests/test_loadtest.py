"""Smoke tests of the load tests (loadtest/): the open-loop driver against a real
server, ``python -m loadtest.bench --smoke`` and Locust headless, all on a tiny
checkpoint and generated Fashion-MNIST-shaped images. About a minute in all."""

from __future__ import annotations

import csv
import gc
import http.server
import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import make_fashion_dir

from model.checkpoint import load

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # loadtest/ is not an installed package; plain `pytest` does not add the cwd

from loadtest import openloop as ol  # noqa: E402
from loadtest.samples import load_samples  # noqa: E402
from loadtest.servers import ServerProcess  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_fashion_dir(tmp_path_factory.mktemp("fashion"), n_train=20, n_test=100)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with ServerProcess.msdnet(tiny_checkpoint, env={"MSDNET_WARMUP_ROUNDS": "1"}) as srv:
        yield srv


def test_schedule_is_bounded_by_count_and_time():
    t = ol.schedule(100.0, 2.0, 50)
    assert len(t) == 50 and t[0] == 0.0 and (t[1:] >= t[:-1]).all()
    c = ol.schedule(10.0, 1.0, 1000, arrivals="constant")
    assert len(c) == 10 and c[-1] == pytest.approx(0.9)
    p = ol.schedule(200.0, 10.0, 100_000, seed=1)
    assert p[-1] < 10.0 and len(p) == pytest.approx(2000, rel=0.1)  # Poisson: about rate x duration


def test_loopback_only():
    for url in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:80", "http://127.0.0.2:9"):
        ol.check_loopback(url)
    for url in ("http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:8000"):
        with pytest.raises(ValueError, match="loopback"):
            ol.check_loopback(url)
    with pytest.raises(ValueError):
        ol.run("http://192.168.1.1:8000", lambda i: ol.Request("/", b"", "text/plain"), 1.0, 0.1)


def test_open_loop_records_against_a_real_server(server, tiny_checkpoint, data_dir):
    flops = load(tiny_checkpoint).exit_flops(lazy=True)
    samples = load_samples(data_dir, limit=50)
    result = ol.run(server.url, ol.classify_requests(samples, deadlines_ms=[2000, 5000]), 30.0, 2.0,
                    warmup_s=0.3, timeout_s=10.0)
    recs = result.records
    assert 30 <= len(recs) <= 130
    assert [r.index for r in recs] == list(range(len(recs)))
    assert sum(r.warmup for r in recs) >= 1 and all(r.warmup == (r.scheduled_s < 0.3) for r in recs)
    for r in recs:
        assert r.status == 200, r
        assert r.latency_s > 0  # how long is a benchmark figure, never a test's bar
        assert r.latency_s == pytest.approx(r.done_s - r.scheduled_s)
        assert r.sent_s >= r.scheduled_s - 1e-3  # never sent early
        assert 1 <= r.exit <= 3 and r.flops == flops[r.exit - 1]
        assert r.correct == (r.predicted == r.label) and r.label == samples[r.index % 50].label
        assert r.deadline_ms in (2000, 5000)
        # the server's verdict, read back as it gave it (at the 1 ms boundary either is right)
        assert r.deadline_met is (r.server_latency_ms <= r.deadline_ms) or abs(r.server_latency_ms - r.deadline_ms) < 1
        assert 0 < r.server_latency_ms <= r.latency_s * 1e3 + 1
    s = ol.summarise(result.scored(), 2.0)
    assert s["ok"] == s["requests"] and s["error_share"] == 0
    assert 0 < s["p50_ms"] <= s["p99_ms"] <= s["max_ms"]
    assert s["offered_rps"] == pytest.approx(30, rel=0.5)
    assert 0 <= s["accuracy"] <= 1 and sum(s["exits"].values()) == s["ok"]


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    """One request at a time, 100 ms each: a server slower than the offered load."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        time.sleep(0.1)
        body = b'{"exit": 1, "flops": 1, "class_id": 0}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Server(http.server.HTTPServer):
    request_queue_size = 64  # all 20 connections wait in the backlog, none is dropped


def test_latency_counts_from_the_scheduled_time():
    """20 requests/s for 1 s into a server that does 10/s: the queue grows, and the
    open-loop latencies show it (a closed-loop client would see about 100 ms each)."""
    srv = _Server(("127.0.0.1", 0), _SlowHandler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        result = ol.run(url, lambda i: ol.Request("/classify", b"x", "image/png", label=0), 20.0, 1.0,
                        arrivals="constant", timeout_s=10.0)
    finally:
        srv.shutdown()
    lat = sorted(r.latency_s for r in result.records)
    assert len(lat) == 20 and all(r.status == 200 and r.correct for r in result.records)
    assert lat[-1] > 0.8  # about 20 x 0.1 s of work, minus the 0.95 s of arrivals
    assert ol.summarise(result.records)["p50_ms"] > 300


class _FreezeCountHandler(_SlowHandler):
    """Answers at once, noting how many objects the garbage collector has frozen."""

    seen: list[int] = []

    def do_POST(self):
        self.seen.append(gc.get_freeze_count())
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = b'{"exit": 1, "flops": 1, "class_id": 0}'
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_the_client_keeps_its_own_objects_out_of_collections_while_it_measures():
    # A full collection over the benchmark process's objects paused the client for 80-100 ms, which
    # open-loop timing charged to the server: they are frozen for the run and thawed after it.
    gc.unfreeze()  # whatever earlier tests in this process froze (an app's start-up does)
    keep = [{"i": i} for i in range(20_000)]  # objects the caller holds, as the benchmark's torch and samples
    srv = _Server(("127.0.0.1", 0), _FreezeCountHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        ol.run(url, lambda i: ol.Request("/x", b"x", "image/png"), 50.0, 0.2, arrivals="constant", timeout_s=10.0)
        assert len(_FreezeCountHandler.seen) == 10
        assert all(n >= len(keep) for n in _FreezeCountHandler.seen)  # the caller's objects, frozen throughout
        assert gc.get_freeze_count() == 0  # thawed after the run
        # A caller that froze its own objects (as msdnet-serve's start-up does) keeps them frozen.
        gc.freeze()
        frozen = gc.get_freeze_count()
        ol.run(url, lambda i: ol.Request("/x", b"x", "image/png"), 50.0, 0.1, arrivals="constant", timeout_s=10.0)
        assert frozen > len(keep) and gc.get_freeze_count() > len(keep)  # not thawed (0 if it were)
    finally:
        srv.shutdown()
        gc.unfreeze()


def test_bench_smoke_writes_the_report(tiny_checkpoint, data_dir, tmp_path):
    # The peers' own smoke runs in tests/test_peers.py; here msdnet-serve's two configurations.
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "loadtest.bench", "--out", str(out), "--smoke",
                           "--checkpoint", str(tiny_checkpoint), "--data-dir", str(data_dir),
                           "--servers", "msdnet", "msdnet-last", "--json", str(tmp_path / "raw.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "BENCHMARKS.md").read_text()
    for heading in ("## Goals (issue 12)", "## 1. Capacity against LitServe and Ray Serve",
                    "## 2. Machine use and CPU per request by stage", "## 3. Deadlines", "## 4. No stall under floods",
                    "## 5. The per-block engine against the whole network", "## 6. Early-exit gain",
                    "## 7. Budget controller", "### Tracking", "### Accuracy on steady traffic",
                    "Smoke run", "multiply-accumulates", "python -m loadtest.bench"):
        assert heading in md, heading
    raw = json.loads((tmp_path / "raw.json").read_text())
    # Every part measured something real: answers, profile samples, probes, timings.
    assert {k for k in raw["a"]["servers"]} == {"msdnet-default", "msdnet-last-default"}
    assert all(e["at_capacity"]["ok"] > 0 for s in raw["a"]["servers"].values() for e in s["encodings"].values())
    assert all(sum(r["samples"].values()) > 0 for r in raw["s"]["rows"])
    assert raw["e"]["answered"] == raw["e"]["requests"] > 0 and 0 <= raw["e"]["served_top1"] <= 1
    assert raw["f"]["healthz"]["n"] > 0 and raw["f"]["rejected_deadline"] > 0
    assert all(r["ORT, per block"]["wall_s"] > 0 for by_b in raw["d"]["results"].values() for r in by_b.values()
               if "ORT, per block" in r)
    for name in ("bench_capacity.png", "bench_latency.png", "bench_stages.png", "bench_controller.png",
                 "bench_deadlines.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert f"]({name})" in md
    # The report re-rendered from the run's JSON holds the same measurements.
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, "-m", "loadtest.bench", "--out", str(again), "--render",
                           str(tmp_path / "raw.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rendered = [ln for ln in (again / "BENCHMARKS.md").read_text().splitlines() if not ln.startswith("| report |")]
    assert rendered == md.splitlines()
    assert all((again / name).is_file() for name in ("bench_capacity.png", "bench_stages.png"))


def test_locust_headless(server, data_dir, tmp_path):
    # Locust runs in its own process: importing it here would monkey-patch this
    # one with gevent after threads exist (a deadlock on the import lock).
    if importlib.util.find_spec("locust") is None:
        pytest.fail("locust is missing: pip install -e '.[test]' (.ci/run does)")
    prefix = tmp_path / "locust"
    env = {**os.environ, "MSDNET_LOADTEST_DATA_DIR": str(data_dir), "MSDNET_LOADTEST_IMAGES": "100"}
    proc = subprocess.run([sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless",
                           "-u", "5", "-r", "5", "-t", "5s", "--host", server.url, "--csv", str(prefix),
                           "--only-summary", "--exit-code-on-error", "0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(f"{prefix}_stats.csv") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    ok = {name: int(r["Request Count"]) - int(r["Failure Count"]) for name, r in rows.items()}
    assert ok["Aggregated"] >= 10, rows
    assert ok.get("/classify [png]", 0) >= 1 and ok.get("/classify [json, deadline]", 0) >= 1, rows
    assert int(rows["Aggregated"]["Failure Count"]) <= int(rows["Aggregated"]["Request Count"]) // 10
    assert not math.isnan(float(rows["Aggregated"]["Average Response Time"]))
