"""The real-size path end to end on the paper's CIFAR-100 MSDNet-7 (issue 22; random weights,
speed-only): an official ``main.py`` checkpoint -> ``msdnet import-official`` -> ``msdnet
calibrate --data folder`` on generated images -> ``msdnet serve`` with its defaults (HTTP
workers, an engine with ONNX Runtime and one model thread per usable CPU) -> a JPEG and a PNG
classified, each answer the offline network's at the exit it reports."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from loadtest.harness import ServerProcess, serve_command
from loadtest.realsize import official_args
from model import checkpoint as ckpt
from model.network import MSDNet
from model.official import config_from_official, parse_official_args, to_official
from model.transforms import preprocess

pytestmark = pytest.mark.integration

ARGS = official_args("cifar100-7")
LAST_EXIT_LAZY_FLOPS = 75_487_744  # lazy; ../shared/reference/msdnet_costs.md: 75.94 M by the official counter


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    return subprocess.run([sys.executable, "-m", "server.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=900)


def _photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, 3) * np.stack([x / w, y / h, 1 - x / w], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8), "RGB")


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def served_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar100-7")
    cfg = config_from_official(parse_official_args(ARGS))
    torch.manual_seed(0)
    model = MSDNet(cfg).eval()
    official = {"module." + k: v for k, v in to_official(model.state_dict(), cfg).items()}
    torch.save({"epoch": 300, "arch": "msdnet", "state_dict": official, "best_prec1": 0.0, "optimizer": {}},
               root / "model_best.pth.tar")
    out = root / "cifar100-7.pt"
    r = _cli("import-official", str(root / "model_best.pth.tar"), "--official-args", ARGS, "--out", str(out))
    assert r.returncode == 0, r.stderr
    classes = ckpt.load(out).classes
    rng = np.random.default_rng(0)
    for i, name in enumerate(classes):  # two images per class, 32x32 PNG and a larger JPEG
        d = root / "data" / "val" / name
        d.mkdir(parents=True)
        _photo(rng, 32, 32).save(d / "a.png")
        _photo(rng, 48 + i % 16, 40).save(d / "b.jpg", quality=90)
    r = _cli("calibrate", "--checkpoint", str(out), "--data", "folder", "--data-dir", str(root / "data"),
             "--target-flops", str(0.4 * LAST_EXIT_LAZY_FLOPS))
    assert r.returncode == 0, r.stderr
    assert "thresholds:" in r.stdout
    return out


def test_served_with_defaults_answers_a_jpeg_and_a_png(served_checkpoint):
    ck = ckpt.load(served_checkpoint)
    flops = ck.exit_flops(lazy=True)
    assert len(flops) == 7 and flops[-1] == LAST_EXIT_LAZY_FLOPS
    rng = np.random.default_rng(1)
    bodies = {"image/jpeg": _encode(_photo(rng, 64, 48), "JPEG"), "image/png": _encode(_photo(rng, 32, 32), "PNG")}
    # defaults: no MSDNET_* settings from the environment
    srv = ServerProcess(serve_command(served_checkpoint), ready_timeout_s=300.0, name="cifar-size")
    srv.env = {k: v for k, v in srv.env.items() if not k.startswith("MSDNET_")}
    with srv:
        answers = {ct: httpx.post(srv.url + "/classify", content=b, headers={"content-type": ct}, timeout=60)
                   for ct, b in bodies.items()}
        budget = httpx.get(srv.url + "/budget", timeout=10).json()
        log = srv.read_log()
    temps = ck.calibration.temperatures
    for ct, resp in answers.items():
        assert resp.status_code == 200, (ct, resp.text)
        a = resp.json()
        assert 1 <= a["exit"] <= 7 and a["flops"] == flops[a["exit"] - 1]
        with Image.open(io.BytesIO(bodies[ct])) as img:
            x = torch.from_numpy(preprocess(img.convert("RGB"), ck.transforms))[None]
        with torch.no_grad():
            probs = torch.softmax(ck.model(x)[a["exit"] - 1][0].double() / temps[a["exit"] - 1], 0).numpy()
        assert a["class_id"] == int(probs.argmax())
        assert abs(a["confidence"] - float(probs.max())) < 1e-4
    # the calibrated operating point: the curve's point at or under --target-flops
    assert flops[0] <= budget["target_flops"] <= 0.4 * LAST_EXIT_LAZY_FLOPS
    assert budget["target_flops"] == pytest.approx(ck.calibration.target_flops)
    assert "onnxruntime parity with torch eager" in log and "0 top-1 mismatches" in log
    from server.settings import usable_cpus

    # 75 MFLOPs at the last exit: compute-bound, one model thread per usable CPU
    assert f"engine: {min(4, usable_cpus())} model thread(s) x 1 intra-op thread(s), batches of up to 64" in log
    assert json.dumps(answers["image/png"].json())  # a JSON body
