"""Open Inference Protocol (KServe / Triton "v2") REST endpoints.

Routes (model name ``msdnet``, version ``1``; ``/versions/1`` variants too)::

    GET  /v2/health/live              200 {"live": true}
    GET  /v2/health/ready             200 {"ready": true} once warmed up, else 503
    GET  /v2                          server metadata
    GET  /v2/models/msdnet            model metadata (tensor names, datatypes, shapes)
    GET  /v2/models/msdnet/ready      200 {"name", "ready": true}, else 503
    POST /v2/models/msdnet/infer      inference

Inputs (exactly one per request; N images, 1 <= N <= ``max_batch_images``):

- ``image`` FP32 [N, C, H, W]: the *normalised* model input, exactly what
  :func:`server.images.decode` returns: ``(pixel / 255 - mean) / std`` per channel
  (mean, std, C, H = W in the model metadata's ``parameters``);
- ``image_bytes`` BYTES [N]: encoded image files (PNG, JPEG, ...), decoded as
  ``/classify`` does. As binary tensor data each element is the raw file; in
  JSON (``"data": [...]``) each element is the file base64-encoded, because JSON
  strings cannot carry arbitrary bytes.

Outputs (all unless ``outputs`` names some): ``probabilities`` FP32 [N, K]
(temperature-scaled softmax at the exit taken), ``label`` BYTES [N],
``class_id`` INT64 [N], ``exit`` INT32 [N] (1-based), ``flops`` INT64 [N]
(multiply-accumulates of convs and linears, MSDNet paper convention,
cumulative to the exit taken, lazy evaluation).

Request ``parameters``: ``deadline_ms`` (per image, from the request's arrival;
as ``/classify``) or ``flops_budget`` (FLOPs for the whole request, budgeted
batch as ``/batch``); without ``flops_budget`` each image runs as a
``/classify`` request (same thresholds, feeds the budget controller).

Binary tensor data extension: an ``Inference-Header-Content-Length`` header
says the JSON header's length; binary inputs (``parameters.binary_data_size``)
follow it in input order. Outputs are binary when asked (output parameter
``binary_data``, or request parameter ``binary_data_output`` for all), then the
response carries the same header and ``application/octet-stream``.

Errors: ``{"error": "<message>"}`` with the status ``/classify`` would use
(400, 413, 415, 422, 503, 504; 404 for an unknown model or route).
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match

from .. import errors
from ..engine.interface import Engine
from . import params as rules
from .deps import AppSettings, LoadedEngine, ReadyEngine, arrival
from .responses import error_responses, ranked
from .routes import decoded
from .schemas import EXAMPLE_IMAGE
from .v2_tensors import OUTPUTS, decode_inputs, encode_tensor, parse_body, requested_outputs

log = logging.getLogger("msdnet.v2")

MODEL_NAME = "msdnet"
MODEL_VERSION = "1"
PLATFORM = "pytorch_msdnet"
EXTENSIONS = ["binary_tensor_data", "parameters"]


def _model(name: str, version: str | None = None) -> None:
    if name != MODEL_NAME:
        raise errors.NotFound(f"unknown model '{name}'; this server serves '{MODEL_NAME}'")
    if version is not None and version != MODEL_VERSION:
        raise errors.NotFound(f"model '{name}' has no version '{version}'; versions: ['{MODEL_VERSION}']")


class V2Error(BaseModel):
    """The Open Inference Protocol's error body."""

    error: str


def v2_errors(*statuses: int) -> dict:
    """OpenAPI ``responses`` for these statuses in the protocol's error shape (and 500 always)."""
    return error_responses(*statuses, model=V2Error)


router = APIRouter(tags=["v2 (Open Inference Protocol)"])
# The handlers read the version from path_params (one handler per route pair), so declare it for /docs.
VERSIONED = {"parameters": [{"name": "version", "in": "path", "required": True,
                             "schema": {"type": "string", "enum": [MODEL_VERSION]}}]}


@router.get("/v2/health/live", summary="v2: liveness", responses=v2_errors())
async def live(request: Request) -> dict:
    return {"live": True}


@router.get("/v2/health/ready", summary="v2: readiness (model warmed up)", responses=v2_errors(503))
async def ready(engine: ReadyEngine) -> dict:
    return {"ready": True}


@router.get("/v2", summary="v2: server metadata", responses=v2_errors())
async def server_metadata(request: Request) -> dict:
    return {"name": request.app.title, "version": request.app.version, "extensions": EXTENSIONS}


def _metadata(engine: Engine) -> dict:
    s = engine.transforms
    return {
        "name": MODEL_NAME, "versions": [MODEL_VERSION], "platform": PLATFORM,
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, s.channels, s.image_size, s.image_size]},
                   {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(engine.classes)]},
                    *({"name": n, "datatype": t, "shape": [-1]} for n, t in OUTPUTS.items() if n != "probabilities")],
        # Protocol parameters are scalars: lists as comma-separated strings.
        "parameters": {"image_size": s.image_size, "channels": s.channels,
                       "mean": ",".join(f"{m:g}" for m in s.mean), "std": ",".join(f"{v:g}" for v in s.std),
                       "normalisation": "(pixel / 255 - mean) / std", "num_exits": engine.num_exits,
                       "exit_flops": ",".join(str(int(f)) for f in engine.exit_flops),
                       "classes": ",".join(engine.classes), **_contract_parameters(s)},
    }


def _contract_parameters(contract) -> dict:
    """The checkpoint's input contract (model/transforms.py) as v2 scalar parameters."""
    if contract is None:
        return {}
    return {"resize_rule": contract.resize_rule, "resize_size": contract.resize_size,
            "interpolation": contract.interpolation, "crop_size": contract.crop_size or 0,
            "background": contract.background, "preprocessing": contract.describe()}


@router.get("/v2/models/{name}", summary="v2: model metadata", responses=v2_errors(404, 503))
@router.get("/v2/models/{name}/versions/{version}", summary="v2: model metadata (versioned)", openapi_extra=VERSIONED,
            responses=v2_errors(404, 503))
async def model_metadata(request: Request, name: str, engine: LoadedEngine) -> dict:
    _model(name, request.path_params.get("version"))
    return _metadata(engine)


@router.get("/v2/models/{name}/ready", summary="v2: model readiness", responses=v2_errors(404, 503))
@router.get("/v2/models/{name}/versions/{version}/ready", summary="v2: model readiness (versioned)",
            responses=v2_errors(404, 503),
            openapi_extra=VERSIONED)
async def model_ready(request: Request, name: str, engine: ReadyEngine) -> dict:
    _model(name, request.path_params.get("version"))
    return {"name": MODEL_NAME, "ready": True}


# ---- inference ---------------------------------------------------------------
_TENSOR = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
    "name": {"type": "string"}, "datatype": {"type": "string"},
    "shape": {"type": "array", "items": {"type": "integer"}}, "parameters": {"type": "object"},
    "data": {"type": "array"}}}
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {
        "schema": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"}, "parameters": {"type": "object"},
            "inputs": {"type": "array", "items": _TENSOR}, "outputs": {"type": "array", "items": {"type": "object"}}}},
        "example": {"id": "42", "parameters": {"deadline_ms": 1000},
                    "inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [EXAMPLE_IMAGE]}],
                    "outputs": [{"name": "label"}, {"name": "exit"}, {"name": "flops"}]}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": "JSON header (Inference-Header-Content-Length bytes), then the "
                                                "binary tensor data"}}}}


INFER_RESPONSES = {200: {"description": "Inference response; application/octet-stream (JSON header, then binary "
                         "tensors) when binary outputs were asked for",
                         "content": {"application/json": {"schema": {"type": "object", "required": ["outputs"],
                                                                     "properties": {"outputs": {
                                                                         "type": "array", "items": _TENSOR}}}},
                                     "application/octet-stream": {"schema": {"type": "string",
                                                                             "format": "binary"}}}},
                   **v2_errors(400, 404, 408, 413, 415, 422, 503, 504)}


@router.post("/v2/models/{name}/infer", summary="v2: inference", openapi_extra=INFER_BODY,
             response_class=Response, responses=INFER_RESPONSES)
@router.post("/v2/models/{name}/versions/{version}/infer", summary="v2: inference (versioned)",
             openapi_extra={**INFER_BODY, **VERSIONED}, response_class=Response, responses=INFER_RESPONSES)
async def infer(request: Request, name: str, engine: ReadyEngine, settings: AppSettings) -> Response:
    """Classify N images; see the module docstring for tensors and parameters."""
    started = arrival(request)
    _model(name, request.path_params.get("version"))
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise errors.UnsupportedMedia("compressed requests (Content-Encoding) are not supported")
    header, tail = parse_body(await request.body(), request.headers.get("inference-header-content-length"))
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise errors.BadRequest("parameters must be a JSON object")
    deadline_ms = rules.positive_number(params.get("deadline_ms"), "deadline_ms")
    budget = rules.positive_number(params.get("flops_budget"), "flops_budget")
    if deadline_ms is not None and budget is not None:
        raise errors.InvalidParameter("deadline_ms and flops_budget cannot be combined: a budgeted batch has "
                                      "no per-image deadline", field="deadline_ms")
    outputs = requested_outputs(header)
    engine.admit(deadline_ms, started)
    images = await run_in_threadpool(decode_inputs, engine.transforms, settings, header.get("inputs"),
                                     tail)  # off the event loop
    decoded(request, started)
    if budget is not None:
        done = (await engine.batch(images, budget, started)).results
        for f in done:
            if isinstance(f, errors.ServiceError):
                raise f
    else:
        done = await engine.classify(images, deadline_ms, started)
    probs = np.stack([f.probs for f in done])  # (N, K) float64
    top = [ranked(p, 1)[0] for p in probs]  # the same pick as /classify's top_k[0]
    values = {"probabilities": probs, "label": [engine.classes[i].encode() for i in top], "class_id": top,
              "exit": [f.exit for f in done], "flops": [int(f.flops) for f in done]}
    response_params = {"flops_used": sum(values["flops"])}
    if budget is not None:
        response_params["flops_budget"] = budget
    if budget is None:
        response_params["target_flops"] = done[0].target_flops
        response_params["degraded"] = any(f.degraded for f in done)
    if deadline_ms is not None:
        response_params["deadline_met"] = (time.monotonic() - started) * 1e3 <= deadline_ms
    tensors = [encode_tensor(n, values[n], binary) for n, binary in outputs]
    body = {"model_name": MODEL_NAME, "model_version": MODEL_VERSION, "outputs": [e for e, _ in tensors],
            "parameters": response_params}
    if isinstance(header.get("id"), str):
        body["id"] = header["id"]
    if not any(binary for _, binary in outputs):
        return JSONResponse(body)
    head = json.dumps(body).encode()
    return Response(head + b"".join(raw for _, raw in tensors), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


@router.api_route("/v2/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                  include_in_schema=False)
async def unknown(request: Request, path: str) -> dict:
    """Anything else under /v2: 405 with ``Allow`` when the path exists for other
    methods, else 404 (model config, statistics, repository...), in the protocol's shape."""
    allowed = set()
    for route in router.routes:
        if isinstance(route, APIRoute) and route.endpoint is not unknown:
            match, _ = route.matches(request.scope)
            if match is Match.PARTIAL:  # the path matches, the method does not
                allowed |= route.methods
    if allowed:
        methods = ", ".join(sorted(allowed))
        raise errors.MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}; allowed: {methods}",
                                      headers={"Allow": methods})
    raise errors.NotFound(f"no such v2 endpoint: {request.method} /v2/{path}")
