"""The serving peers of issue 12 (loadtest/peers/) and the capacity harness (loadtest/parts/capacity.py).

Integration: each installed peer starts, answers 3 real Fashion-MNIST test images
in both encodings (raw image/png, JSON base64) with the class and confidence of
msdnet-serve forced to the last exit, refuses a non-image with 400, and stops
with its whole process tree. A peer that is not installed (it comes with the
bench extra, ``pip install -e '.[bench]'``; ``.[test]`` alone lacks it) is
skipped, with that reason.
"""

from __future__ import annotations

import base64
import importlib.util
import json

import httpx
import numpy as np
import pytest

from loadtest import openloop as ol
from loadtest import servers
from loadtest.common import ENCODINGS, Plan
from loadtest.parts import capacity
from loadtest.peers import BadRequest, image_bytes, json_image
from loadtest.samples import Sample, load_samples
from model.checkpoint import DEFAULT_CHECKPOINT
from model.checkpoint import load as load_checkpoint

CHECKPOINT = str(DEFAULT_CHECKPOINT)
PEER_MODULES = {"litserve": "litserve", "ray": "ray.serve"}


# ---------------------------------------------------------------------------- units (no processes)
def test_image_bytes_both_encodings():
    png = b"\x89PNG\r\n\x1a\nabc"
    assert image_bytes(png, "image/png") == png
    assert image_bytes(png, "Image/PNG; charset=x") == png
    assert image_bytes(capacity.json_body(png), "application/json") == png
    assert json_image({"image": base64.b64encode(png).decode()}) == png
    for body, ctype in ((b'{"img": "AA=="}', "application/json"), (b'{"image": "***"}', "application/json"),
                        (b"[1]", "application/json"), (b"not json", "application/json"), (png, "text/plain")):
        with pytest.raises(BadRequest):
            image_bytes(body, ctype)


def test_make_requests_json_is_msdnet_encoding():
    s = [Sample(7, 3, b"PNGDATA"), Sample(8, 5, b"OTHER")]
    r = capacity.make_requests(s, "json")(3)  # cycles: sample 1
    assert (r.path, r.content_type, r.label) == ("/classify", "application/json", 5)
    assert json.loads(r.body) == {"image": base64.b64encode(b"OTHER").decode()}
    raw = capacity.make_requests(s, "png")(2)
    assert (raw.body, raw.content_type, raw.label) == (b"PNGDATA", "image/png", 3)
    with pytest.raises(ValueError):
        capacity.make_requests(s, "xml")


def _rec(i, status, exit_, predicted):
    return ol.Record(i, 0.0, 0.0, 0.01, 0.01, status, exit=exit_, predicted=predicted)


def test_smoke_check_flags_wrong_answers():
    expected = np.array([[1, 2, 3], [4, 4, 5]])  # 2 samples, 3 exits
    good = [_rec(0, 200, 3, 3), _rec(1, 200, 3, 5), _rec(2, 200, 3, 3)]
    assert capacity.smoke_check(good, expected, 2, "ray") == []
    # msdnet with early exits: the class at the reported exit
    assert capacity.smoke_check([_rec(0, 200, 1, 1), _rec(1, 200, 2, 4)], expected, 2, "msdnet") == []
    bad = capacity.smoke_check([_rec(0, 503, None, None), _rec(1, 200, 3, 4), _rec(0, 200, 1, 1)],
                               expected, 2, "litserve")
    assert len(bad) == 4  # the last answer: an early exit from a peer, and the wrong class for the last exit
    assert "status 503" in bad[0] and "expected 5" in bad[1]
    assert "exit 1, expected the last (3)" in bad[2] and "class 1, expected 3" in bad[3]


def test_search_bisects_to_the_threshold(monkeypatch):
    """find_capacity against a fake server that passes below 437 req/s."""
    def fake_trial(srv, make, rate, plan, slo_ms, seed=0):
        return {"rate": rate, "passed": rate < 437, "p50_ms": 1.0, "p99_ms": 1.0, "ok": 1, "requests": 1,
                "server_cores": 0.0, "client_cores": 0.0}, None

    monkeypatch.setattr(capacity, "trial", fake_trial)
    plan = Plan(start=100, pause_s=0, stop_ratio=1.05, max_trials=20, max_search_s=60)
    out = capacity.find_capacity(None, None, plan, 100.0, "fake")
    rates = [t["rate"] for t in out["trials"]]
    assert rates[:4] == [100, 200, 400, 800]
    assert 437 / 1.05 <= out["capacity_rps"] < 437 <= out["first_fail_rps"]
    plan = Plan(start=1000, pause_s=0, stop_ratio=1.05, max_trials=3, max_search_s=60)
    out = capacity.find_capacity(None, None, plan, 100.0, "fake")
    assert [t["rate"] for t in out["trials"]] == [1000, 500, 250] and out["capacity_rps"] == 250


# ---------------------------------------------------------------------------- integration
@pytest.fixture(scope="module")
def samples():
    return load_samples(limit=3, seed=0)


def _ask(url: str, samples) -> list[dict]:
    """Both encodings of every sample: [(encoding, status, body)]."""
    out = []
    with httpx.Client(timeout=30) as c:
        for s in samples:
            for enc in ENCODINGS:
                body, ctype = (s.png, "image/png") if enc == "png" else (capacity.json_body(s.png), "application/json")
                r = c.post(url + "/classify", content=body, headers={"content-type": ctype})
                out.append({"encoding": enc, "status": r.status_code, "body": r.json()})
    return out


@pytest.fixture(scope="module")
def msdnet_last(samples):
    """msdnet-serve forced to the last exit: its answers to the samples."""
    flops = load_checkpoint(CHECKPOINT).exit_flops(lazy=True)[-1]
    with servers.msdnet(CHECKPOINT, 1, flops).make() as srv:
        answers = _ask(srv.url, samples)
    return answers


@pytest.mark.integration
def test_msdnet_last_exit_is_the_models_last_exit(samples, msdnet_last):
    want = capacity.reference_classes(CHECKPOINT, samples)[:, -1]
    assert [a["status"] for a in msdnet_last] == [200] * 6
    assert [a["body"]["exit"] for a in msdnet_last] == [4] * 6
    assert [a["body"]["class_id"] for a in msdnet_last] == [int(k) for k in np.repeat(want, 2)]


def skip_unless_installed(family: str) -> None:
    """Skip, naming the bench extra, when ``family``'s package is not installed."""
    module = PEER_MODULES[family]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # find_spec("ray.serve") imports ray first, and raises without it
        found = False
    if not found:
        pytest.skip(f"{family} is not installed (no module {module}): it comes with the bench extra, "
                    "pip install -e '.[bench]'")


@pytest.mark.integration
@pytest.mark.parametrize("family", ["litserve", "ray"])
def test_peer_answers_like_msdnet_last_exit(family, samples, msdnet_last):
    skip_unless_installed(family)
    psutil = pytest.importorskip("psutil", reason="psutil is not installed: it comes with the bench extra, "
                                 "pip install -e '.[bench]'")
    cfg = servers.litserve(CHECKPOINT, 1, 1, 1) if family == "litserve" else servers.ray(CHECKPOINT, 1, 1)
    with cfg.make() as srv:
        answers = _ask(srv.url, samples)
        bad = httpx.post(srv.url + "/classify", content=b"not an image", headers={"content-type": "image/png"},
                         timeout=30)
        tree = srv._tree()
        assert len(tree) >= 2  # the server's own processes (workers, API servers, Ray's daemons)
    assert [a["status"] for a in answers] == [200] * 6
    for got, ref in zip(answers, msdnet_last):
        assert got["encoding"] == ref["encoding"]
        assert got["body"]["class_id"] == ref["body"]["class_id"]
        assert got["body"]["label"] == ref["body"]["label"]
        assert got["body"]["exit"] == 4
        assert got["body"]["confidence"] == pytest.approx(ref["body"]["confidence"], abs=1e-4)
    assert bad.status_code == 400
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert alive == []
