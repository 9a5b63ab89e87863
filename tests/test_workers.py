"""``msdnet serve --workers 2``: two uvicorn worker processes and one engine
process (``server.ipc``), for real: the same answers as one process, every
scrape shows the whole replica, a stale metrics directory is emptied, workers
never import torch, SIGTERM exits 0 and cleans up, a dead engine stops the server."""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.live import LiveServer
from tests.test_server_live import png

pytestmark = pytest.mark.integration


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def stale_metrics_dir(tmp_path: Path) -> Path:
    """A multiprocess directory holding a dead process's counts (1,000 /classify 200s)."""
    d = tmp_path / "metrics"
    d.mkdir()
    code = ("from prometheus_client import Counter; "
            "Counter('msdnet_requests_total', 'x', ['endpoint', 'status'])"
            ".labels(endpoint='/classify', status='200').inc(1000)")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(d)}, check=True)
    assert list(d.glob("*.db"))
    return d


def test_two_workers_answer_like_one_process_and_every_scrape_shows_the_whole_replica(tiny_checkpoint, tmp_path):
    images = [png(i) for i in range(12)]
    with LiveServer(tiny_checkpoint) as one:
        expected = [httpx.post(one.url + "/classify", content=b, headers={"content-type": "image/png"}).json()
                    for b in images]
    stale = stale_metrics_dir(tmp_path)
    with LiveServer(tiny_checkpoint, args=["--workers", "2"], env={"PROMETHEUS_MULTIPROC_DIR": str(stale)}) as srv:
        procs = children(srv.proc.pid)
        workers = [p for p in procs if "spawn" in cmdline(p)]
        assert len(workers) == 3, [cmdline(p) for p in procs]  # 2 HTTP workers + the engine
        torch_in = [p for p in workers if "libtorch" in Path(f"/proc/{p}/maps").read_text()]
        assert len(torch_in) == 1, "only the engine process loads torch"

        with httpx.Client(base_url=srv.url) as c:  # one connection per request: spread over the workers
            got = [httpx.post(srv.url + "/classify", content=b, headers={"content-type": "image/png"}).json()
                   for b in images]
            batch = c.post("/batch", json={"images": [base64.b64encode(images[0]).decode(), "not base64!"]}).json()
            bad = c.post("/classify", content=b"not an image", headers={"content-type": "image/png"})
            v2 = c.post("/v2/models/msdnet/infer", json={"inputs": [{"name": "image_bytes", "datatype": "BYTES",
                                                                       "shape": [1], "data": [
                                                                           base64.b64encode(images[1]).decode()]}]})
            budget = c.get("/budget").json()
            scrapes = [httpx.get(srv.url + "/metrics").text for _ in range(6)]
    for e, g in zip(expected, got):
        assert g["class_id"] == e["class_id"] and g["exit"] == e["exit"] and g["flops"] == e["flops"]
        np.testing.assert_allclose([t["probability"] for t in g["top_k"]], [t["probability"] for t in e["top_k"]],
                                   atol=1e-6)
    assert batch["results"][0]["class_id"] == expected[0]["class_id"]
    assert batch["results"][1]["error"]["code"] == "bad_image"
    assert batch["flops_used"] == expected[0]["flops"]
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_image"
    assert v2.status_code == 200, v2.text
    assert budget["requests"] == 12 + 1 and budget["controller"] is True  # /classify and v2 feed the controller
    for text in scrapes:  # every scrape, whichever worker answers it: the whole replica, no stale counts
        assert sample(text, "msdnet_requests_total", endpoint="/classify", status="200") == 12
        assert sample(text, "msdnet_requests_total", endpoint="/classify", status="400") == 1
        assert sample(text, "msdnet_requests_total", endpoint="/batch", status="200") == 1
        exits = sum(sample(text, "msdnet_exits_total", exit=str(k)) for k in range(1, 5))
        assert exits == 12 + 1 + 1  # /classify, /batch's good image, v2
        v2_flops = next(o["data"][0] for o in v2.json()["outputs"] if o["name"] == "flops")
        assert sample(text, "msdnet_flops_total", endpoint="/classify") == sum(e["flops"] for e in expected) + v2_flops
        assert sample(text, "msdnet_model_info", num_exits=str(len(budget["thresholds"]))) == 1
        for k, th in enumerate(budget["thresholds"], start=1):  # the engine's gauges (no request since /budget)
            assert sample(text, "msdnet_exit_threshold", exit=str(k)) == pytest.approx(th)
    assert srv.returncode == 0, srv.log[-2000:]
    assert "Traceback" not in srv.log, srv.log[-3000:]


def test_sigterm_stops_every_process_and_a_dead_engine_stops_the_server(tiny_checkpoint):
    with LiveServer(tiny_checkpoint, args=["--workers", "2"]) as srv:
        procs = children(srv.proc.pid)
        run_dirs = set(re.findall(r" on (/\S+?)/engine\.sock", srv.read_log()))
        assert len(run_dirs) == 1 and Path(run_dirs.pop()).exists()
    assert srv.returncode == 0, srv.log[-2000:]
    deadline = time.monotonic() + 10  # multiprocessing's resource tracker leaves after its parent
    while (left := [p for p in procs if Path(f"/proc/{p}").exists()]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, [cmdline(p) for p in left]
    assert not any(Path(d).exists() for d in re.findall(r" on (/\S+?)/engine\.sock", srv.log))

    with LiveServer(tiny_checkpoint, args=["--workers", "2"]) as srv:
        engine = [p for p in children(srv.proc.pid) if "libtorch" in Path(f"/proc/{p}/maps").read_text()]
        assert len(engine) == 1
        os.kill(engine[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while srv.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert srv.proc.poll() == 1, srv.read_log()[-2000:]
        assert "engine process exited" in srv.read_log()


@pytest.mark.parametrize("case", ["uncalibrated", "crash"])
def test_an_engine_that_cannot_start_ends_the_server_with_its_reason_and_nothing_left(tiny_checkpoint, tmp_path,
                                                                                    case):
    """``--workers 2``: the engine process loads the checkpoint. One it cannot serve: the
    engine's one-line reason and status 2, as in one process; an engine that dies while
    starting (here: ``tests.crashing_engine`` exits 3) is status 1 with what
    happened. Either way no worker was started and the run folder is gone."""
    import torch


    path = tiny_checkpoint
    env = {**os.environ, "MSDNET_WORKERS": "2", "MSDNET_TORCH_THREADS": "1", "MSDNET_BACKEND": "torch",
           "TMPDIR": str(tmp_path)}
    if case == "uncalibrated":
        raw = torch.load(tiny_checkpoint, weights_only=True)
        raw["calibration"] = None
        path = tmp_path / "bare.pt"
        torch.save(raw, path)
    else:
        env["MSDNET_TEST_ENGINE_CRASH"] = "1"
    cmd = [sys.executable, "-m", "tests.crashing_engine" if case == "crash" else "server.cli", "serve",
           "--checkpoint", str(path), "--port", "0"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if case == "uncalibrated":
        assert done.returncode == 2, done.stderr[-2000:]
        assert "msdnet serve: error:" in done.stderr and "is not calibrated" in done.stderr
    else:
        assert done.returncode == 1, done.stderr[-2000:]
        assert "msdnet serve: error: the engine process exited with code 3 while starting" in done.stderr
    assert "Started server process" not in done.stderr  # no HTTP worker
    assert not list(tmp_path.glob("msdnet-*")), "the run folder was left"


def test_a_stop_after_a_large_decode_writes_only_json_log_lines(tiny_checkpoint):
    """A large image is decoded in each worker's low-priority process. At the stop that
    process was left to notice its parent gone: a plain-text "parent process ... is gone"
    line, and multiprocessing's resource tracker warned of 10 leaked semaphores."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1100, 1100), dtype=np.uint8)).save(buf, "PNG")
    with LiveServer(tiny_checkpoint, args=["--workers", "2"]) as srv:
        for _ in range(4):  # both workers, most likely
            r = httpx.post(srv.url + "/classify", content=buf.getvalue(), headers={"content-type": "image/png"},
                           timeout=60)
            assert r.status_code == 200, r.text
    assert srv.returncode == 0
    plain = [ln for ln in srv.log.splitlines() if ln.strip() and not ln.startswith("{")]
    assert not plain, plain[:5]
