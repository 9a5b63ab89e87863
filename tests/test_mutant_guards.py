"""Tests that kill mutants of ``tests/mutants/catalogue.py`` no other fast test kills.

In-process app (FastAPI's TestClient) on the tiny model. No timing race: where
time matters, a step is made slower than a deadline by a sleep (a lower bound on
elapsed time), never assumed faster than one.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from server.http import decoding, params
from server.http.app import create_app
from server.settings import Settings
from tests.inprocess import ready_client


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    with ready_client(tiny_checkpoint, controller=False, access_log=False) as c:
        yield c


def test_slow_decoding_counts_against_the_deadline(client, monkeypatch):
    """The deadline runs from the request's arrival, decoding included: a decode
    that takes longer than the whole deadline leaves no time for exit 1 (504),
    and the miss is counted. Mutant ``deadline-from-after-decode``."""
    service = client.app.state.engine
    real = decoding.decode_image

    def slow(*args):
        time.sleep(0.4)  # at least 400 ms: past the 150 ms deadline whatever the CPU
        return real(*args)

    monkeypatch.setattr(decoding, "decode_image", slow)
    misses = service.metrics.deadline_misses._value.get()
    flops = service.metrics.flops.labels(endpoint="/classify")._value.get()
    r = client.post("/classify", json={"image": base64.b64encode(png(1)).decode(), "deadline_ms": 150})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "deadline_exceeded"
    assert service.metrics.deadline_misses._value.get() == misses + 1
    assert service.metrics.flops.labels(endpoint="/classify")._value.get() == flops  # nothing computed
    monkeypatch.undo()
    # The same request with a deadline the sleep cannot use up is served.
    monkeypatch.setattr(decoding, "decode_image", slow)
    r = client.post("/classify", json={"image": base64.b64encode(png(1)).decode(), "deadline_ms": 60_000})
    assert r.status_code == 200 and r.json()["deadline_met"] is (r.json()["latency_ms"] <= 60_000), r.text


def test_non_utf8_request_id_bytes_reach_the_app_unchanged_and_never_fail(tiny_checkpoint):
    """Header bytes are decoded as Latin-1: ``\\xff\\xfe`` (not UTF-8) in X-Request-ID
    gets a generated id, and a safe id is echoed. Through httpx's ASGI transport,
    which passes header bytes as sent (Starlette's TestClient re-encodes them as
    UTF-8, so it cannot send these bytes). Mutant ``http-request-id-utf8``."""
    assert params.request_id(b"\xff\xfe") != "\xff\xfe" and len(params.request_id(b"\xff\xfe")) == 16
    assert params.request_id(b"abc-1:x.y_z") == "abc-1:x.y_z"
    app = create_app(Settings(checkpoint=tiny_checkpoint))  # no lifespan: /healthz needs no model

    async def get(request_id: bytes) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.get("/healthz", headers={"X-Request-ID": request_id})

    r = asyncio.run(get(b"\xff\xfe"))
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert len(r.headers["x-request-id"]) == 16 and r.headers["x-request-id"].isalnum()
    r = asyncio.run(get(b"req-42"))
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
