"""The request-body reader table (server/http/bodies.py): one reader per media type,
shared by /classify and /batch, with their OpenAPI ``requestBody`` derived from it.
Plain starlette requests, no server, no torch."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from starlette.requests import Request

from server import errors
from server.http import bodies
from server.http.routes import BATCH_BODY, CLASSIFY_BODY


def request(body: bytes, media: str | None, query: str = "") -> Request:
    headers = [(b"content-length", str(len(body)).encode())]
    if media is not None:
        headers.append((b"content-type", media.encode()))
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers, "query_string": query.encode()}
    return Request(scope, receive)


def read(body: bytes, media: str | None, spec=CLASSIFY_BODY, query: str = "", max_images: int = 4) -> bodies.Body:
    return asyncio.run(bodies.read_body(request(body, media, query), spec, max_images))


def multipart(fields: list[tuple[str, bytes, bool]]) -> tuple[bytes, str]:
    """(body, content type) with ``(name, value, is_file)`` parts."""
    out = b""
    for name, value, is_file in fields:
        head = f'--B\r\nContent-Disposition: form-data; name="{name}"'
        head += '; filename="x.png"\r\nContent-Type: image/png' if is_file else ""
        out += head.encode() + b"\r\n\r\n" + value + b"\r\n"
    return out + b"--B--\r\n", "multipart/form-data; boundary=B"


def test_each_media_type_of_classify_gives_the_same_image_and_deadline():
    png = b"\x89PNG-bytes"
    as_json = read(json.dumps({"image": base64.b64encode(png).decode(), "deadline_ms": 250}).encode(),
                   "application/json")
    as_form = read(*multipart([("file", png, True), ("deadline_ms", b"250", False)]))
    as_raw = read(png, "image/png", query="deadline_ms=250")
    as_octets = read(png, "application/octet-stream; charset=x", query="deadline_ms=250")
    for body in (as_json, as_form, as_raw, as_octets):
        assert body.images == [png] and body.number == 250.0
    assert read(png, "IMAGE/JPEG").number is None  # no deadline given; media types are case-blind


def test_a_batch_keeps_each_json_image_encoded_so_a_bad_one_fails_alone():
    good = base64.b64encode(b"one").decode()
    body = read(json.dumps({"images": [good, "not base64!"], "flops_budget": 3e7}).encode(), "application/json",
                spec=BATCH_BODY)
    assert body.number == 3e7 and [type(i) for i in body.images] == [bodies.Base64, bodies.Base64]
    assert body.images[0].decode() == b"one"
    with pytest.raises(errors.BadImage, match=r"images\[1\] is not valid base64"):
        body.images[1].decode()
    form = read(*multipart([("files", b"a", True), ("file", b"b", True), ("flops_budget", b"5e6", False)]),
                spec=BATCH_BODY)
    assert form.images == [b"a", b"b"] and form.number == 5e6


@pytest.mark.parametrize("spec, body", [
    (BATCH_BODY, json.dumps({"images": ["aGk="] * 5}).encode()),
    (BATCH_BODY, None),  # five files in a multipart body
])
def test_a_batch_over_the_image_limit_is_refused_whole(spec, body):
    if body is None:
        body, media = multipart([("files", b"x", True)] * 5)
    else:
        media = "application/json"
    with pytest.raises(errors.TooLarge, match="5"):
        read(body, media, spec=spec, max_images=4)


def test_a_media_type_the_endpoint_does_not_take_is_415_naming_what_it_takes():
    with pytest.raises(errors.UnsupportedMedia) as exc:
        read(b"x", "text/plain")
    assert exc.value.status == 415
    assert exc.value.message == (
        "content type 'text/plain' is not accepted; send application/json, multipart/form-data, image/* "
        "or application/octet-stream")
    with pytest.raises(errors.UnsupportedMedia, match="'image/png' is not accepted; send application/json or "
                                                      "multipart/form-data"):
        read(b"x", "image/png", spec=BATCH_BODY)
    with pytest.raises(errors.UnsupportedMedia, match=r"'\(none\)'"):
        read(b"x", None)
    with pytest.raises(errors.BadRequest, match="'file'"):
        read(*multipart([("deadline_ms", b"5", False)]))


def test_the_openapi_request_body_is_derived_from_the_table(monkeypatch):
    doc = bodies.openapi(CLASSIFY_BODY)
    assert list(doc["requestBody"]["content"]) == list(CLASSIFY_BODY.accepts)
    assert [p["name"] for p in doc["parameters"]] == ["deadline_ms"]  # a raw body has no other place for it
    batch = bodies.openapi(BATCH_BODY)
    assert [p["name"] for p in batch["parameters"]] == ["flops_budget"]  # any body may take it in the query
    assert batch["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["files"]["type"] == "array"
    # a new encoding: one reader in the table and its name in a spec
    monkeypatch.setitem(bodies.READERS, "text/uri-list", bodies.Reader(
        lambda m: m == "text/uri-list", lambda spec: {"schema": {"type": "string"}},
        lambda req, spec, n: _uri_body()))
    spec = bodies.BodySpec("/classify", CLASSIFY_BODY.json_model, "image", "file", "deadline_ms", False,
                           accepts=(*CLASSIFY_BODY.accepts, "text/uri-list"))
    assert bodies.openapi(spec)["requestBody"]["content"]["text/uri-list"] == {"schema": {"type": "string"}}
    assert read(b"file:///x", "text/uri-list", spec=spec).images == [b"fetched"]


async def _uri_body() -> bodies.Body:
    return bodies.Body([b"fetched"], None)
