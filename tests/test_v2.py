"""Open Inference Protocol (v2) endpoints on a real server, through the real
third-party client ``tritonclient.http``; answers checked against an offline
computation (the plain forward) and /batch."""

from __future__ import annotations

import base64
import io
import json
import struct
import time

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from fastapi.testclient import TestClient
from PIL import Image
from tritonclient.utils import InferenceServerException

from model.checkpoint import load
from server.http.app import create_app
from server.images import decode
from server.settings import Settings
from tests.live import LiveServer

pytestmark = pytest.mark.integration
N = 5
MAX_IMAGES = 8


def png(seed: int, size=(28, 28), mode="L") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, size[::-1], dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    # Fixed thresholds: with the online controller on, each request moves them and
    # the same image could leave at a different exit in the reference request.
    env = {"MSDNET_CONTROLLER": "false", "MSDNET_MAX_BATCH_IMAGES": str(MAX_IMAGES), "MSDNET_ACCESS_LOG": "false"}
    with LiveServer(tiny_checkpoint, env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return load(tiny_checkpoint)


@pytest.fixture(scope="module")
def files() -> list[bytes]:
    # Varied sizes and modes, so decoding (resize, luma) matters.
    return [png(0), png(1, (40, 31)), png(2, mode="RGB"), png(3, (28, 28), "RGBA"), png(4, (17, 60))]


@pytest.fixture(scope="module")
def tensor(ckpt, files) -> np.ndarray:
    """The normalised model input, (N, C, H, W) float32, by the server's own decoder."""
    spec = ckpt.transforms
    return np.stack([decode(f, spec, 10**7) for f in files])


@pytest.fixture(scope="module")
def reference(ckpt, tensor) -> list[dict]:
    """What the server must answer for each file, computed offline: the plain
    full forward, each exit's temperature, the checkpoint's fixed thresholds
    (first exit whose confidence reaches its threshold), lazy per-exit FLOPs."""
    cal = ckpt.calibration
    with torch.no_grad():
        logits = torch.stack(ckpt.model.eval()(torch.from_numpy(tensor)))  # (K, N, classes)
    temps = torch.tensor(cal.temperatures, dtype=torch.float64).view(-1, 1, 1)
    probs = torch.softmax(logits.double() / temps, dim=2).numpy()
    flops = ckpt.exit_flops(lazy=True)
    out = []
    for i in range(tensor.shape[0]):
        k = next(k for k in range(len(flops)) if k == len(flops) - 1 or probs[k, i].max() >= cal.thresholds[k])
        p = probs[k, i]
        order = np.argsort(-p)[:5]
        out.append({"class_id": int(order[0]), "label": ckpt.classes[order[0]], "exit": k + 1, "flops": flops[k],
                    "confidence": float(p.max()),
                    "top_k": [{"class_id": int(c), "probability": float(p[c])} for c in order]})
    return out


def test_classify_matches_the_offline_reference(server, files, reference):
    for f, ref in zip(files, reference, strict=True):
        r = httpx.post(server.url + "/classify", json={"image": base64.b64encode(f).decode()}, timeout=30)
        assert r.status_code == 200, r.text
        got = r.json()
        assert (got["class_id"], got["label"], got["exit"], got["flops"]) == (
            ref["class_id"], ref["label"], ref["exit"], ref["flops"])
        assert got["confidence"] == pytest.approx(ref["confidence"], abs=1e-5)


def fp32_input(arr: np.ndarray, binary: bool = True) -> triton.InferInput:
    i = triton.InferInput("image", list(arr.shape), "FP32")
    return i.set_data_from_numpy(arr, binary_data=binary)


def bytes_input(files: list[bytes], binary: bool = True) -> triton.InferInput:
    i = triton.InferInput("image_bytes", [len(files)], "BYTES")
    # As JSON each element is the file base64-encoded (JSON strings cannot carry raw bytes).
    data = files if binary else [base64.b64encode(f) for f in files]
    return i.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)


def outputs(binary: bool, names=("probabilities", "label", "class_id", "exit", "flops")):
    return [triton.InferRequestedOutput(n, binary_data=binary) for n in names]


def check_equals_classify(result, reference: list[dict], exit_flops) -> None:
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (len(reference), 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    class_id, exits, flops = result.as_numpy("class_id"), result.as_numpy("exit"), result.as_numpy("flops")
    assert class_id.dtype == np.int64 and exits.dtype == np.int32 and flops.dtype == np.int64
    labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label").tolist()]
    assert class_id.tolist() == [r["class_id"] for r in reference]
    assert exits.tolist() == [r["exit"] for r in reference]
    assert flops.tolist() == [r["flops"] for r in reference] == [exit_flops[r["exit"] - 1] for r in reference]
    assert labels == [r["label"] for r in reference]
    for row, r in zip(probs, reference, strict=True):
        for t in r["top_k"]:
            assert row[t["class_id"]] == pytest.approx(t["probability"], abs=1e-5)
        assert row.max() == pytest.approx(r["confidence"], abs=1e-5)
    assert result.get_response()["parameters"]["flops_used"] == sum(flops.tolist())


def test_health_and_readiness(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("msdnet") and client.is_model_ready("msdnet", "1")
    assert not client.is_model_ready("resnet50") and not client.is_model_ready("msdnet", "2")


def test_server_metadata(client):
    meta = client.get_server_metadata()
    assert meta["name"] == "msdnet-serve" and meta["version"] == "0.1.0"
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_names_shapes_and_datatypes(client, ckpt):
    meta = client.get_model_metadata("msdnet")
    assert meta == client.get_model_metadata("msdnet", "1")
    assert meta["name"] == "msdnet" and meta["versions"] == ["1"] and meta["platform"] == "pytorch_msdnet"
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("image", "FP32", [-1, 1, 28, 28]), ("image_bytes", "BYTES", [-1])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
        ("probabilities", "FP32", [-1, 10]), ("label", "BYTES", [-1]), ("class_id", "INT64", [-1]),
        ("exit", "INT32", [-1]), ("flops", "INT64", [-1])]
    p = meta["parameters"]
    assert p["exit_flops"] == ",".join(str(f) for f in ckpt.exit_flops(lazy=True)) and p["num_exits"] == 3
    assert [float(m) for m in p["mean"].split(",")] == pytest.approx(ckpt.transforms.mean, rel=1e-5)


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_fp32_tensor_matches_classify(client, tensor, reference, ckpt, binary_in, binary_out):
    result = client.infer("msdnet", [fp32_input(tensor, binary_in)], outputs=outputs(binary_out), request_id="r1")
    check_equals_classify(result, reference, ckpt.exit_flops(lazy=True))
    assert result.get_response()["id"] == "r1" and result.get_response()["model_name"] == "msdnet"
    sent_binary = [("binary_data_size" in o.get("parameters", {})) for o in result.get_response()["outputs"]]
    assert sent_binary == [binary_out] * 5


@pytest.mark.parametrize("binary_in", [True, False])
def test_encoded_images_match_classify(client, files, reference, ckpt, binary_in):
    result = client.infer("msdnet", [bytes_input(files, binary_in)], outputs=outputs(True), model_version="1")
    check_equals_classify(result, reference, ckpt.exit_flops(lazy=True))


def test_default_outputs_are_all_binary_and_a_subset_can_be_asked(client, tensor, reference):
    result = client.infer("msdnet", [fp32_input(tensor)])  # no outputs: binary_data_output=True
    assert [o["name"] for o in result.get_response()["outputs"]] == ["probabilities", "label", "class_id", "exit",
                                                                      "flops"]
    assert result.as_numpy("class_id").tolist() == [r["class_id"] for r in reference]
    only = client.infer("msdnet", [fp32_input(tensor)], outputs=outputs(False, ["exit"]))
    assert only.as_numpy("probabilities") is None
    assert only.as_numpy("exit").tolist() == [r["exit"] for r in reference]


def test_deadline_parameter(client, tensor, reference):
    sent = time.monotonic()
    result = client.infer("msdnet", [fp32_input(tensor)], parameters={"deadline_ms": 10_000})
    took_s = time.monotonic() - sent  # the server's time is within the client's: met whenever this is
    assert result.get_response()["parameters"]["deadline_met"] is True or took_s > 10.0
    assert result.as_numpy("exit").tolist() == [r["exit"] for r in reference]
    with pytest.raises(InferenceServerException) as e:  # not even exit 1 fits in 1 microsecond
        client.infer("msdnet", [fp32_input(tensor[:1])], parameters={"deadline_ms": 0.001})
    assert e.value.status() == "504" and "deadline" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.infer("msdnet", [fp32_input(tensor[:1])], parameters={"deadline_ms": -5})
    assert e.value.status() == "422" and "deadline_ms" in e.value.message()


def test_flops_budget_parameter_matches_batch(server, client, files, tensor, ckpt):
    exit_flops = ckpt.exit_flops(lazy=True)
    budget = N * exit_flops[0] + 2 * (exit_flops[1] - exit_flops[0])
    result = client.infer("msdnet", [fp32_input(tensor)], parameters={"flops_budget": budget})
    flops = result.as_numpy("flops").tolist()
    assert sum(flops) <= budget and all(f in exit_flops for f in flops)
    assert result.get_response()["parameters"] == {"flops_used": sum(flops), "flops_budget": budget}
    r = httpx.post(server.url + "/batch", json={"images": [base64.b64encode(f).decode() for f in files],
                                               "flops_budget": budget}, timeout=30)
    assert r.status_code == 200, r.text
    assert result.as_numpy("exit").tolist() == [x["exit"] for x in r.json()["results"]]
    assert result.as_numpy("class_id").tolist() == [x["class_id"] for x in r.json()["results"]]
    with pytest.raises(InferenceServerException) as e:
        client.infer("msdnet", [fp32_input(tensor)], parameters={"flops_budget": 1000})
    assert e.value.status() == "422" and f"= {N * exit_flops[0]} FLOPs" in e.value.message()


def test_unknown_model_is_404_in_the_protocol_shape(server, client, tensor):
    with pytest.raises(InferenceServerException) as e:
        client.infer("resnet50", [fp32_input(tensor)])
    assert e.value.status() == "404" and e.value.message() == "unknown model 'resnet50'; this server serves 'msdnet'"
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("resnet50")
    assert e.value.status() == "404" and "resnet50" in e.value.message()
    r = httpx.get(server.url + "/v2/models/msdnet/stats")
    assert r.status_code == 404 and set(r.json()) == {"error"} and "stats" in r.json()["error"]


@pytest.mark.parametrize("make,words", [
    (lambda t, f: fp32_input(np.zeros((2, 1, 27, 28), np.float32)), "not [N, 1, 28, 28]"),
    (lambda t, f: triton.InferInput("image", list(t.shape), "FP64").set_data_from_numpy(t.astype(np.float64)),
     "datatype FP32"),
    (lambda t, f: bytes_input([f[0], b"not an image"]), "image_bytes[1]: not an image"),
    (lambda t, f: bytes_input([f[0][:60]]), "image_bytes[0]: truncated or corrupt"),
    (lambda t, f: triton.InferInput("image_bytes", [1], "BYTES").set_data_from_numpy(
        np.array([b"@@@@"], dtype=np.object_), binary_data=False), "image_bytes[0] is not valid base64"),
    (lambda t, f: triton.InferInput("pixels", list(t.shape), "FP32").set_data_from_numpy(t), "unknown input"),
    (lambda t, f: fp32_input(np.full((1, 1, 28, 28), np.nan, np.float32)), "NaN"),
])
def test_malformed_inputs_are_400(client, tensor, files, make, words):
    with pytest.raises(InferenceServerException) as e:
        client.infer("msdnet", [make(tensor, files)])
    assert e.value.status() == "400" and words in e.value.message()


def post_infer(server, header: dict, tail: bytes = b"", header_length: int | None = None) -> httpx.Response:
    head = json.dumps(header).encode()
    headers = {} if not tail and header_length is None else {
        "Inference-Header-Content-Length": str(len(head) if header_length is None else header_length)}
    return httpx.post(server.url + "/v2/models/msdnet/infer", content=head + tail, headers=headers, timeout=30)


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_raw_protocol_errors_are_json_error_strings(server, tensor):
    one = {"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32"}
    rejected = 'msdnet_rejected_requests_total{reason="bad_request"}'
    before = metric(server, rejected)
    cases = [
        (httpx.post(server.url + "/v2/models/msdnet/infer", content=b"{nope", timeout=30), 400, "not valid JSON"),
        (post_infer(server, {"inputs": []}), 400, "exactly one tensor"),
        (post_infer(server, {"inputs": [{**one, "data": [0.0] * 784}] * 2}), 400, "exactly one tensor"),
        (post_infer(server, {"inputs": [{**one, "data": [0.0] * 783}]}), 400, "784 numbers"),
        (post_infer(server, {"inputs": [{**one, "data": ["x"] * 784}]}), 400, "784 numbers"),
        (post_infer(server, {"inputs": [{**one, "parameters": {"binary_data_size": 3136}}]}, b"\0" * 3000), 400,
         "binary_data_size 3136"),
        (post_infer(server, {"inputs": [{**one, "data": [0.0] * 784}], "outputs": [{"name": "logits"}]}), 400,
         "unknown output 'logits'"),
        (post_infer(server, {"inputs": [{**one, "shape": [9, 1, 28, 28], "data": [0.0] * 9 * 784}]}), 413,
         f"at most {MAX_IMAGES}"),
        (post_infer(server, {"inputs": [{**one, "data": [0.0] * 784}], "parameters": {"flops_budget": "lots"}}),
         422, "flops_budget"),
        (post_infer(server, {"inputs": [{**one, "data": [0.0] * 784}], "parameters": {"flops_budget": 1e9,
                                                                                      "deadline_ms": 50}}),
         422, "cannot be combined"),
        (post_infer(server, {"inputs": [{**one, "data": [0.0] * 784}]}, b"", header_length=10**6), 400,
         "Inference-Header-Content-Length"),
        (httpx.post(server.url + "/v2/models/msdnet/infer", content=b"[" * 100_000, timeout=30), 400,
         "not valid JSON"),
        (post_infer(server, {"inputs": [{**one, "data": [0.0] * 784, "parameters": [1]}]}), 400,
         "parameters must be a JSON object"),
        (post_infer(server, {"inputs": [{**one, "data": [0.0] * 784}], "outputs": [{"name": "exit",
                                                                                   "parameters": 3}]}), 400,
         "output 'exit': parameters must be a JSON object"),
    ]
    for r, status, words in cases:
        assert r.status_code == status, (words, r.text)
        assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str), r.text
        assert words in r.json()["error"], (words, r.text)
    # Counted like the other routes' errors.
    assert metric(server, rejected) - before == sum(status == 400 for _, status, _ in cases)
    assert metric(server, 'msdnet_requests_total{endpoint="/v2",status="400"}') >= 10


def test_raw_binary_bytes_and_json_outputs(server, files, reference):
    """The binary layout by hand (uint32 LE length + file per element), JSON outputs."""
    tail = b"".join(struct.pack("<I", len(f)) + f for f in files[:2])
    header = {"id": "x", "inputs": [{"name": "image_bytes", "shape": [2], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(tail)}}]}
    r = post_infer(server, header, tail)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["label"]["data"] == [x["label"] for x in reference[:2]]
    assert out["flops"] == {"name": "flops", "datatype": "INT64", "shape": [2],
                            "data": [x["flops"] for x in reference[:2]]}
    assert out["probabilities"]["shape"] == [2, 10] and len(out["probabilities"]["data"]) == 20


def test_nested_json_data_is_read_row_major(server, tensor, reference):
    header = {"inputs": [{"name": "image", "shape": list(tensor.shape), "datatype": "FP32",
                          "data": tensor.tolist()}], "outputs": [{"name": "class_id"}, {"name": "exit"}]}
    r = post_infer(server, header)
    assert r.status_code == 200, r.text
    out = {o["name"]: o["data"] for o in r.json()["outputs"]}
    assert out == {"class_id": [x["class_id"] for x in reference], "exit": [x["exit"] for x in reference]}


def test_not_ready_is_503_in_the_protocol_shape(tiny_checkpoint):
    # No lifespan run: no service yet, as while the checkpoint loads.
    c = TestClient(create_app(Settings(checkpoint=tiny_checkpoint)))
    assert c.get("/v2/health/live").json() == {"live": True}
    for r in (c.get("/v2/health/ready"), c.get("/v2/models/msdnet/ready"), c.get("/v2/models/msdnet"),
              c.post("/v2/models/msdnet/infer", json={"inputs": []})):
        assert r.status_code == 503 and set(r.json()) == {"error"}, r.text
