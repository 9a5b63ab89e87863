"""A real uvicorn process (``msdnet serve``) on a tiny model: SIGTERM drains
in-flight work, bad settings fail fast, logs carry the request id. (The event
loop staying free during a /batch and 504 on expired deadlines are checked with
a held model step in tests/test_robustness.py, independent of the CPU's speed.)"""

from __future__ import annotations

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
    for args, words in ((["--workers", "0"], "greater than or equal to 1"),
                        (["--checkpoint", str(bad)], "not a readable"),
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
