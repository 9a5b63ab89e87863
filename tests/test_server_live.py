"""A real uvicorn process (``msdnet serve``) on a tiny model: the event loop
stays free during a large /batch, overload gives 504 on expired deadlines,
SIGTERM drains in-flight work, and bad settings fail fast."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.live import LiveServer

pytestmark = pytest.mark.integration


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    # Batch 1 and no early exits make steps slow and many: a loaded model thread.
    with LiveServer(tiny_checkpoint, {"MSDNET_MAX_BATCH_SIZE": "1", "MSDNET_MAX_BATCH_IMAGES": "256",
                                      "MSDNET_MAX_QUEUE_SIZE": "4096"}) as srv:
        yield srv


def test_healthz_answers_fast_while_a_large_batch_runs(server):
    images = [base64.b64encode(png(i)).decode() for i in range(256)]
    result = {}

    def big():
        result["r"] = httpx.post(server.url + "/batch", json={"images": images, "flops_budget": 1e12}, timeout=120)

    t = threading.Thread(target=big)
    t.start()
    time.sleep(0.3)
    times = []
    with httpx.Client(base_url=server.url) as c:
        while t.is_alive() and len(times) < 40:
            t0 = time.perf_counter()
            assert c.get("/healthz").status_code == 200
            times.append(time.perf_counter() - t0)
            time.sleep(0.02)
    t.join()
    assert result["r"].status_code == 200 and len(times) >= 5
    assert max(times) < 0.050, max(times)


def test_expired_deadline_is_504_and_spends_nothing(server):
    images = [base64.b64encode(png(i)).decode() for i in range(200)]
    flooder = threading.Thread(target=lambda: httpx.post(server.url + "/batch", json={"images": images,
                                                                                      "flops_budget": 1e12},
                                                          timeout=120))
    flooder.start()
    time.sleep(0.2)
    before = httpx.get(server.url + "/metrics").text
    r = httpx.post(server.url + "/classify", json={"image": base64.b64encode(png(7)).decode(), "deadline_ms": 1})
    after = httpx.get(server.url + "/metrics").text
    flooder.join()
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"

    def value(text, name):
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    spent = 'msdnet_flops_total{endpoint="/classify"}'
    assert value(after, spent) == value(before, spent)
    assert value(after, "msdnet_deadline_misses_total") == value(before, "msdnet_deadline_misses_total") + 1
    ok = httpx.post(server.url + "/classify", json={"image": base64.b64encode(png(7)).decode(), "deadline_ms": 2000})
    assert ok.status_code == 200 and ok.json()["deadline_met"] is True


def wait_for(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_sigterm_drains_in_flight_requests_and_exits_0(tiny_checkpoint, tmp_path):
    """SIGTERM arrives while a request is held inside the model step (a test
    hook, ``tests.held_serve``); the server stops accepting, lets it finish, answers 200
    and exits 0."""
    srv = LiveServer(tiny_checkpoint, {"MSDNET_DRAIN_TIMEOUT_S": "30"})
    assert srv.cmd[2:4] == ["server.cli", "serve"]
    srv.cmd = [sys.executable, "-m", "tests.held_serve", str(tmp_path), *srv.cmd[4:]]
    result = {}

    def post():
        try:
            result["r"] = httpx.post(srv.url + "/classify", content=png(1), headers={"content-type": "image/png"},
                                     timeout=60)
        except httpx.HTTPError as exc:
            result["error"] = exc

    with srv:
        t = threading.Thread(target=post)
        t.start()
        wait_for((tmp_path / "held").exists, "the request to reach the model step")
        srv.proc.send_signal(signal.SIGTERM)
        # Logged once uvicorn has stopped accepting and starts its graceful wait (after a fixed 0.1 s pause).
        wait_for(lambda: "Waiting for connections to close" in srv.read_log(), "uvicorn's graceful wait")
        assert srv.proc.poll() is None  # still draining: the request is in flight
        (tmp_path / "release").touch()
        t.join(60)
        code = srv.stop(60)
    assert "error" not in result, result.get("error")
    assert result["r"].status_code == 200 and result["r"].json()["exit"] >= 1
    assert code == 0, srv.log[-2000:]


def test_bad_settings_and_checkpoints_fail_fast_with_one_line(tmp_path, tiny_checkpoint):
    env = {**os.environ}
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    for args, words in ((["--workers", "2"], "workers must be 1"), (["--checkpoint", str(bad)], "not a readable"),
                        (["--checkpoint", str(tmp_path / "none.pt")], "not found")):
        out = subprocess.run([sys.executable, "-m", "server.cli", "serve", *args], env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_structured_logs_carry_the_request_id(tiny_checkpoint):
    import json

    with LiveServer(tiny_checkpoint) as srv:
        r = httpx.post(srv.url + "/classify", content=png(1), headers={"content-type": "image/png",
                                                                          "x-request-id": "abc123"})
        assert r.headers["x-request-id"] == "abc123"
        time.sleep(0.2)
        lines = [json.loads(line) for line in srv.read_log().splitlines() if line.startswith("{")]
    mine = [entry for entry in lines if entry.get("request_id") == "abc123"]
    assert mine and mine[0]["path"] == "/classify" and mine[0]["status"] == 200 and mine[0]["latency_ms"] > 0
