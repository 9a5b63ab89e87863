"""The OpenAPI document describes what the server does.

Every response recorded here, to good and bad requests on every route, must be
listed in the document for its route and method with its status, content type
and a body that validates against the documented schema (JSON Schema 2020-12,
the dialect of OpenAPI 3.1). The documented examples must work when sent. And
``/docs`` renders offline in a real headless browser.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess

import httpx
import jsonschema
import pytest
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from server.http.schemas import EXAMPLE_IMAGE
from tests.inprocess import ready_client
from tests.live import LiveServer


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    with ready_client(tiny_checkpoint, budget_token="t0ken", max_batch_images=4, max_body_bytes=100_000) as c:
        yield c


@pytest.fixture(scope="module")
def spec(client):
    return client.get("/openapi.json").json()


def operation(spec: dict, method: str, path: str) -> dict:
    for template, ops in spec["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path) and method.lower() in ops:
            return ops[method.lower()]
    raise AssertionError(f"{method} {path} is not in the document")


def check(spec: dict, r: httpx.Response) -> None:
    """``r`` is what the document says its route can answer."""
    op = operation(spec, r.request.method, r.request.url.path)
    status = str(r.status_code)
    assert status in op["responses"], f"{r.request.method} {r.request.url.path} answered {status}, undocumented"
    content = op["responses"][status].get("content", {})
    ctype = r.headers.get("content-type", "").split(";")[0]
    assert ctype in content, f"{r.request.url.path} {status}: content type {ctype} not in {list(content)}"
    if ctype == "application/json":
        registry = Registry().with_resource("urn:spec", DRAFT202012.create_resource(spec))
        schema = json.loads(json.dumps(content[ctype]["schema"]).replace('"#/components', '"urn:spec#/components'))
        jsonschema.Draft202012Validator(schema, registry=registry).validate(r.json())


def test_recorded_responses_match_the_document(client, spec):
    img = base64.b64decode(EXAMPLE_IMAGE)
    auth = {"authorization": "Bearer t0ken"}
    v2_one = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [EXAMPLE_IMAGE]}]}
    responses = [
        client.get("/healthz"), client.get("/readyz"), client.get("/metrics"), client.get("/budget"),
        client.post("/classify", json={"image": EXAMPLE_IMAGE, "deadline_ms": 5000}),
        client.post("/classify", content=img, headers={"content-type": "image/png"}),
        client.post("/classify", content=img, headers={"content-type": "application/octet-stream"},
                    params={"deadline_ms": 100}),
        client.post("/classify", files={"file": ("a.png", img, "image/png")}),
        client.post("/classify", json={"image": "%%%"}),                                   # 400
        client.post("/classify", content=b"x" * 200_000, headers={"content-type": "image/png"}),  # 413
        client.post("/classify", content=b"x", headers={"content-type": "text/plain"}),    # 415
        client.post("/classify", json={"image": EXAMPLE_IMAGE, "deadline_ms": -1}),        # 422
        client.post("/batch", json={"images": [EXAMPLE_IMAGE] * 2}),
        client.post("/batch", json={"images": [EXAMPLE_IMAGE, "@@"], "flops_budget": 1e12}),
        client.post("/batch", json={"images": [EXAMPLE_IMAGE] * 5}),                       # 413
        client.post("/batch", json={"images": [EXAMPLE_IMAGE], "flops_budget": 1}),        # 422
        client.post("/batch", content=img, headers={"content-type": "image/png"}),         # 415
        client.put("/budget", json={"target_flops": 1e30}, headers=auth),                  # 422
        client.put("/budget", json={"target_flops": client.get("/budget").json()["target_flops"]}, headers=auth),
        client.put("/budget", json={"target_flops": 1e6}),                                 # 401
        client.get("/v2/health/live"), client.get("/v2/health/ready"), client.get("/v2"),
        client.get("/v2/models/msdnet"), client.get("/v2/models/msdnet/ready"),
        client.get("/v2/models/msdnet/versions/1"), client.get("/v2/models/other"),        # 404
        client.post("/v2/models/msdnet/infer", json=v2_one),
        client.post("/v2/models/msdnet/infer", json={**v2_one, "parameters": {"binary_data_output": True}}),
        client.post("/v2/models/msdnet/infer", json={"inputs": []}),                        # 400
        client.post("/v2/models/msdnet/infer", json={**v2_one, "parameters": {"deadline_ms": 0}}),  # 422
        client.post("/v2/models/nope/infer", json=v2_one),                                  # 404
        client.post("/classify", content=img, headers={"content-type": "image/png", "x-request-id": "oa-1"}),
        client.post("/feedback", json={"request_id": "oa-1", "label": 9}),
        client.post("/feedback", json={"request_id": "oa-1", "label": "Ankle boot"}),       # 409
        client.post("/feedback", json={"request_id": "nobody", "label": 9}),                # 404
        client.post("/feedback", json={"request_id": "oa-1", "label": 10}),                 # 422
        client.post("/feedback", content=b"x", headers={"content-type": "text/plain"}),     # 415
    ]
    statuses = set()
    for r in responses:
        check(spec, r)
        statuses.add(r.status_code)
    assert {200, 400, 401, 404, 409, 413, 415, 422} <= statuses


def test_not_ready_and_unexpected_errors_are_documented(spec):
    for path, method in (("/classify", "post"), ("/batch", "post"), ("/readyz", "get"), ("/metrics", "get"),
                         ("/v2/models/{name}/infer", "post")):
        responses = spec["paths"][path][method]["responses"]
        assert {"500", "503"} <= set(responses), path
    assert "504" in spec["paths"]["/classify"]["post"]["responses"]
    assert "408" in spec["paths"]["/classify"]["post"]["responses"]


def test_every_503_documents_retry_after_and_the_latency_objective(spec):
    for path, method in (("/classify", "post"), ("/batch", "post"), ("/v2/models/{name}/infer", "post")):
        r503 = spec["paths"][path][method]["responses"]["503"]
        assert r503["headers"]["Retry-After"]["schema"] == {"type": "integer"}, path
        assert "MSDNET_LATENCY_SLO_MS" in r503["description"] and "before decoding" in r503["description"]


def test_content_types_are_the_real_ones(spec):
    classify = spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    batch = spec["paths"]["/batch"]["post"]["requestBody"]["content"]
    assert set(classify) == {"application/json", "multipart/form-data", "image/*", "application/octet-stream"}
    assert set(batch) == {"application/json", "multipart/form-data"}  # no raw image bodies on /batch
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(metrics) == {"text/plain"}


@pytest.fixture(scope="module")
def shipped_client():
    """The shipped model: the documented examples (a real Fashion-MNIST PNG, budgets in its FLOPs range) are for it."""
    from model.checkpoint import DEFAULT_CHECKPOINT

    with ready_client(DEFAULT_CHECKPOINT, budget_token="t0ken") as c:
        yield c


def test_documented_examples_work_when_sent(shipped_client, spec):
    client = shipped_client
    for path, method in (("/classify", "post"), ("/batch", "post"), ("/v2/models/{name}/infer", "post")):
        example = spec["paths"][path][method]["requestBody"]["content"]["application/json"]["example"]
        r = client.request(method, path.replace("{name}", "msdnet"), json=example)
        assert r.status_code == 200, (path, r.text)
        check(spec, r)
    example = spec["paths"]["/feedback"]["post"]["requestBody"]["content"]["application/json"]["example"]
    answer = client.post("/classify", content=base64.b64decode(EXAMPLE_IMAGE),
                         headers={"content-type": "image/png", "x-request-id": example["request_id"]})
    r = client.post("/feedback", json=example)  # labels the answer just given
    assert answer.status_code == 200 and r.status_code == 200, r.text
    check(spec, r)
    example = spec["paths"]["/budget"]["put"]["requestBody"]["content"]["application/json"]["example"]
    r = client.put("/budget", json=example, headers={"authorization": "Bearer t0ken"})
    assert r.status_code == 200 and r.json()["target_flops"] == example["target_flops"]


@pytest.mark.integration
def test_docs_render_offline_in_a_real_browser(tiny_checkpoint, tmp_path):
    """Headless chromium with every host but the server unresolvable: the Swagger UI
    assets come from the package, and the operations list renders."""
    with LiveServer(tiny_checkpoint) as srv:
        page = httpx.get(srv.url + "/docs").text
        assert "cdn.jsdelivr.net" not in page and "unpkg.com" not in page
        out = subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path}", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
             "--virtual-time-budget=15000", "--dump-dom", srv.url + "/docs"],
            capture_output=True, text=True, timeout=120)
    dom = out.stdout
    assert "opblock" in dom, out.stderr[-2000:]
    for path in ("/classify", "/batch", "/v2/models/{name}/infer"):
        assert path in dom, path
