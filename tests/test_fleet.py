"""Fleet mode with real processes: a real redis-server and two server replicas
fed different traffic (issue 6). Marked integration; about a minute."""

from __future__ import annotations

import dataclasses
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

from model import calibration as C
from model.checkpoint import load
from model.curve import pareto
from server.images import decode
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


@pytest.fixture(scope="module")
def fleet_setup(tiny_checkpoint, tmp_path_factory):
    """The tiny model recalibrated on a pool of random images, with "accuracy"
    taken as agreement with the last exit, so its curve has many operating
    points (an untrained model's own curve collapses to one); and the pool split
    into easy images (clear exit 1's threshold by the widest margin at the
    fleet's target) and hard ones (miss every early threshold by the widest)."""
    ck = load(tiny_checkpoint)
    spec = ck.transforms
    rng = np.random.default_rng(0)
    pngs = [png(rng.integers(0, 255, (28, 28), dtype=np.uint8)) for _ in range(600)]
    x = torch.from_numpy(np.stack([decode(p, spec, 10**6) for p in pngs]))
    with torch.no_grad():
        logits = torch.stack(ck.model(x))
    conf, pred = C.confidences(logits, ck.calibration.temperatures)
    flops = ck.exit_flops()
    curve = pareto(C.budgeted_curve(conf, pred, pred[-1], flops))
    ck.calibration = dataclasses.replace(ck.calibration, curve=tuple(curve))
    path = tmp_path_factory.mktemp("fleet") / "fleet.pt"
    ck.save(path)
    target = 0.5 * (flops[0] + flops[-1])
    th = C.solve_for_budget(curve, target).thresholds
    margin = conf[:-1] - np.asarray(th[:-1])[:, None]
    easy = np.argsort(-margin[0])[:150]
    hard = np.argsort(margin.max(axis=0))[:150]
    return path, target, [pngs[i] for i in easy], [pngs[i] for i in hard]


def drive(url, images, count, out, lock, stop=None):
    """Post ``count`` images (cycling) to ``url``; stop early when ``stop`` is set,
    and set it when done, so that all drivers end together."""
    with httpx.Client(base_url=url, timeout=10) as c:
        for i in range(count):
            if stop is not None and stop.is_set():
                return
            r = c.post("/classify", content=images[i % len(images)], headers={"content-type": "image/png"})
            with lock:
                out.append((time.monotonic(), url, r.status_code, r.json().get("flops"), r.elapsed.total_seconds()))
    if stop is not None:
        stop.set()


@pytest.fixture
def redis_server():
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server missing: apt-get install -y redis-server (.ci/run does)")
    srv = RedisServer(free_port()).start()
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


def test_fleet_holds_the_mean_and_spends_more_on_harder_traffic(fleet_setup, redis_server):
    checkpoint, target, easy, hard = fleet_setup
    flops = load(checkpoint).exit_flops()
    env = {"MSDNET_REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/0", "MSDNET_TARGET_FLOPS": str(target),
           "MSDNET_FLEET_PUBLISH_INTERVAL_S": "0.2", "MSDNET_BUDGET_TOKEN": "t"}
    with LiveServer(checkpoint, env) as a, LiveServer(checkpoint, env) as b:
        records, lock, stop = [], threading.Lock(), threading.Event()
        with ThreadPoolExecutor(8) as pool:
            jobs = [pool.submit(drive, a.url, hard, 1900, records, lock, stop) for _ in range(4)]
            jobs += [pool.submit(drive, b.url, easy, 1900, records, lock, stop) for _ in range(4)]
            for j in jobs:
                j.result()
        assert all(r[2] == 200 for r in records) and len(records) > 10000
        records.sort()
        spent = np.array([r[3] for r in records[2000:]], dtype=float)
        windows = np.convolve(spent, np.ones(5000), "valid") / 5000 / target - 1
        assert np.abs(windows).max() < 0.02, np.abs(windows).max()
        mean_a = np.mean([r[3] for r in records[2000:] if r[1] == a.url])
        mean_b = np.mean([r[3] for r in records[2000:] if r[1] == b.url])
        assert mean_a > 1.05 * target and mean_b < 0.95 * target, (mean_a / target, mean_b / target)
        time.sleep(0.5)  # one more exchange
        state = httpx.get(a.url + "/budget").json()
        last = [np.mean([r[3] for r in records if r[1] == u][-1000:]) for u in (a.url, b.url)]
        assert state["mode"] == "fleet"
        # The fleet figure: both replicas' last 1,000 requests.
        assert state["fleet_realised_flops"] == pytest.approx(np.mean(last), rel=0.01)
        # A target set on one replica reaches the other.
        assert httpx.put(a.url + "/budget", json={"target_flops": flops[1]},
                         headers={"authorization": "Bearer t"}).status_code == 200
        time.sleep(1.0)
        assert httpx.get(b.url + "/budget").json()["target_flops"] == flops[1]


def test_redis_outage_falls_back_to_local_mode_and_rejoins(tiny_checkpoint, fleet_setup, redis_server):
    easy = fleet_setup[2]
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
        down = time.monotonic()
        time.sleep(1.5)
        assert httpx.get(a.url + "/budget").json()["mode"] == "local"
        metrics = httpx.get(a.url + "/metrics").text
        assert "msdnet_fleet_mode 0.0" in metrics
        with lock:
            served_while_down = sum(1 for r in records if r[0] > down)
        redis_server.start()  # and comes back
        time.sleep(1.5)
        assert httpx.get(a.url + "/budget").json()["mode"] == "fleet"
        stop.set()
        worker.join()
        assert len(records) > 100 and all(r[2] == 200 for r in records)
        # Requests went on while Redis was down (no timing bar: that would measure the machine).
        assert served_while_down > 0
        log = a.read_log()
        assert log.count("Redis unreachable") == 1 and "steering on the fleet-wide mean" in log
        # A replica that vanishes without a word leaves the fleet after the stale timeout.
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait()
        time.sleep(2.5)
        assert len(client.smembers("msdnet:replicas")) == 1
