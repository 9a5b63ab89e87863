"""Fleet mode with real processes: a real redis-server and two server replicas
fed different traffic (issue 6). Marked integration; about a minute."""

from __future__ import annotations

import io
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import redis
import torch
from PIL import Image

from model.checkpoint import load
from server.images import InputSpec, decode
from tests.live import LiveServer, free_port

pytestmark = pytest.mark.integration


class RedisServer:
    def __init__(self, port: int):
        self.port = port

    def start(self):
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def easy_and_hard(checkpoint, n=400):
    """Random images split by the tiny model's exit-1 confidence."""
    ck = load(checkpoint)
    spec = InputSpec.from_transforms(ck.transforms)
    rng = np.random.default_rng(0)
    pngs = [png(rng.integers(0, 255, (28, 28), dtype=np.uint8)) for _ in range(n)]
    x = torch.from_numpy(np.stack([decode(p, spec, 10**6) for p in pngs]))
    with torch.no_grad():
        logits, _ = ck.model.advance(ck.model.start(x))
    conf = torch.softmax(logits / ck.calibration["temperatures"][0], 1).max(1).values.numpy()
    order = np.argsort(conf)
    return [pngs[i] for i in order[-n // 3:]], [pngs[i] for i in order[: n // 3]]


def drive(url, images, count, out, lock, stop=None):
    with httpx.Client(base_url=url, timeout=10) as c:
        for i in range(count):
            if stop is not None and stop.is_set():
                return
            r = c.post("/classify", content=images[i % len(images)], headers={"content-type": "image/png"})
            with lock:
                out.append((time.monotonic(), url, r.status_code, r.json().get("flops"), r.elapsed.total_seconds()))


@pytest.fixture
def redis_server():
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server missing: apt-get install -y redis-server (.ci/run does)")
    srv = RedisServer(free_port()).start()
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


def test_fleet_holds_the_mean_and_spends_more_on_harder_traffic(tiny_checkpoint, redis_server):
    easy, hard = easy_and_hard(tiny_checkpoint)
    flops = load(tiny_checkpoint).exit_flops()
    target = 0.5 * (flops[0] + flops[-1])
    env = {"MSDNET_REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/0", "MSDNET_TARGET_FLOPS": str(target),
           "MSDNET_FLEET_PUBLISH_INTERVAL_S": "0.2", "MSDNET_BUDGET_TOKEN": "t"}
    with LiveServer(tiny_checkpoint, env) as a, LiveServer(tiny_checkpoint, env) as b:
        records, lock = [], threading.Lock()
        with ThreadPoolExecutor(8) as pool:
            jobs = [pool.submit(drive, a.url, hard, 1500, records, lock) for _ in range(4)]
            jobs += [pool.submit(drive, b.url, easy, 1500, records, lock) for _ in range(4)]
            for j in jobs:
                j.result()
        assert all(r[2] == 200 for r in records)
        records.sort()
        spent = np.array([r[3] for r in records[2000:]], dtype=float)
        windows = np.convolve(spent, np.ones(5000), "valid") / 5000 / target - 1
        assert np.abs(windows).max() < 0.02, np.abs(windows).max()
        mean_a = np.mean([r[3] for r in records[2000:] if r[1] == a.url])
        mean_b = np.mean([r[3] for r in records[2000:] if r[1] == b.url])
        assert mean_a > 1.05 * target and mean_b < 0.95 * target, (mean_a / target, mean_b / target)
        state = httpx.get(a.url + "/budget").json()
        assert state["mode"] == "fleet" and abs(state["fleet_realised_flops"] / target - 1) < 0.05
        # A target set on one replica reaches the other.
        assert httpx.put(a.url + "/budget", json={"target_flops": flops[1]},
                         headers={"authorization": "Bearer t"}).status_code == 200
        time.sleep(1.0)
        assert httpx.get(b.url + "/budget").json()["target_flops"] == flops[1]


def test_redis_outage_falls_back_to_local_mode_and_rejoins(tiny_checkpoint, redis_server):
    easy, _ = easy_and_hard(tiny_checkpoint, n=60)
    env = {"MSDNET_REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/0", "MSDNET_FLEET_PUBLISH_INTERVAL_S": "0.2",
           "MSDNET_FLEET_STALE_AFTER_S": "1.5"}
    with LiveServer(tiny_checkpoint, env) as a, LiveServer(tiny_checkpoint, env) as b:
        time.sleep(0.6)
        client = redis.Redis(port=redis_server.port, decode_responses=True)
        assert len(client.smembers("msdnet:replicas")) == 2
        records, lock, stop = [], threading.Lock(), threading.Event()
        worker = threading.Thread(target=drive, args=(a.url, easy, 10**6, records, lock, stop))
        worker.start()
        time.sleep(1.0)
        redis_server.stop()  # Redis dies mid-run
        time.sleep(1.5)
        assert httpx.get(a.url + "/budget").json()["mode"] == "local"
        metrics = httpx.get(a.url + "/metrics").text
        assert "msdnet_fleet_mode 0.0" in metrics
        redis_server.start()  # and comes back
        time.sleep(1.5)
        assert httpx.get(a.url + "/budget").json()["mode"] == "fleet"
        stop.set()
        worker.join()
        assert len(records) > 100 and all(r[2] == 200 for r in records)
        latencies = np.array([r[4] for r in records])
        assert np.percentile(latencies, 99) < 0.25  # no request waited on Redis
        log = a.read_log()
        assert log.count("Redis unreachable") == 1 and "steering on the fleet-wide mean" in log
        # A replica that vanishes without a word leaves the fleet after the stale timeout.
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait()
        time.sleep(2.5)
        assert len(client.smembers("msdnet:replicas")) == 1
