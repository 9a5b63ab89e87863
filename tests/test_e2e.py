"""Real input, end to end (issue 3, item 8): the shipped model served by a real
uvicorn process; Fashion-MNIST test images posted as PNG over HTTP. Served
labels and exits must equal the offline evaluation at the same thresholds.

1,000 images by default; ``MSDNET_E2E_IMAGES=10000 make e2e-full`` sends all.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from model import calibration as C
from model.checkpoint import DEFAULT_CHECKPOINT, load
from model.data import load_fashion_mnist
from server.images import decode
from tests.live import LiveServer

pytestmark = pytest.mark.integration
N = int(os.environ.get("MSDNET_E2E_IMAGES", "1000"))
CHECKPOINT = os.environ.get("MSDNET_CHECKPOINT", str(DEFAULT_CHECKPOINT))  # another model: set it
MARGIN = 1e-4  # confidences this close to a threshold may flip with batch composition (float rounding)


def test_served_answers_equal_offline_evaluation():
    ck = load(CHECKPOINT)
    test = load_fashion_mnist(split="test")
    pngs = []
    for i in range(N):
        buf = io.BytesIO()
        Image.fromarray(test.images[i, 0].numpy()).save(buf, "PNG")
        pngs.append(buf.getvalue())
    labels = test.labels[:N].numpy()

    # Offline: the all-exit forward, then the checkpoint's thresholds.
    spec = ck.transforms
    x = torch.from_numpy(np.stack([decode(p, spec, 10**6) for p in pngs]))
    with torch.no_grad():
        logits = torch.cat([torch.stack(ck.model(x[i:i + 500])) for i in range(0, N, 500)], dim=1)
    cal = ck.calibration
    conf, pred = C.confidences(logits, cal.temperatures)
    exits = C.exit_of(conf, cal.thresholds)
    offline_label = pred[exits, np.arange(N)]

    with LiveServer(CHECKPOINT, {"MSDNET_TORCH_THREADS": "2"}, args=["--no-controller"]) as srv:
        def post(data):
            r = httpx.post(srv.url + "/classify", content=data, headers={"content-type": "image/png"}, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()

        with ThreadPoolExecutor(16) as pool:
            served = list(pool.map(post, pngs))
    served_exit = np.array([s["exit"] for s in served]) - 1
    served_label = np.array([s["class_id"] for s in served])
    th = np.asarray(cal.thresholds)[:, None]
    borderline = (np.abs(conf - th) < MARGIN)[:-1].any(axis=0)  # any threshold (last is 0)
    agree = (served_exit == exits) & (served_label == offline_label)
    assert agree[~borderline].all(), np.flatnonzero(~agree & ~borderline)[:10]
    assert borderline.mean() < 0.005
    accuracy = float((served_label == labels).mean())
    mean_flops = float(np.mean([s["flops"] for s in served]))
    print(f"\nserved {N} Fashion-MNIST test images: top-1 {100 * accuracy:.2f}%, mean {mean_flops / 1e6:.2f} MFLOPs "
          f"(multiply-accumulates) per image, exits {np.bincount(served_exit, minlength=ck.model.num_exits).tolist()}, "
          f"{int(borderline.sum())} borderline")
    assert accuracy == pytest.approx(float((offline_label == labels).mean()), abs=0.005)
    assert accuracy > 0.90
