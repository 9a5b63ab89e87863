"""The accuracy watch in a real server (issue 24): audited answers counted against the
last exit and never charged to the FLOPs, and ``POST /feedback`` with labels,
in one process and with ``--workers 2`` (the engine process holds every worker's
answers). The shipped model on real Fashion-MNIST test images."""

from __future__ import annotations

import time

import httpx
import pytest

from loadtest.samples import load_samples
from model.data import FASHION_MNIST_CLASSES
from tests.live import LiveServer
from tests.test_workers import sample

pytestmark = pytest.mark.integration

N = 40
ENV = {"MSDNET_AGREEMENT_SAMPLE": "1", "MSDNET_AGREEMENT_MAX_FLOPS_SHARE": "1"}


def counted(text: str, k_all: int) -> tuple[float, float]:
    """(audited images counted, sampled images skipped) in a scrape."""
    agreed = sum(sample(text, "msdnet_agreement_total", exit=str(e), agree=a) for e in range(1, k_all)
                 for a in ("true", "false"))
    return agreed, sum(sample(text, "msdnet_audit_skipped_total", reason=r) for r in ("objective", "flops_cap",
                                                                                     "dropped"))


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "workers-2"])
def test_agreement_and_feedback_in_a_real_server(workers):
    samples = load_samples(limit=N, seed=1)
    with LiveServer(env={**ENV, "MSDNET_WORKERS": str(workers)}) as srv, \
            httpx.Client(base_url=srv.url, timeout=30, trust_env=False) as client:
        answers = []
        for i, s in enumerate(samples):
            r = client.post("/classify", content=s.data, headers={"content-type": "image/png",
                                                                 "x-request-id": f"req-{i}"})
            assert r.status_code == 200 and r.headers["x-request-id"] == f"req-{i}", r.text
            answers.append(r.json())
        k_all = answers[0]["num_exits"]
        early = sum(a["exit"] < k_all for a in answers)
        assert early > 0
        # Every image answered early is audited (or skipped, counted) once the engine is idle.
        end = time.monotonic() + 60.0
        while sum(counted(text := client.get("/metrics").text, k_all)) < early:
            assert time.monotonic() < end, f"audits not counted: {counted(text, k_all)} of {early}"
            time.sleep(0.1)
        audited, skipped = counted(text, k_all)
        assert audited + skipped == early and audited > 0
        served = sum(a["flops"] for a in answers)
        assert sample(text, "msdnet_flops_total", endpoint="/classify") == served  # audits not charged
        assert sample(text, "msdnet_audit_flops_total") > 0
        assert sample(text, "msdnet_realised_flops_per_request") == pytest.approx(served / N)
        assert sample(text, "msdnet_calibrated_agreement_ratio", exit="1") > 0.5
        assert sample(text, "msdnet_calibrated_threshold", exit=str(k_all)) == 0.0
        assert sample(text, "msdnet_exit_confidence_count", exit="1") == N

        # Labels, by id and by name, to whichever worker takes them.
        results = []
        for i, s in enumerate(samples):
            label = s.label if i % 2 else FASHION_MNIST_CLASSES[s.label]
            r = client.post("/feedback", json={"request_id": f"req-{i}", "label": label})
            assert r.status_code == 200, r.text
            body = r.json()
            assert (body["exit"], body["class_id"], body["label"]) == (answers[i]["exit"], answers[i]["class_id"],
                                                                      s.label)
            assert body["correct"] == (answers[i]["class_id"] == s.label)
            results.append(body)
        text = client.get("/metrics").text
        wrong = sum(not b["correct"] for b in results)
        assert sum(sample(text, "msdnet_feedback_total", exit=str(e), served="wrong") for e in range(1, k_all + 1)) \
            == wrong
        assert sum(sample(text, "msdnet_feedback_total", exit=str(e), served=v) for e in range(1, k_all + 1)
                   for v in ("correct", "wrong")) == N
        with_last = [b for b in results if b["last_exit_class_id"] is not None]
        assert len(with_last) == audited
        assert sum(sample(text, "msdnet_feedback_last_exit_total", exit=str(e), last=v) for e in range(1, k_all)
                   for v in ("correct", "wrong")) == len(with_last)

        # Clear errors.
        again = client.post("/feedback", json={"request_id": "req-0", "label": 0})
        assert again.status_code == 409 and again.json()["error"]["code"] == "already_labelled"
        unknown = client.post("/feedback", json={"request_id": "nobody", "label": 0})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_request_id"
        bad = client.post("/feedback", json={"request_id": "req-1", "label": "Unicorn"})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "label"
        missing = client.post("/feedback", json={"request_id": "req-1"})
        assert missing.status_code == 422 and missing.json()["error"]["field"] == "label"
        extra = client.post("/feedback", json={"request_id": "req-1", "label": 1, "x": 1})
        assert extra.status_code == 422 and extra.json()["error"]["field"] == "x"
        broken = client.post("/feedback", content=b"{not json", headers={"content-type": "application/json"})
        assert broken.status_code == 422 and broken.json()["error"]["code"] == "invalid_parameter"
        form = client.post("/feedback", content=b"request_id=req-1", headers={"content-type": "text/plain"})
        assert form.status_code == 415

