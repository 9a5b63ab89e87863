"""Every request is answered or refused cleanly (issue: faults found with real-world inputs).

In-process (FastAPI's TestClient, lifespan included) on the tiny model; the
cases that need a real socket (raw header bytes, slow clients, logs, several
workers) run a real ``msdnet serve`` process. Nothing here depends on the CPU's
speed: where a request must be in flight, a test hook holds the model step.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from model.checkpoint import load
from tests.inprocess import ready_client
from tests.live import LiveServer, free_port


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def picture(seed: int, size=(28, 28)) -> np.ndarray:
    """A grey picture with no symmetry: noise plus a bright corner block."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 120, size[::-1], dtype=np.uint8)
    a[: size[1] // 3, : size[0] // 4] = 250
    return a


def metric(text: str, name: str) -> float:
    """Sum of the samples whose line starts with ``name`` (labels included)."""
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


class Hold:
    """Holds the model thread before its next step until :meth:`release`
    (the runner's ``step_hook``): work stays in flight however fast the CPU."""

    def __init__(self, runner):
        self.entered, self.released, self.runner = threading.Event(), threading.Event(), runner

    def __call__(self, block, batch):
        self.entered.set()
        assert self.released.wait(60), "test never released the step"

    def __enter__(self):
        self.runner.step_hook = self
        return self

    def release(self):
        self.runner.step_hook = None
        self.released.set()

    def __exit__(self, *exc):
        self.release()


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    # Fixed thresholds: the same picture always leaves at the same exit, so answers can be compared.
    with ready_client(tiny_checkpoint, max_batch_size=8, max_body_bytes=4_000_000, max_batch_images=32,
                      controller=False) as c:
        yield c


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return load(tiny_checkpoint)


def normalised(ck, grey: np.ndarray) -> np.ndarray:
    """The model input for a 28 x 28 grey picture, computed here: (x / 255 - mean) / std."""
    mean, std = ck.transforms.mean[0], ck.transforms.std[0]
    return ((grey.astype(np.float32) / 255.0 - mean) / std)[None].astype(np.float32)


def probs_of(r: httpx.Response) -> dict[int, float]:
    assert r.status_code == 200, r.text
    return {t["class_id"]: t["probability"] for t in r.json()["top_k"]}


# ---- 1. header bytes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{"X-Note": b"caf\xe9"}, {"X-Request-ID": b"\xff\xfe"},
                                     {"User-Agent": b"M\xfcller-Client/1.0"}])
def test_non_utf8_header_bytes_never_fail_a_request(client, headers):
    before = client.get("/metrics").text
    assert client.get("/healthz", headers=headers).json() == {"status": "ok"}
    assert client.get("/readyz", headers=headers).status_code == 200
    r = client.post("/classify", content=encode(Image.fromarray(picture(1)), "PNG"),
                    headers={"content-type": "image/png", **headers})
    assert r.status_code == 200 and len(r.headers["x-request-id"]) == 16
    after = client.get("/metrics").text
    for endpoint in ("/healthz", "/readyz", "/classify"):
        name = f'msdnet_requests_total{{endpoint="{endpoint}",status="200"}}'
        assert metric(after, name) == metric(before, name) + 1, endpoint


# ---- 2, 3. numbers ---------------------------------------------------------------------------------------------
HUGE = "1" + "0" * 400  # an integer literal no float can hold


def post_json(client, path, text):
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize("path,text,field", [
    ("/classify", '{"image": "%s", "deadline_ms": ' + HUGE + "}", "deadline_ms"),
    ("/classify", '{"image": "%s", "deadline_ms": 1e309}', "deadline_ms"),
    ("/classify", '{"image": "%s", "deadline_ms": "Infinity"}', "deadline_ms"),
    ("/classify", '{"image": "%s", "deadline_ms": NaN}', "deadline_ms"),
    ("/batch", '{"images": ["%s"], "flops_budget": 1e309}', "flops_budget"),
    ("/batch", '{"images": ["%s"], "flops_budget": "Infinity"}', "flops_budget"),
    ("/batch", '{"images": ["%s"], "flops_budget": ' + HUGE + "}", "flops_budget"),
])
def test_numbers_beyond_float_are_422_naming_the_field(client, path, text, field):
    r = post_json(client, path, text % b64(encode(Image.fromarray(picture(2)), "PNG")))
    assert r.status_code in (400, 422), r.text  # NaN is not JSON: 422 from the JSON parser, still named
    if r.status_code == 422:
        assert r.json()["error"]["field"] == field and "positive finite" in r.json()["error"]["message"] \
            or "json" in r.json()["error"]["message"].lower()


@pytest.mark.parametrize("value", ["inf", "Infinity", "1e309", "nan", HUGE, "0", "-5"])
def test_multipart_and_json_budgets_follow_one_rule(client, value):
    data = encode(Image.fromarray(picture(3)), "PNG")
    form = client.post("/batch", files=[("files", ("a.png", data, "image/png"))], data={"flops_budget": value})
    assert form.status_code == 422 and form.json()["error"]["field"] == "flops_budget", form.text
    as_json = value if value not in ("inf", "Infinity", "nan") else json.dumps(value)
    body = post_json(client, "/batch", f'{{"images": ["{b64(data)}"], "flops_budget": {as_json}}}')
    assert body.status_code == 422 and body.json()["error"]["field"] == "flops_budget", body.text


def v2_body(ck, data: list, parameters: dict | None = None) -> str:
    one = {"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": data}
    # json.dumps writes Python ints of any size as integer literals, and inf as Infinity.
    return json.dumps({"inputs": [one], "parameters": parameters or {}})


@pytest.mark.parametrize("name", ["flops_budget", "deadline_ms"])
def test_v2_huge_parameters_are_422(client, ckpt, name):
    r = post_json(client, "/v2/models/msdnet/infer", v2_body(ckpt, [0.0] * 784, {name: 10 ** 400}))
    assert r.status_code == 422 and name in r.json()["error"], r.text


def test_v2_tensor_element_beyond_float_is_400(client, ckpt):
    r = post_json(client, "/v2/models/msdnet/infer", v2_body(ckpt, [10 ** 400] + [0.0] * 783))
    assert r.status_code == 400 and "image" in r.json()["error"], r.text


@pytest.fixture(scope="module")
def shipped():
    """The shipped Fashion-MNIST model: an input of 3e38 everywhere overflows it (the tiny one stays finite)."""
    from model.checkpoint import DEFAULT_CHECKPOINT

    with ready_client(DEFAULT_CHECKPOINT) as c:
        yield c


@pytest.mark.parametrize("binary_out", [False, True])
def test_overflowing_input_is_422_non_finite_and_charges_nothing(shipped, binary_out):
    client = shipped
    before_budget, before = client.get("/budget").json(), client.get("/metrics").text
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [3e38] * 784}],
            "parameters": {"binary_data_output": binary_out}}
    r = client.post("/v2/models/msdnet/infer", json=body)
    assert r.status_code == 422 and "not finite" in r.json()["error"], r.text
    after_budget, after = client.get("/budget").json(), client.get("/metrics").text
    assert after_budget["requests"] == before_budget["requests"]
    assert metric(after, 'msdnet_flops_total{endpoint="/classify"}') == \
        metric(before, 'msdnet_flops_total{endpoint="/classify"}')
    assert metric(after, "msdnet_exits_total") == metric(before, "msdnet_exits_total")
    assert metric(after, 'msdnet_rejected_requests_total{reason="non_finite_output"}') == \
        metric(before, 'msdnet_rejected_requests_total{reason="non_finite_output"}') + 1


def test_overflowing_input_in_a_budgeted_batch_is_refused_too(shipped):
    client = shipped
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [3e38] * 784}],
            "parameters": {"flops_budget": 1e12}}
    r = client.post("/v2/models/msdnet/infer", json=body)
    assert r.status_code == 422 and "not finite" in r.json()["error"]


# ---- 5, 6, 7. the same picture gets the same answer ------------------------------------------------------------
# Stored pixels for each EXIF orientation such that the tag's transform gives the upright picture back
# (EXIF 2.32, tag 0x0112: 6 = "rotate 90 degrees clockwise to view", 8 = counter-clockwise, 5/7 transposes).
STORED = {1: lambda u: u, 2: np.fliplr, 3: lambda u: np.rot90(u, 2), 4: np.flipud, 5: lambda u: u.T,
          6: lambda u: np.rot90(u, 1), 7: lambda u: np.rot90(u, 2).T, 8: lambda u: np.rot90(u, -1)}


def with_orientation(stored: np.ndarray, tag: int, fmt: str = "PNG", **kw) -> bytes:
    img = Image.fromarray(np.ascontiguousarray(stored))
    exif = Image.Exif()
    exif[0x0112] = tag
    return encode(img, fmt, exif=exif.tobytes(), **kw)


@pytest.mark.parametrize("tag", range(1, 9))
def test_exif_orientation_is_applied(client, tag):
    upright = picture(5, size=(20, 28))  # not square: a rotation changes the shape
    expected = probs_of(client.post("/classify", content=encode(Image.fromarray(upright), "PNG"),
                                    headers={"content-type": "image/png"}))
    got = probs_of(client.post("/classify", content=with_orientation(STORED[tag](upright), tag),
                               headers={"content-type": "image/png"}))
    assert got.keys() == expected.keys()
    assert all(abs(got[k] - expected[k]) < 1e-6 for k in got)


@pytest.mark.parametrize("tag", [0, 9, 65535])
def test_invalid_orientation_tags_are_ignored(client, tag):
    stored = np.rot90(picture(6, size=(20, 28)), 1)
    plain = probs_of(client.post("/classify", content=encode(Image.fromarray(np.ascontiguousarray(stored)), "PNG"),
                                 headers={"content-type": "image/png"}))
    tagged = probs_of(client.post("/classify", content=with_orientation(stored, tag),
                                  headers={"content-type": "image/png"}))
    assert all(abs(tagged[k] - plain[k]) < 1e-6 for k in plain)


def test_corrupt_exif_never_500s(client):
    jpeg = encode(Image.fromarray(picture(7)), "JPEG", quality=95)
    # An APP1 Exif segment whose TIFF header is garbage, inserted after SOI.
    payload = b"Exif\x00\x00II*\x00\xff\xff\xff\x7f" + b"\x12\x01" * 20
    corrupt = jpeg[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]
    r = client.post("/classify", content=corrupt, headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text


def test_transparency_has_one_rule_for_every_mode(client):
    grey = picture(8)
    grey[grey == 77] = 78
    grey[5:9, 5:20] = 77  # the transparent grey level, only here
    alpha = np.where(grey == 77, 0, 255).astype(np.uint8)
    rgb = np.stack([grey, grey, grey], -1)
    la = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)])
    reference = probs_of(client.post("/classify", content=encode(la, "PNG"), headers={"content-type": "image/png"}))
    variants = {
        "L+tRNS": encode(Image.fromarray(grey), "PNG", transparency=77),
        "RGB+tRNS": encode(Image.fromarray(rgb), "PNG", transparency=(77, 77, 77)),
        "P+tRNS": encode(Image.fromarray(grey).convert("P"), "PNG", transparency=int(np.asarray(
            Image.fromarray(grey).convert("P"))[6, 6])),
        "RGBA": encode(Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), "RGBA"), "PNG"),
        "I;16+tRNS": encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG", transparency=77 * 257),
    }
    for name, data in variants.items():
        got = probs_of(client.post("/classify", content=data, headers={"content-type": "image/png"}))
        assert all(abs(got[k] - reference[k]) < 1e-6 for k in reference), name


def test_camera_jpeg_with_preview_is_served_as_its_primary_image(client):
    primary = Image.fromarray(picture(9))
    preview = primary.resize((14, 14))
    mpo = encode(primary, "MPO", save_all=True, append_images=[preview], quality=95)
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    plain = encode(primary, "JPEG", quality=95)
    a = client.post("/classify", content=mpo, headers={"content-type": "image/jpeg"})
    b = client.post("/classify", content=plain, headers={"content-type": "image/jpeg"})
    assert a.status_code == 200, a.text
    assert probs_of(a) == pytest.approx(probs_of(b), abs=1e-6)


@pytest.mark.parametrize("head,name", [(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIF"),
                                       (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00", "AVIF"),
                                       (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG")])
def test_known_unreadable_formats_are_415(client, head, name):
    r = client.post("/classify", content=head + b"\x00" * 64, headers={"content-type": "image/heic"})
    assert r.status_code == 415 and name in r.json()["error"]["message"]
    assert "PNG" in r.json()["error"]["supported_formats"]


LOSSLESS = {"PNG": {}, "WEBP": {"lossless": True}, "BMP": {}, "TIFF": {}, "PPM": {}, "GIF": {}}


def transports(client, data: bytes) -> dict[str, httpx.Response]:
    v2 = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [b64(data)]}]}
    return {
        "multipart": client.post("/classify", files={"file": ("x", data, "application/octet-stream")}),
        "raw": client.post("/classify", content=data, headers={"content-type": "application/octet-stream"}),
        "json": client.post("/classify", json={"image": b64(data)}),
        "v2-bytes": client.post("/v2/models/msdnet/infer", json=v2),
    }


def answer(r: httpx.Response) -> tuple[int, np.ndarray | dict]:
    assert r.status_code == 200, r.text
    body = r.json()
    if "outputs" in body:
        out = {o["name"]: o["data"] for o in body["outputs"]}
        return out["class_id"][0], np.asarray(out["probabilities"])
    return body["class_id"], {t["class_id"]: t["probability"] for t in body["top_k"]}


def same(a, b) -> bool:
    """Probabilities equal within 1e-6 (top-k dicts, or a full vector against a top-k dict)."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return bool(np.abs(a - b).max() < 1e-6)
    if isinstance(a, np.ndarray):
        a, b = b, a
    if isinstance(b, np.ndarray):
        return all(abs(p - b[k]) < 1e-6 for k, p in a.items())
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-6 for k in a)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_every_common_encoding_and_transport_gives_the_same_answer(client, ckpt, seed):
    """The property: one picture, every encoding a common client produces, every
    transport: the same class; for lossless encodings the same probabilities."""
    grey = picture(seed)
    tensor = normalised(ckpt, grey)
    v2 = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28],
                      "data": tensor.ravel().tolist()}]}
    ref_class, ref_probs = answer(client.post("/v2/models/msdnet/infer", json=v2))
    img = Image.fromarray(grey)
    encodings = {fmt: encode(img, fmt, **kw) for fmt, kw in LOSSLESS.items()}
    encodings["PNG+orientation 6"] = with_orientation(STORED[6](grey), 6)
    encodings["TIFF RGB"] = encode(img.convert("RGB"), "TIFF")
    lossy = {"JPEG q=100": encode(img, "JPEG", quality=100),
             "JPEG q=100+orientation 8": with_orientation(STORED[8](grey), 8, "JPEG", quality=100)}
    for name, data in {**encodings, **lossy}.items():
        for transport, r in transports(client, data).items():
            cls, probs = answer(r)
            assert cls == ref_class, (name, transport)
            if name in encodings:
                assert same(probs, ref_probs), (name, transport)


# ---- 8, 10. one error contract; request ids --------------------------------------------------------------------
def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    return body["error"]


def test_errors_outside_the_routes_have_the_service_shape(client):
    assert error_of(client.get("/no-such-route"))["code"] == "not_found"
    r = client.get("/classify")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and error_of(r)["code"] == "method_not_allowed"
    no_boundary = client.post("/classify", content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
    assert no_boundary.status_code == 400 and error_of(no_boundary)["message"]
    body = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\nxx\r\n--b--\r\n"
    mismatched = client.post("/classify", content=body, headers={"content-type": "multipart/form-data; boundary=c"})
    assert mismatched.status_code == 400, mismatched.text
    assert error_of(mismatched)["code"] == "bad_request"
    big_field = client.post("/classify", files={"file": ("a.png", b"x", "image/png")},
                            data={"deadline_ms": "1" * 2_000_000})
    assert big_field.status_code == 413 and error_of(big_field)["code"] == "too_large"


def test_v2_paths_keep_the_protocol_shape_and_405_with_allow(client):
    r = client.post("/v2/health/live")
    assert r.status_code == 405 and r.headers["allow"] == "GET" and isinstance(r.json()["error"], str)
    r = client.get("/v2/models/msdnet/infer")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = client.get("/v2/models/msdnet/config")
    assert r.status_code == 404 and isinstance(r.json()["error"], str)


@pytest.mark.parametrize("given,echoed", [("abc-123_x.y:z", True), ("a" * 128, True), ("a" * 129, False),
                                          ("x" * 8000, False), ("bad\x01id", False), ("has space", False)])
def test_request_ids_are_echoed_only_when_bounded_and_printable(client, given, echoed):
    r = client.get("/healthz", headers={"x-request-id": given})
    assert (r.headers["x-request-id"] == given) is echoed
    assert len(r.headers["x-request-id"]) <= 128


# ---- 14. held steps, not races ------------------------------------------------------------------------------------
def test_healthz_answers_while_a_batch_is_in_flight(client):
    runner = client.app.state.engine.runner
    images = [b64(encode(Image.fromarray(picture(i)), "PNG")) for i in range(16)]
    result = {}
    with Hold(runner) as hold:
        t = threading.Thread(target=lambda: result.setdefault(
            "r", client.post("/batch", json={"images": images, "flops_budget": 1e12})))
        t.start()
        assert hold.entered.wait(60)
        assert client.get("/healthz").json() == {"status": "ok"}
        assert "r" not in result  # answered while the batch was held in the model thread
    t.join(60)
    assert result["r"].status_code == 200 and len(result["r"].json()["results"]) == 16


def test_expired_deadline_is_504_and_spends_nothing(client):
    runner = client.app.state.engine.runner
    first = b64(encode(Image.fromarray(picture(20)), "PNG"))
    before = client.get("/metrics").text
    with Hold(runner) as hold:
        t = threading.Thread(target=lambda: client.post("/classify", json={"image": first}))
        t.start()
        assert hold.entered.wait(60)  # the model thread is busy with the first request
        late = {}
        t2 = threading.Thread(target=lambda: late.setdefault("r", client.post(
            "/classify", json={"image": b64(encode(Image.fromarray(picture(21)), "PNG")), "deadline_ms": 1})))
        t2.start()
        deadline = time.monotonic() + 60
        # Either outcome is the rule: refused before decoding when 1 ms has passed by the time
        # the route checks, or queued behind the held step and expired there.
        while runner.scheduler.depth(0) == 0 and t2.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.01)  # its 1 ms deadline has passed
    t.join(60)
    t2.join(60)
    r = late["r"]
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    after = client.get("/metrics").text
    spent = 'msdnet_flops_total{endpoint="/classify"}'
    exit_flops = client.app.state.engine.exit_flops
    first_exit = int(metric(after, "msdnet_exits_total") - metric(before, "msdnet_exits_total"))
    assert first_exit == 1  # only the first request was answered
    assert metric(after, spent) - metric(before, spent) in exit_flops  # one request's cost, none for the 504
    assert metric(after, "msdnet_deadline_misses_total") == metric(before, "msdnet_deadline_misses_total") + 1


# ---- with a real process: raw bytes, slow clients, logs, several workers ---------------------------------------
@pytest.fixture(scope="module")
def live(tiny_checkpoint):
    with LiveServer(tiny_checkpoint, {"MSDNET_RECEIVE_TIMEOUT_S": "1", "MSDNET_MAX_PENDING_CONNECTIONS": "4"}) as srv:
        yield srv


def raw_exchange(port: int, data: bytes, wait_s: float = 30.0) -> bytes:
    """Send ``data``, then read until the server closes (or ``wait_s`` passes)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(data)
        s.settimeout(wait_s)
        out = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
        return out


def test_raw_latin1_header_over_a_real_socket(live):
    out = raw_exchange(live.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Note: caf\xe9\r\n"
                                  b"X-Request-ID: \xff\xfe\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b'{"status":"ok"}')


def test_slow_clients_get_408_and_are_counted(live):
    before = httpx.get(live.url + "/metrics").text
    body = raw_exchange(live.port, b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                                   b"Content-Length: 1000\r\n\r\n0123456789")
    assert body.startswith(b"HTTP/1.1 408")
    assert json.loads(body.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    head = raw_exchange(live.port, b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Le")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(head.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    after = httpx.get(live.url + "/metrics").text
    name = 'msdnet_rejected_requests_total{reason="timeout"}'
    assert metric(after, name) == metric(before, name) + 2
    assert metric(after, 'msdnet_requests_total{endpoint="/classify",status="408"}') == \
        metric(before, 'msdnet_requests_total{endpoint="/classify",status="408"}') + 1


def test_connections_waiting_for_headers_are_bounded(live):
    idle = [socket.create_connection(("127.0.0.1", live.port)) for _ in range(4)]
    try:
        time.sleep(0.2)  # let the server accept them
        extra = raw_exchange(live.port, b"GET /hea", wait_s=30)
        assert extra == b""  # closed at once, not held until the timeout
    finally:
        for s in idle:
            s.close()
    assert httpx.get(live.url + "/healthz").status_code == 200


def test_every_log_line_is_json_even_from_libraries(live):
    bad = b"--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nxx\r\n--b--\r\n"
    for ctype in ("multipart/form-data; boundary=c", "multipart/form-data", "multipart/form-data; boundary="):
        r = httpx.post(live.url + "/classify", content=bad, headers={"content-type": ctype})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    lines = [line for line in live.read_log().splitlines() if line.strip()]
    assert lines
    for line in lines:
        json.loads(line)


def test_several_worker_processes_are_refused_in_the_app(tiny_checkpoint):
    port = free_port()
    env = {**LiveServer(tiny_checkpoint).env, "MSDNET_CHECKPOINT": str(tiny_checkpoint)}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "server.http.app:create_app", "--workers",
                             "2", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=240)
    finally:  # never leave uvicorn's worker processes behind, whatever happened
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    # uvicorn stops the whole server when a worker fails its startup (its parent then exits 0).
    assert "another worker process already serves this listening socket" in log
    assert "Application startup failed" in log and "stopping the parent process" in log
