"""The HTTP API in-process (FastAPI's TestClient, lifespan included) on a tiny model."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from model.checkpoint import load
from tests.inprocess import ready_client


def png(seed: int = 0, size=(28, 28), mode="L") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, size[::-1], dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    with ready_client(tiny_checkpoint, max_batch_size=8, budget_token="s3cret", max_body_bytes=200_000,
                      max_image_pixels=1000 * 1000, max_queue_size=64, max_batch_images=32) as c:
        yield c


@pytest.fixture(scope="module")
def exit_flops(tiny_checkpoint):
    return load(tiny_checkpoint).exit_flops(lazy=True)


def check_result(r: dict, exit_flops) -> None:
    assert set(r) == {"class_id", "label", "confidence", "top_k", "exit", "num_exits", "flops", "deadline_met",
                      "latency_ms", "target_flops", "degraded"}
    assert 1 <= r["exit"] <= r["num_exits"] == 3
    assert r["flops"] == exit_flops[r["exit"] - 1]
    assert r["top_k"][0]["class_id"] == r["class_id"] and r["top_k"][0]["probability"] == r["confidence"]
    assert len(r["top_k"]) == 5 and r["latency_ms"] > 0


def test_classify_multipart_json_and_raw_agree(client, exit_flops):
    data = png(1)
    a = client.post("/classify", files={"file": ("x.png", data, "image/png")})
    b = client.post("/classify", json={"image": b64(data)})
    c = client.post("/classify", content=data, headers={"content-type": "image/png"})
    for r in (a, b, c):
        assert r.status_code == 200, r.text
        check_result(r.json(), exit_flops)
        assert r.json()["deadline_met"] is None
        assert r.headers["x-request-id"]
    assert a.json()["class_id"] == b.json()["class_id"] == c.json()["class_id"]
    assert a.json()["confidence"] == pytest.approx(b.json()["confidence"], abs=1e-6)


def test_deadline_is_reported(client, exit_flops):
    # met or not is the answer's latency against the deadline (how long it took is no test's bar)
    r = client.post("/classify", json={"image": b64(png(2)), "deadline_ms": 5000})
    assert r.status_code == 200 and r.json()["deadline_met"] is (r.json()["latency_ms"] <= 5000)
    r = client.post("/classify", files={"file": ("x.png", png(2), "image/png")}, data={"deadline_ms": "5000"})
    assert r.status_code == 200 and r.json()["deadline_met"] is (r.json()["latency_ms"] <= 5000)


@pytest.mark.parametrize("kwargs,status,words", [
    (dict(content=b"", headers={"content-type": "image/png"}), 400, "empty image"),
    (dict(content=b"not an image at all", headers={"content-type": "image/png"}), 400, "not an image"),
    (dict(json={"image": "%%%"}), 400, "not valid base64"),
    (dict(json={"image": b64(png(3)[:60])}), 400, "truncated or corrupt"),
    (dict(json={"picture": "x"}), 422, "image"),
    (dict(json={"image": b64(png(3)), "deadline_ms": 0}), 422, "deadline_ms"),
    (dict(json={"image": b64(png(3)), "deadline_ms": "soon"}), 422, "deadline_ms"),
    (dict(files={"file": ("x.png", png(3), "image/png")}, data={"deadline_ms": "-3"}), 422, "deadline_ms"),
    (dict(files={"other": ("x.png", png(3), "image/png")}), 400, "'file'"),
    (dict(content=b"x", headers={"content-type": "text/plain"}), 415, "content type"),
    (dict(content=b"{", headers={"content-type": "application/json"}), 422, "json"),
])
def test_bad_input_gets_a_clear_error(client, kwargs, status, words):
    r = client.post("/classify", **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words.lower() in err["message"].lower() and err["code"]


def test_unsupported_format_is_415_and_names_the_supported(client):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "ICO")
    r = client.post("/classify", content=buf.getvalue(), headers={"content-type": "image/x-icon"})
    assert r.status_code == 415 and "PNG" in r.json()["error"]["supported_formats"]


def test_limits_are_413(client):
    big = client.post("/classify", content=b"\0" * 300_000, headers={"content-type": "image/png"})
    assert big.status_code == 413 and "body" in big.json()["error"]["message"]
    chunks = (b"\0" * 50_000 for _ in range(10))  # no Content-Length: counted while streaming
    streamed = client.post("/classify", content=chunks, headers={"content-type": "image/png"})
    assert streamed.status_code == 413
    buf = io.BytesIO()
    Image.new("1", (2000, 2000)).save(buf, "PNG", optimize=True)
    bomb = client.post("/classify", content=buf.getvalue(), headers={"content-type": "image/png"})
    assert bomb.status_code == 413 and "pixel limit" in bomb.json()["error"]["message"]
    # The server is unharmed.
    assert client.post("/classify", json={"image": b64(png(4))}).status_code == 200


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"])
def test_every_mode_is_served(client, mode):
    img = Image.new(mode, (28, 28), 1 if mode in ("1", "P", "I", "I;16", "F") else None)
    buf = io.BytesIO()
    img.save(buf, "TIFF" if mode in ("CMYK", "I;16", "I", "F") else "PNG")
    r = client.post("/classify", content=buf.getvalue(), headers={"content-type": "image/tiff"})
    assert r.status_code == 200, r.text


def test_batch_stays_within_budget_and_keeps_order(client, exit_flops):
    images = [png(i) for i in range(12)]
    budget = 12 * exit_flops[0] + 3 * (exit_flops[1] - exit_flops[0])
    r = client.post("/batch", json={"images": [b64(d) for d in images] + ["@@"], "flops_budget": budget})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["flops_used"] <= budget and body["flops_budget"] == budget
    assert len(body["results"]) == 13 and body["results"][-1]["error"]["code"] == "bad_image"
    assert sum(body["exit_counts"].values()) == 12
    assert body["flops_used"] == sum(x["flops"] for x in body["results"][:12])
    single = [client.post("/classify", json={"image": b64(d)}).json() for d in images]
    same_exit = [(res, one) for res, one in zip(body["results"], single) if res["exit"] == one["exit"]]
    assert same_exit  # at the same exit, /batch and /classify give the same answer
    for res, one in same_exit:
        assert res["class_id"] == one["class_id"]
        assert res["confidence"] == pytest.approx(one["confidence"], abs=1e-6)


def test_batch_budget_below_minimum_is_422_with_the_minimum(client, exit_flops):
    r = client.post("/batch", json={"images": [b64(png(i)) for i in range(4)], "flops_budget": 1000})
    assert r.status_code == 422
    assert r.json()["error"]["minimum_flops_budget"] == 4 * exit_flops[0]
    assert str(4 * exit_flops[0]) in r.json()["error"]["message"]
    r = client.post("/batch", json={"images": [b64(png(0))], "flops_budget": -1})
    assert r.status_code == 422 and "flops_budget" in r.json()["error"]["message"]


def test_batch_multipart_and_default_budget(client):
    files = [("files", (f"{i}.png", png(i), "image/png")) for i in range(3)]
    r = client.post("/batch", files=files)
    assert r.status_code == 200
    target = client.get("/budget").json()["target_flops"]
    assert r.json()["flops_budget"] == pytest.approx(3 * target)
    r = client.post("/batch", files=files, data={"flops_budget": "abc"})
    assert r.status_code == 422


def test_batch_over_the_image_limit_is_413(client):
    r = client.post("/batch", json={"images": [b64(png(0))] * 33})
    assert r.status_code == 413


def test_budget_needs_the_token(client, exit_flops):
    state = client.get("/budget").json()
    assert len(state["thresholds"]) == 3 and state["thresholds"][-1] == 0.0 and state["mode"] == "local"
    assert client.put("/budget", json={"target_flops": exit_flops[1]}).status_code == 401
    bad = client.put("/budget", json={"target_flops": exit_flops[1]}, headers={"authorization": "Bearer nope"})
    assert bad.status_code == 401
    ok = client.put("/budget", json={"target_flops": exit_flops[1]}, headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["target_flops"] == exit_flops[1]
    out = client.put("/budget", json={"target_flops": 1.0}, headers={"authorization": "Bearer s3cret"})
    assert out.status_code == 422 and "exit 1's cost" in out.json()["error"]["message"]


def test_budget_changes_refused_without_a_configured_token(tiny_checkpoint):
    with ready_client(tiny_checkpoint) as c:
        r = c.put("/budget", json={"target_flops": 1e6})
        assert r.status_code == 403 and "MSDNET_BUDGET_TOKEN" in r.json()["error"]["message"]


def test_queue_full_is_503_with_retry_after(tiny_checkpoint):
    with ready_client(tiny_checkpoint, max_queue_size=2) as c:
        r = c.post("/batch", json={"images": [b64(png(i)) for i in range(3)]})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "overloaded"
        assert c.post("/batch", json={"images": [b64(png(i)) for i in range(2)]}).status_code == 200


def test_metrics_count_exits_and_requests(client):
    def value(body, name):
        return sum(float(line.split()[-1]) for line in body.splitlines() if line.startswith(name))

    before = client.get("/metrics").text
    r = client.post("/classify", json={"image": b64(png(9))})
    assert client.post("/classify", content=b"", headers={"content-type": "image/png"}).status_code == 400
    text = client.get("/metrics").text
    exit_label = f'msdnet_exits_total{{exit="{r.json()["exit"]}"}}'
    assert value(text, exit_label) == value(before, exit_label) + 1
    assert value(text, "msdnet_exits_total") == value(before, "msdnet_exits_total") + 1
    ok = 'msdnet_requests_total{endpoint="/classify",status="200"}'
    assert value(text, ok) == value(before, ok) + 1
    bad = 'msdnet_rejected_requests_total{reason="bad_request"}'
    assert value(text, bad) == value(before, bad) + 1
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    for name in ("msdnet_request_duration_seconds_bucket", "msdnet_flops_total", "msdnet_request_flops_bucket",
                 "msdnet_target_flops_per_request", "msdnet_realised_flops_per_request", "msdnet_exit_threshold",
                 "msdnet_queue_depth", "msdnet_batch_size_bucket", "msdnet_deadline_misses_total",
                 "msdnet_rejected_requests_total", "msdnet_model_info"):
        assert name in samples, name  # a sample line, not only its HELP text


def test_openapi_documents_bodies_with_examples(client):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data", "image/*"} <= set(body)
    assert body["application/json"]["example"]["deadline_ms"] == 1000
    assert "flops_budget" in spec["paths"]["/batch"]["post"]["requestBody"]["content"]["application/json"]["example"]


def test_a_feedback_label_of_true_or_8_0_is_no_class_id_and_the_answer_stays_unlabelled(client):
    r = client.post("/classify", content=png(3), headers={"content-type": "image/png", "x-request-id": "fb-strict"})
    assert r.status_code == 200
    for bad in (True, False, 8.0, None, [1]):
        got = client.post("/feedback", json={"request_id": "fb-strict", "label": bad})
        assert got.status_code == 422 and got.json()["error"]["field"].startswith("label"), (bad, got.text)
    ok = client.post("/feedback", json={"request_id": "fb-strict", "label": 1})  # not taken by a refused one
    assert ok.status_code == 200 and ok.json()["label"] == 1


def test_wrapped_base64_and_a_data_url_decode_like_plain_base64(client):
    data = png(4)
    plain = client.post("/classify", json={"image": b64(data)}).json()
    text = b64(data)
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76)) + "\n"  # GNU base64's output
    for form in (wrapped, wrapped.replace("\n", "\r\n"), "data:image/png;base64," + text):
        r = client.post("/classify", json={"image": form})
        assert r.status_code == 200, r.text
        assert (r.json()["class_id"], r.json()["exit"]) == (plain["class_id"], plain["exit"])
    bad = client.post("/classify", json={"image": text[:-4] + "!!!!"})
    assert bad.status_code == 400 and "not valid base64" in bad.json()["error"]["message"]


def test_the_deadline_in_the_query_string_follows_one_rule_whatever_the_body(client):
    data = png(5)
    bad = client.post("/classify?deadline_ms=abc", files={"file": ("x.png", data, "image/png")})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "deadline_ms"
    twice = client.post("/classify?deadline_ms=50", files={"file": ("x.png", data, "image/png")},
                        data={"deadline_ms": "50"})
    assert twice.status_code == 422 and "twice" in twice.json()["error"]["message"]
    for r in (client.post("/classify?deadline_ms=5000", json={"image": b64(data)}),
              client.post("/classify?deadline_ms=5000", files={"file": ("x.png", data, "image/png")})):
        assert r.status_code == 200 and r.json()["deadline_met"] is not None  # the query's deadline was used
    batch = client.post("/batch?flops_budget=-1", json={"images": [b64(data)]})
    assert batch.status_code == 422 and batch.json()["error"]["field"] == "flops_budget"


def test_two_file_fields_in_one_classify_upload_are_refused_not_half_answered(client):
    two = [("file", ("a.png", png(1), "image/png")), ("file", ("b.png", png(2), "image/png"))]
    r = client.post("/classify", files=two)
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "2 file fields" in message and "/batch" in message
