"""Issue 25 through HTTP (in-process app, tiny checkpoint): what a client sees of
the latency objective. The loop itself is tested in tests/test_objective.py;
here its state is set directly and the answers are checked. FLOPs are
multiply-accumulates (MSDNet paper convention)."""

from __future__ import annotations

import base64
import io
import json
import re
import time

import numpy as np
import pytest
from PIL import Image

from tests.inprocess import ready_client


def png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)} (\S+)$", text, re.M))


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    # A 10-s objective: no load a test makes comes near it, so the state is what each test sets.
    with ready_client(tiny_checkpoint, latency_slo_ms=10_000) as c:
        yield c


def test_without_pressure_answers_are_at_the_configured_target_and_budget_says_why(client):
    svc = client.app.state.engine
    r = client.post("/classify", content=png(), headers={"content-type": "image/png"}).json()
    assert r["degraded"] is False and r["target_flops"] == svc.keeper.target
    b = client.get("/budget").json()
    assert b["in_force_flops"] == b["target_flops"] == svc.keeper.target
    assert b["objective"]["objective_ms"] == 10_000 and b["objective"]["state"] == "steady"
    assert "within the objective" in b["objective"]["reason"]
    assert metric(client.get("/metrics").text, "msdnet_latency_objective_seconds") == 10.0


def test_the_forecast_wait_is_the_queued_work_over_the_model_threads(client):
    svc = client.app.state.engine
    sched = svc.runner.scheduler
    size = sched.max_batch_size
    per_image = [sched.latency.estimate(b, size) / size for b in range(svc.num_exits)]
    assert svc.forecast_wait([10, 0, 4]) == pytest.approx((10 * per_image[0] + 4 * per_image[2]) / 1)
    assert svc.forecast_wait([0, 0, 0]) == 0.0


def test_a_degraded_target_is_said_in_every_answer(client):
    svc = client.app.state.engine
    exit1 = svc.exit_flops[0]
    svc.keeper.set_in_force(exit1)  # what the loop does when the queue breaks the objective
    try:
        r = client.post("/classify", content=png(1), headers={"content-type": "image/png"}).json()
        assert r["degraded"] is True and r["target_flops"] == exit1 and r["exit"] == 1
        assert client.get("/budget").json()["in_force_flops"] == exit1
        assert metric(client.get("/metrics").text, "msdnet_target_in_force_flops_per_request") == exit1
    finally:
        svc.keeper.set_in_force(float("inf"))


def test_at_exit_1_a_queue_over_the_objective_refuses_at_once_before_decoding(client, monkeypatch):
    svc = client.app.state.engine
    monkeypatch.setattr(svc, "forecast_wait", lambda depths=None: 7.0)  # a 7-s queue ahead (refused over 6 s)
    monkeypatch.setattr(svc.objective, "span", 0.0)  # and every image already at exit 1
    before = metric(client.get("/metrics").text, 'msdnet_rejected_requests_total{reason="objective"}')
    r = client.post("/classify", content=b"not even an image", headers={"content-type": "image/png"})
    assert r.status_code == 503 and r.headers["retry-after"] == "7"  # not decoded: no 400 for the bad bytes
    body = r.json()["error"]
    assert body["code"] == "saturated" and body["forecast_wait_ms"] == 7000.0 and "exit 1" in body["message"]
    b = client.post("/batch", json={"images": [base64.b64encode(png()).decode()]})
    assert b.status_code == 503 and b.json()["error"]["code"] == "saturated"
    v2 = client.post("/v2/models/msdnet/infer", content=json.dumps({"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(png()).decode()]}]}))
    assert v2.status_code == 503 and "queueing delay" in v2.json()["error"]
    # A request with its own deadline keeps it: taken when the wait fits, refused when it cannot.
    ok = client.post("/classify?deadline_ms=9000", content=png(), headers={"content-type": "image/png"})
    assert ok.status_code == 200
    late = client.post("/classify?deadline_ms=5000", content=png(), headers={"content-type": "image/png"})
    assert late.status_code == 504 and late.json()["error"]["forecast_wait_ms"] == 7000.0
    assert "cannot be met" in late.json()["error"]["message"]
    after = metric(client.get("/metrics").text, 'msdnet_rejected_requests_total{reason="objective"}')
    assert after - before == 3


def test_above_exit_1_the_same_queue_degrades_instead_of_refusing(client, monkeypatch):
    svc = client.app.state.engine
    monkeypatch.setattr(svc, "forecast_wait", lambda depths=None: 7.0)
    assert svc.objective.span > 0
    r = client.post("/classify", content=png(), headers={"content-type": "image/png"})
    assert r.status_code == 200


def test_the_front_door_refuses_inference_when_this_process_is_behind(client):
    door = client.app.state.front_door
    fall, door.fall = door.fall, 0.0  # hold the share where the test puts it (the lag watcher keeps sampling)
    try:
        door.share = 1.0
        r = client.post("/classify", content=png(), headers={"content-type": "image/png"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "saturated" and "behind" in r.json()["error"]["message"]
        assert client.get("/budget").status_code == 200 and client.get("/readyz").status_code == 200
        door.share = 0.0
        assert client.post("/classify", content=png(), headers={"content-type": "image/png"}).status_code == 200
    finally:
        door.fall = fall


def test_a_refusal_ends_when_the_queue_is_gone_even_with_no_request_let_in(client):
    """Every request refused: no block step runs, yet the loop steps on (its ticker),
    sees the empty queue and lets requests in again."""
    svc = client.app.state.engine
    with svc._objective_lock:  # the state a long overload leaves: every image at exit 1, a deep queue seen
        svc.objective.span, svc.objective.wait_s, svc.objective.refusing = 0.0, 9.0, True
    assert client.post("/classify", content=png(), headers={"content-type": "image/png"}).status_code == 503
    deadline = time.monotonic() + 60
    while client.get("/budget").json()["objective"]["wait_ms"] > 4000:  # refused above 4.5 s (45% of 10 s)
        assert time.monotonic() < deadline, "the refusal never ended"
        time.sleep(0.05)
    r = client.post("/classify", content=png(), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
