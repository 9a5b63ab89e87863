"""Locust scenarios: realistic, mixed traffic against a running msdnet-serve.

Headless, bounded (users, spawn rate and run time), loopback only:

    locust -f loadtest/locustfile.py --headless -u 20 -r 5 -t 30s --host http://127.0.0.1:8000 \
        --csv /tmp/msdnet-locust --only-summary

Traffic (real Fashion-MNIST test images, encoded as PNG):

- ``ClassifyUser`` (weight 4), think time 50-500 ms:
  - 6/10: ``POST /classify`` raw ``image/png``, no deadline;
  - 3/10: ``POST /classify`` JSON ``{"image": base64, "deadline_ms": 20|50|100|250}``;
  - 1/10: ``POST /classify`` multipart (``file``).
- ``BatchUser`` (weight 1), think time 0.5-2 s: ``POST /batch`` JSON with 4-32
  images and a ``flops_budget`` between N x exit 1's cost and N x ~60% of the way
  to the last exit's (FLOPs = multiply-accumulates of convs and linears, MSDNet
  paper convention; the exit costs are read from ``/metrics``).

A 504 (deadline passed before exit 1 could run) and a 503 (queue full) count as
failures, named by their error code.

Environment: ``MSDNET_LOADTEST_DATA_DIR`` (Fashion-MNIST IDX folder, default
Debian's /usr/share/datasets/fashion-mnist), ``MSDNET_LOADTEST_IMAGES`` (test images
to load, default 2000).
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import sys
import uuid
from pathlib import Path

from locust import FastHttpUser, between, events, task

# Locust puts this file's folder on sys.path, not the repository root; loadtest
# is not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.openloop import check_loopback  # noqa: E402
from loadtest.samples import load_samples  # noqa: E402

SAMPLES = load_samples(os.environ.get("MSDNET_LOADTEST_DATA_DIR") or None,
                       limit=int(os.environ.get("MSDNET_LOADTEST_IMAGES", "2000")))
B64 = [base64.b64encode(s.png).decode() for s in SAMPLES]
DEADLINES_MS = (20, 50, 100, 250)


@events.test_start.add_listener
def _loopback_only(environment, **kwargs):
    check_loopback(environment.host or "")


def multipart(field: str, filename: str, data: bytes, content_type: str = "image/png") -> tuple[bytes, str]:
    """A one-file multipart/form-data body and its content type."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _check(resp, expect_keys=("class_id", "exit", "flops")) -> None:
    """Mark non-200 answers as failures named by their error code."""
    if resp.status_code != 200:
        try:
            code = resp.json()["error"]["code"]
        except Exception:
            code = "error"
        resp.failure(f"{resp.status_code} {code}")
        return
    body = resp.json()
    if not all(k in body for k in expect_keys):
        resp.failure(f"answer lacks {expect_keys}")
    else:
        resp.success()


class ClassifyUser(FastHttpUser):
    weight = 4
    wait_time = between(0.05, 0.5)

    @task(6)
    def classify_raw(self):
        s = random.choice(SAMPLES)
        with self.client.post("/classify", data=s.png, headers={"content-type": "image/png"},
                              name="/classify [png]", catch_response=True) as resp:
            _check(resp)

    @task(3)
    def classify_deadline(self):
        i = random.randrange(len(SAMPLES))
        body = json.dumps({"image": B64[i], "deadline_ms": random.choice(DEADLINES_MS)})
        with self.client.post("/classify", data=body, headers={"content-type": "application/json"},
                              name="/classify [json, deadline]", catch_response=True) as resp:
            _check(resp)

    @task(1)
    def classify_multipart(self):
        s = random.choice(SAMPLES)
        body, ctype = multipart("file", f"{s.index}.png", s.png)
        with self.client.post("/classify", data=body, headers={"content-type": ctype},
                              name="/classify [multipart]", catch_response=True) as resp:
            _check(resp)


class BatchUser(FastHttpUser):
    weight = 1
    wait_time = between(0.5, 2.0)
    exit_flops: list[float] | None = None

    def on_start(self):
        """Read the exit costs from the model info metric (``exit_flops="a,b,..."``)."""
        resp = self.client.get("/metrics", name="/metrics")
        m = re.search(r'msdnet_model_info\{[^}]*exit_flops="([0-9,]+)"', resp.text or "")
        self.exit_flops = [float(f) for f in m.group(1).split(",")] if m else None

    @task
    def batch(self):
        n = random.randint(4, 32)
        idx = random.sample(range(len(SAMPLES)), n)
        payload: dict = {"images": [B64[i] for i in idx]}
        if self.exit_flops:
            lo, hi = self.exit_flops[0], self.exit_flops[-1]
            payload["flops_budget"] = n * (lo + random.uniform(0.0, 0.6) * (hi - lo))
        with self.client.post("/batch", data=json.dumps(payload), headers={"content-type": "application/json"},
                              name="/batch", catch_response=True) as resp:
            _check(resp, ("results", "flops_used", "exit_counts"))
            if resp.status_code == 200 and "flops_budget" in payload:
                if resp.json()["flops_used"] > payload["flops_budget"]:
                    resp.failure("flops_used over flops_budget")
