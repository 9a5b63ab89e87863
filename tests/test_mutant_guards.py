"""Tests that kill mutants of ``tests/mutants/catalogue.py`` no other fast test kills.

In-process app (FastAPI's TestClient) on the tiny model. No timing race: where
time matters, a step is made slower than a deadline by a sleep (a lower bound on
elapsed time), never assumed faster than one.
"""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

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
    service = client.app.state.service
    real = service.decode

    def slow(data):
        time.sleep(0.4)  # at least 400 ms: past the 150 ms deadline whatever the CPU
        return real(data)

    monkeypatch.setattr(service, "decode", slow)
    misses = service.metrics.deadline_misses._value.get()
    flops = service.metrics.flops.labels(endpoint="/classify")._value.get()
    r = client.post("/classify", json={"image": base64.b64encode(png(1)).decode(), "deadline_ms": 150})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "deadline_exceeded"
    assert service.metrics.deadline_misses._value.get() == misses + 1
    assert service.metrics.flops.labels(endpoint="/classify")._value.get() == flops  # nothing computed
    monkeypatch.undo()
    # The same request with a deadline the sleep cannot use up is served.
    monkeypatch.setattr(service, "decode", slow)
    r = client.post("/classify", json={"image": base64.b64encode(png(1)).decode(), "deadline_ms": 60_000})
    assert r.status_code == 200 and r.json()["deadline_met"] is True, r.text
