"""What the server really computes, checked against independent figures.

In-process apps (FastAPI's TestClient, lifespan run) on the tiny model with
distinct per-exit temperatures. Exits are forced by setting the service's fixed
thresholds (controller off), and the runner's ``step_hook`` holds or observes
steps on the model thread, so nothing races the CPU. Expected values come from
outside the serving path: multiply-accumulates counted by forward hooks on the
convs and linears that actually run (FLOPs = multiply-accumulates of convs and
linears, MSDNet paper convention, cumulative per exit), the model's plain
full ``forward`` for logits, and hand-computed sums for metrics.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import math
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from model.checkpoint import load
from server import errors
from server.engine.scheduler import QueueFull
from server.images import decode as decode_image
from tests.inprocess import ready_client

TEMPERATURES = [0.6, 1.7, 3.1]  # distinct, so an exit using another exit's temperature shows
INF = math.inf


def png_array(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(png_array(seed)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def ckpt_path(tiny_checkpoint, tmp_path_factory):
    ck = load(tiny_checkpoint)
    ck.calibration = dataclasses.replace(ck.calibration, temperatures=tuple(TEMPERATURES))
    path = tmp_path_factory.mktemp("behaviour") / "tiny-temps.pt"
    ck.save(path)
    return path


@pytest.fixture(scope="module")
def ck(ckpt_path):
    return load(ckpt_path)


@pytest.fixture(scope="module")
def lazy_flops(ck):
    return ck.exit_flops(lazy=True)


def app_client(path, **settings):
    """TestClient once /readyz answers 200; fails if it never does."""
    return ready_client(path, access_log=False, **settings)


def service_of(client):
    return client.app.state.engine


def force_exit(service, k: int) -> None:
    """Fixed thresholds that make every image leave at exit k (1-based)."""
    n = service.num_exits
    service.keeper.fixed_thresholds = (INF,) * (k - 1) + (0.0,) * (n - k + 1)


def offline(ck, seed: int, k: int) -> np.ndarray:
    """Temperature-scaled probabilities at exit k from the plain full forward."""
    t = ck.transforms
    x = (png_array(seed).astype(np.float32) / 255 - t.mean[0]) / t.std[0]
    with torch.no_grad():
        logits = ck.model.eval()(torch.from_numpy(x)[None, None])[k - 1]
    return torch.softmax(logits.double() / TEMPERATURES[k - 1], dim=1)[0].numpy()


class MacCounter:
    """Multiply-accumulates of the convs and linears that run (batch 1), and the
    modules of each block and classifier that were called."""

    def __init__(self, model):
        self.macs = 0
        self.called: set[nn.Module] = set()
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()]

    def _hook(self, mod, inputs, out):
        self.called.add(mod)
        if isinstance(mod, nn.Conv2d):
            self.macs += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Linear):
            self.macs += out.numel() * mod.in_features

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def client(ckpt_path):
    with app_client(ckpt_path, controller=False, max_batch_size=8) as c:
        yield c


@pytest.mark.parametrize("k", [1, 2, 3])
def test_an_exit_runs_exactly_its_blocks_with_lazy_evaluation(client, ck, lazy_flops, k):
    service = service_of(client)
    force_exit(service, k)
    model = service.runner.model
    counter = MacCounter(model)
    try:
        r = client.post("/classify", content=png(k), headers={"content-type": "image/png"})
    finally:
        counter.close()
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["exit"] == k and body["flops"] == lazy_flops[k - 1]
    # The work really done equals the lazy cost of k exits (the non-lazy one differs before the last exit).
    assert counter.macs == lazy_flops[k - 1]
    later = set()
    for b in range(k, model.num_exits):
        later |= set(model.blocks[b].modules()) | set(model.classifiers[b].modules())
    assert not (later & counter.called), "a block after the exit ran"
    probs = offline(ck, k, k)
    assert body["class_id"] == int(probs.argmax())
    assert body["confidence"] == pytest.approx(float(probs.max()), abs=1e-6)
    for t in body["top_k"]:
        assert t["probability"] == pytest.approx(float(probs[t["class_id"]]), abs=1e-6)


def test_lazy_and_full_costs_differ_for_the_tiny_model(ck):
    # Guards the test above: it could not tell lazy from full evaluation otherwise.
    full, lazy = ck.exit_flops(lazy=False), ck.exit_flops(lazy=True)
    assert lazy[0] < full[0] and lazy[1] < full[1] and lazy[-1] == full[-1]


def families(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(m: dict, name: str, **labels) -> float:
    return m[(name, tuple(sorted(labels.items())))]


def test_metrics_hold_the_answers_exits_and_costs(ckpt_path, lazy_flops):
    with app_client(ckpt_path, controller=False, max_batch_size=8) as c:
        service = service_of(c)
        plan = [1, 1, 2, 3, 3, 3]
        answers = []
        for i, k in enumerate(plan):
            force_exit(service, k)
            answers.append(c.post("/classify", content=png(i), headers={"content-type": "image/png"}).json())
        assert [a["exit"] for a in answers] == plan
        assert c.post("/classify", content=b"", headers={"content-type": "image/png"}).status_code == 400
        m = families(c.get("/metrics").text)
    f1, f2, f3 = lazy_flops
    for k, n in ((1, 2), (2, 1), (3, 3)):
        assert sample(m, "msdnet_exits_total", exit=str(k)) == n
    assert sample(m, "msdnet_flops_total", endpoint="/classify") == 2 * f1 + f2 + 3 * f3
    # Histogram buckets at each exit's cost: cumulative counts 2, 3, 6.
    for le, n in ((f1, 2), (f2, 3), (f3, 6)):
        assert sample(m, "msdnet_request_flops_bucket", le=str(float(le))) == n
    assert sample(m, "msdnet_request_flops_sum") == 2 * f1 + f2 + 3 * f3
    assert sample(m, "msdnet_request_flops_count") == 6
    # One image per step: block k ran once per request that reached it.
    for block, n in ((1, 6), (2, 4), (3, 3)):
        assert sample(m, "msdnet_batch_size_count", block=str(block)) == n
        assert sample(m, "msdnet_batch_size_sum", block=str(block)) == n
    assert sample(m, "msdnet_realised_flops_per_request") == pytest.approx((2 * f1 + f2 + 3 * f3) / 6)
    assert sample(m, "msdnet_requests_total", endpoint="/classify", status="200") == 6
    assert sample(m, "msdnet_requests_total", endpoint="/classify", status="400") == 1
    assert sample(m, "msdnet_rejected_requests_total", reason="bad_request") == 1
    assert sample(m, "msdnet_exit_threshold", exit="1") == INF  # the last request's thresholds
    assert sample(m, "msdnet_exit_threshold", exit="3") == 0.0


def test_batch_metrics_queue_depths_and_batch_sizes(ckpt_path, lazy_flops):
    f3 = lazy_flops[-1]
    seen = []
    with app_client(ckpt_path, controller=False, max_batch_size=1) as c:
        service = service_of(c)
        reg = service.metrics.registry

        def hook(block, batch):  # model thread, between steps: the metrics of the steps so far
            seen.append((block, len(batch), [reg.get_sample_value("msdnet_queue_depth", {"block": str(b)})
                                             for b in (1, 2, 3)]))

        service.runner.step_hook = hook
        # A budget of N x the last exit's cost: the curve's end, every image runs every block.
        r = c.post("/batch", json={"images": [base64.b64encode(png(i)).decode() for i in range(3)],
                                   "flops_budget": 3 * f3})
        service.runner.step_hook = None
        assert r.status_code == 200, r.text
        assert r.json()["exit_counts"] == {"1": 0, "2": 0, "3": 3} and r.json()["flops_used"] == 3 * f3
        m = families(c.get("/metrics").text)
    # Before the second step: image 1 went on to block 2, images 2 and 3 wait at block 1.
    assert seen[0][0] == 0 and seen[1][2] == [2.0, 1.0, 0.0]
    assert len(seen) == 9 and all(n == 1 for _, n, _ in seen)
    for b in (1, 2, 3):
        assert sample(m, "msdnet_queue_depth", block=str(b)) == 0
        assert sample(m, "msdnet_batch_size_count", block=str(b)) == 3
    assert sample(m, "msdnet_exits_total", exit="3") == 3
    assert sample(m, "msdnet_flops_total", endpoint="/batch") == 3 * f3


def test_batch_size_metric_counts_images_per_step(ckpt_path, lazy_flops):
    with app_client(ckpt_path, controller=False, max_batch_size=8) as c:
        r = c.post("/batch", json={"images": [base64.b64encode(png(i)).decode() for i in range(4)],
                                   "flops_budget": 4 * lazy_flops[-1]})
        assert r.status_code == 200
        m = families(c.get("/metrics").text)
    for b in (1, 2, 3):  # submitted together: one step of 4 images per block
        assert sample(m, "msdnet_batch_size_count", block=str(b)) == 1
        assert sample(m, "msdnet_batch_size_sum", block=str(b)) == 4


class Gate:
    """A step hook that holds the first step until the test releases it."""

    def __init__(self):
        self.reached, self.release = threading.Event(), threading.Event()

    def __call__(self, block, batch):
        self.reached.set()
        assert self.release.wait(30), "test never released the step"


def held(client, gate: Gate, hold_s: float, fn):
    """Run ``fn`` (a request) in a thread, hold its first step ``hold_s`` seconds
    after the step was chosen, then release it; returns the response."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()))
    t.start()
    try:
        assert gate.reached.wait(30), "the step never started"
        time.sleep(hold_s)  # a lower bound on the answer's latency, whatever the CPU speed
    finally:
        gate.release.set()
        t.join(30)
    return out["r"]


def test_deadline_met_is_false_when_the_answer_comes_late(ckpt_path, lazy_flops):
    with app_client(ckpt_path, controller=False) as c:
        service = service_of(c)
        force_exit(service, 3)  # would run every block; the deadline cuts it at exit 1
        gate = Gate()
        service.runner.step_hook = gate
        r = held(c, gate, 0.4, lambda: c.post("/classify", json={"image": base64.b64encode(png(1)).decode(),
                                                                 "deadline_ms": 300}))
        service.runner.step_hook = None
        assert r.status_code == 200, r.text
        assert r.json()["deadline_met"] is False and r.json()["latency_ms"] > 300
        assert r.json()["exit"] == 1 and r.json()["flops"] == lazy_flops[0]
        m = families(c.get("/metrics").text)
        assert sample(m, "msdnet_deadline_requests_total") == 1
        assert sample(m, "msdnet_deadline_misses_total") == 1
        # It left block 2's queue without a step: the gauge says so (it used to stay at 1).
        assert [sample(m, "msdnet_queue_depth", block=str(b)) for b in (1, 2, 3)] == [0, 0, 0]
        assert ("msdnet_batch_size_count", (("block", "2"),)) not in m  # no step of block 2 was observed
        ok = c.post("/classify", json={"image": base64.b64encode(png(1)).decode(), "deadline_ms": 60_000})
        assert ok.json()["deadline_met"] is (ok.json()["latency_ms"] <= 60_000)


def test_v2_deadline_met_is_false_when_the_answer_comes_late(ckpt_path):
    with app_client(ckpt_path, controller=False) as c:
        service = service_of(c)
        gate = Gate()
        service.runner.step_hook = gate
        body = {"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}],
                "parameters": {"deadline_ms": 300}}
        r = held(c, gate, 0.4, lambda: c.post("/v2/models/msdnet/infer", json=body))
        service.runner.step_hook = None
        assert r.status_code == 200, r.text
        assert r.json()["parameters"]["deadline_met"] is False


def test_the_deadline_counts_from_the_requests_arrival(client, lazy_flops):
    """A request that arrived 1 s ago with a 200 ms deadline has already missed
    it: 504, nothing spent (the clock starts at arrival, not when work starts)."""
    service = service_of(client)
    force_exit(service, 1)
    before = service.metrics.flops.labels(endpoint="/classify")._value.get()
    image = decode_image(png(3), service.transforms, 4096 * 4096)
    with pytest.raises(errors.DeadlineExceeded):
        asyncio.run(service.classify([image], 200.0, time.monotonic() - 1.0))
    assert service.metrics.flops.labels(endpoint="/classify")._value.get() == before
    # The same deadline from now is met.
    (f,) = asyncio.run(service.classify([image], 5000.0, time.monotonic()))
    assert f.exit == 1 and f.flops == lazy_flops[0]


def test_batch_uses_its_own_budget_not_the_controllers_command(ckpt_path, lazy_flops):
    f1, f2, f3 = lazy_flops
    with app_client(ckpt_path, controller=True, budget_token="t") as c:
        auth = {"authorization": "Bearer t"}
        assert c.put("/budget", json={"target_flops": f1}, headers=auth).status_code == 200
        assert c.get("/budget").json()["thresholds"] == [0.0, 0.0, 0.0]  # /classify: everyone leaves at exit 1
        images = [base64.b64encode(png(i)).decode() for i in range(4)]
        r = c.post("/batch", json={"images": images, "flops_budget": 4 * f3}).json()
        assert r["exit_counts"] == {"1": 0, "2": 0, "3": 4} and r["flops_used"] == 4 * f3
        # And the other way round: a controller at the last exit does not lift a batch at exit 1's cost.
        assert c.put("/budget", json={"target_flops": f3}, headers=auth).status_code == 200
        r = c.post("/batch", json={"images": images, "flops_budget": 4 * f1}).json()
        assert r["exit_counts"] == {"1": 4, "2": 0, "3": 0} and r["flops_used"] == 4 * f1


def test_put_budget_restarts_the_deficit(ckpt_path, lazy_flops):
    f1, f2, f3 = lazy_flops
    with app_client(ckpt_path, controller=True, budget_token="t") as c:
        auth = {"authorization": "Bearer t"}
        service = service_of(c)
        target = (f1 + f2) / 2  # no exit costs exactly this: every request moves the deficit
        assert c.put("/budget", json={"target_flops": target}, headers=auth).status_code == 200
        spent = [c.post("/classify", content=png(i), headers={"content-type": "image/png"}).json()["flops"]
                 for i in range(5)]
        assert service.keeper.controller.deficit == pytest.approx(sum(spent) - 5 * target)
        assert service.keeper.controller.deficit != 0
        state = c.put("/budget", json={"target_flops": f2}, headers=auth).json()
        bias = service.keeper.controller.bias
        assert service.keeper.controller.deficit == 0.0
        assert state["command_flops"] == pytest.approx(min(max(f2 - bias, f1), f3))


def test_queue_full_answers_503_with_the_schedulers_retry_after(client, monkeypatch):
    service = service_of(client)

    def full(*args, **kwargs):
        raise QueueFull(2.3)

    monkeypatch.setattr(service.runner, "submit", full)
    r = client.post("/classify", content=png(0), headers={"content-type": "image/png"})
    assert r.status_code == 503 and r.headers["retry-after"] == "3"
    assert r.json()["error"]["retry_after_s"] == pytest.approx(2.3)
