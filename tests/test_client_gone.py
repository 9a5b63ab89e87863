"""Issue 25, goal 5: no work for a client that has gone.

A real ``msdnet serve`` (one process, and 2 HTTP workers + the engine) whose
model steps are held by a test hook (``tests.held_serve``): a request's image
sits in its block-1 step, its client closes the connection, the step is
released, and the image runs no further block (its thresholds would have taken
it to the last exit), counted by ``msdnet_cancelled_images_total``.
"""

from __future__ import annotations

import io
import re
import socket
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from model.checkpoint import load
from tests.live import LiveServer


def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def metric(text: str, name: str) -> float:
    """The sum of every sample of ``name`` in a Prometheus exposition (0 if absent)."""
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def wait_for(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_client_that_leaves_mid_request_gets_no_further_block(tiny_checkpoint, tmp_path, workers):
    last = load(tiny_checkpoint).exit_flops(lazy=True)[-1]
    # Target = the last exit's cost: every image would run every block, unless its client leaves.
    srv = LiveServer(tiny_checkpoint, {"MSDNET_TARGET_FLOPS": str(last), "MSDNET_WORKERS": str(workers)})
    srv.cmd = [sys.executable, "-m", "tests.held_serve", str(tmp_path), *srv.cmd[4:]]
    with srv:
        body = png()
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for((tmp_path / "held").exists, "the image to reach its block-1 step")
        sock.close()  # the client gives up while block 1 runs

        def scrape() -> str:
            return httpx.get(srv.url + "/metrics", timeout=10).text

        wait_for(lambda: metric(scrape(), "msdnet_client_gone_requests_total") == 1, "the engine to hear it")
        (tmp_path / "release").touch()
        wait_for(lambda: metric(scrape(), "msdnet_cancelled_images_total") == 1, "the image to be dropped")
        text = scrape()
        assert metric(text, 'msdnet_batch_size_count{block="1"}') == 1
        assert metric(text, 'msdnet_batch_size_count{block="2"}') == 0  # no further block ran
        assert metric(text, "msdnet_exits_total") == 0  # nothing answered, nothing charged
        assert metric(text, 'msdnet_requests_total{endpoint="/classify",status="499"}') == 1
        # The server goes on answering others (the hold is released for good now).
        r = httpx.post(srv.url + "/classify", content=body, headers={"content-type": "image/png"}, timeout=60)
        assert r.status_code == 200 and r.json()["exit"] == 3
        assert srv.stop(60) == 0
