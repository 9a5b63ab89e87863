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

import asyncio
import json
import logging
import struct
import time

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.routing import Match

from .. import errors
from ..service import Service, check_finite
from . import params as rules
from .app import ERROR_MEANING, _service, arrival
from .schemas import EXAMPLE_IMAGE

log = logging.getLogger("msdnet.v2")

MODEL_NAME = "msdnet"
MODEL_VERSION = "1"
PLATFORM = "pytorch_msdnet"
EXTENSIONS = ["binary_tensor_data", "parameters"]
OUTPUTS = {"probabilities": "FP32", "label": "BYTES", "class_id": "INT64", "exit": "INT32", "flops": "INT64"}
NUMPY = {"FP32": "<f4", "INT64": "<i8", "INT32": "<i4"}  # the protocol's binary layout is little-endian


def _model(name: str, version: str | None = None) -> None:
    if name != MODEL_NAME:
        raise errors.NotFound(f"unknown model '{name}'; this server serves '{MODEL_NAME}'")
    if version is not None and version != MODEL_VERSION:
        raise errors.NotFound(f"model '{name}' has no version '{version}'; versions: ['{MODEL_VERSION}']")


def _loaded(request: Request) -> Service:
    """The service, warmed up or not (metadata needs no model thread)."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise errors.NotReady("model is loading")
    return service


class V2Error(BaseModel):
    """The Open Inference Protocol's error body."""

    error: str


def v2_errors(*statuses: int) -> dict:
    """OpenAPI ``responses`` for these statuses in the protocol's error shape (and 500 always)."""
    return {s: {"model": V2Error, "description": ERROR_MEANING[s]} for s in sorted({*statuses, 500})}


router = APIRouter(tags=["v2 (Open Inference Protocol)"])
# The handlers read the version from path_params (one handler per route pair), so declare it for /docs.
VERSIONED = {"parameters": [{"name": "version", "in": "path", "required": True,
                             "schema": {"type": "string", "enum": [MODEL_VERSION]}}]}


@router.get("/v2/health/live", summary="v2: liveness", responses=v2_errors())
async def live(request: Request) -> dict:
    return {"live": True}


@router.get("/v2/health/ready", summary="v2: readiness (model warmed up)", responses=v2_errors(503))
async def ready(request: Request) -> dict:
    _service(request)
    return {"ready": True}


@router.get("/v2", summary="v2: server metadata", responses=v2_errors())
async def server_metadata(request: Request) -> dict:
    return {"name": request.app.title, "version": request.app.version, "extensions": EXTENSIONS}


def _metadata(service: Service) -> dict:
    s = service.spec
    return {
        "name": MODEL_NAME, "versions": [MODEL_VERSION], "platform": PLATFORM,
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, s.channels, s.image_size, s.image_size]},
                   {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(service.classes)]},
                    *({"name": n, "datatype": t, "shape": [-1]} for n, t in OUTPUTS.items() if n != "probabilities")],
        # Protocol parameters are scalars: lists as comma-separated strings.
        "parameters": {"image_size": s.image_size, "channels": s.channels,
                       "mean": ",".join(f"{m:g}" for m in s.mean), "std": ",".join(f"{v:g}" for v in s.std),
                       "normalisation": "(pixel / 255 - mean) / std", "num_exits": service.num_exits,
                       "exit_flops": ",".join(str(int(f)) for f in service.exit_flops),
                       "classes": ",".join(service.classes), **_contract_parameters(s.contract)},
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
async def model_metadata(request: Request, name: str) -> dict:
    _model(name, request.path_params.get("version"))
    return _metadata(_loaded(request))


@router.get("/v2/models/{name}/ready", summary="v2: model readiness", responses=v2_errors(404, 503))
@router.get("/v2/models/{name}/versions/{version}/ready", summary="v2: model readiness (versioned)",
            responses=v2_errors(404, 503),
            openapi_extra=VERSIONED)
async def model_ready(request: Request, name: str) -> dict:
    _model(name, request.path_params.get("version"))
    _service(request)
    return {"name": MODEL_NAME, "ready": True}


# ---- inference ---------------------------------------------------------------
def _parse_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """(JSON header, binary tail) of an inference request."""
    if header_length is None:
        split = len(body)
    else:
        try:
            split = int(header_length)
        except ValueError:
            raise errors.BadRequest(f"Inference-Header-Content-Length {header_length!r} is not an integer") from None
        if not 0 < split <= len(body):
            raise errors.BadRequest(f"Inference-Header-Content-Length {split} is outside the body's "
                                    f"{len(body)} bytes")
    try:
        header = json.loads(body[:split])
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise errors.BadRequest(f"request header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise errors.BadRequest("request header must be a JSON object")
    return header, body[split:]


def _bytes_elements(raw: bytes, count: int) -> list[bytes]:
    """The protocol's BYTES layout: per element a uint32 LE length, then the bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise errors.BadRequest("image_bytes: binary data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise errors.BadRequest(f"image_bytes: element {len(out)} says {n} bytes, past the end of its data")
        out.append(raw[pos + 4: pos + 4 + n])
        pos += 4 + n
    if len(out) != count:
        raise errors.BadRequest(f"image_bytes: shape says {count} elements, binary data holds {len(out)}")
    return out


def _flat(data) -> list:
    """Nested JSON lists (row-major) to one flat list (iterative: any depth)."""
    out, stack = [], [iter([data])]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def _images(service: Service, inputs: list, tail: bytes) -> list[np.ndarray]:
    """The request's images, each float32 (C, H, W) normalised like ``decode``'s output.

    Raises:
        errors.ServiceError: malformed input (400), too many images (413), or
            an image ``decode`` refuses (its status, the input index prefixed).
    """
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise errors.BadRequest("inputs must hold exactly one tensor: 'image' (FP32 [N, C, H, W], normalised) "
                                "or 'image_bytes' (BYTES [N], encoded image files)")
    t = inputs[0]
    name, datatype, shape, params = t.get("name"), t.get("datatype"), t.get("shape"), t.get("parameters") or {}
    if not isinstance(params, dict):
        raise errors.BadRequest(f"input {name!r}: parameters must be a JSON object")
    expected = {"image": "FP32", "image_bytes": "BYTES"}
    if name not in expected:
        raise errors.BadRequest(f"unknown input {name!r}; inputs: 'image' (FP32) or 'image_bytes' (BYTES)")
    if datatype != expected[name]:
        raise errors.BadRequest(f"input '{name}' must have datatype {expected[name]}, got {datatype!r}")
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                      for d in shape)):
        raise errors.BadRequest(f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    s = service.spec
    if name == "image" and shape[1:] != [s.channels, s.image_size, s.image_size]:
        raise errors.BadRequest(f"input 'image': shape {shape} is not [N, {s.channels}, {s.image_size}, "
                                f"{s.image_size}]")
    n = shape[0] if name == "image" else int(np.prod(shape))
    if n < 1:
        raise errors.BadRequest(f"input '{name}' holds no images (shape {shape})")
    rules.image_count(n, service.settings.max_batch_images)
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size != len(tail):
            raise errors.BadRequest(f"input '{name}': binary_data_size {size!r} does not match the {len(tail)} "
                                    "bytes after the JSON header (is Inference-Header-Content-Length set?)")
    elif tail:
        raise errors.BadRequest(f"{len(tail)} bytes follow the JSON header but no input has binary_data_size")
    elif "data" not in t:
        raise errors.BadRequest(f"input '{name}' has neither 'data' nor binary_data_size")

    if name == "image":
        count = int(np.prod(shape))
        if size is not None:
            if size != 4 * count:
                raise errors.BadRequest(f"input 'image': {size} bytes of binary data, shape {shape} needs "
                                        f"{4 * count} (FP32)")
            arr = np.frombuffer(tail, dtype="<f4")
        else:
            flat = _flat(t["data"])
            if len(flat) != count or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat):
                raise errors.BadRequest(f"input 'image': data must be {count} numbers for shape {shape}")
            try:
                arr = np.asarray(flat, dtype=np.float32)
            except OverflowError:  # a JSON integer too large for any float
                raise errors.BadRequest("input 'image' holds a number too large for FP32") from None
        if not np.isfinite(arr).all():
            raise errors.BadRequest("input 'image' holds NaN or infinite values")
        arr = arr.astype(np.float32).reshape(shape)
        return [np.ascontiguousarray(a) for a in arr]

    if size is not None:
        files = _bytes_elements(tail, n)
    else:
        flat = _flat(t["data"])
        if len(flat) != n or not all(isinstance(v, str) for v in flat):
            raise errors.BadRequest(f"input 'image_bytes': data must be {n} base64 strings for shape {shape}")
        files = [rules.b64decode(v, f"image_bytes[{i}]") for i, v in enumerate(flat)]
    images = []
    for i, data in enumerate(files):
        try:
            images.append(service.decode(data))
        except errors.ServiceError as exc:
            raise type(exc)(f"image_bytes[{i}]: {exc.message}", headers=exc.headers, **exc.details) from None
    return images


def _requested_outputs(header: dict) -> list[tuple[str, bool]]:
    """(name, binary) per output to return, in response order."""
    params = header.get("parameters") or {}
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise errors.BadRequest(f"parameter binary_data_output must be a boolean, got {default_binary!r}")
    asked = header.get("outputs")
    if asked is None:
        return [(name, default_binary) for name in OUTPUTS]
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise errors.BadRequest("outputs must be a list of objects with a 'name'")
    out = []
    for o in asked:
        name, p = o.get("name"), o.get("parameters") or {}
        if name not in OUTPUTS:
            raise errors.BadRequest(f"unknown output {name!r}; outputs: {', '.join(OUTPUTS)}")
        if not isinstance(p, dict):
            raise errors.BadRequest(f"output '{name}': parameters must be a JSON object")
        if "classification" in p:
            raise errors.BadRequest("the classification extension is not supported; ask for 'label' and "
                                    "'probabilities'")
        binary = p.get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise errors.BadRequest(f"output '{name}': binary_data must be a boolean, got {binary!r}")
        out.append((name, binary))
    return out


def _tensor(name: str, array: np.ndarray | list[bytes], binary: bool) -> tuple[dict, bytes]:
    """One output's JSON entry and its binary data (b"" when sent as JSON)."""
    datatype = OUTPUTS[name]
    if datatype == "BYTES":
        shape = [len(array)]
        raw = b"".join(struct.pack("<I", len(b)) + b for b in array) if binary else b""
        data = [b.decode() for b in array]
    else:
        array = np.ascontiguousarray(array, dtype=NUMPY[datatype])
        shape = list(array.shape)
        raw = array.tobytes() if binary else b""
        data = array.ravel().tolist()
    entry = {"name": name, "datatype": datatype, "shape": shape}
    if binary:
        entry["parameters"] = {"binary_data_size": len(raw)}
    else:
        entry["data"] = data
    return entry, raw


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
async def infer(request: Request, name: str) -> Response:
    """Classify N images; see the module docstring for tensors and parameters."""
    started = arrival(request)
    _model(name, request.path_params.get("version"))
    service = _service(request)
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise errors.UnsupportedMedia("compressed requests (Content-Encoding) are not supported")
    header, tail = _parse_body(await request.body(), request.headers.get("inference-header-content-length"))
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise errors.BadRequest("parameters must be a JSON object")
    deadline_ms = rules.positive_number(params.get("deadline_ms"), "deadline_ms")
    budget = rules.positive_number(params.get("flops_budget"), "flops_budget")
    if deadline_ms is not None and budget is not None:
        raise errors.InvalidParameter("deadline_ms and flops_budget cannot be combined: a budgeted batch has "
                                      "no per-image deadline", field="deadline_ms")
    outputs = _requested_outputs(header)
    images = _images(service, header.get("inputs"), tail)

    if budget is not None:
        done = await service.batch_arrays(images, budget, started)
        for f in done:
            check_finite(f)
    else:
        got = await asyncio.gather(*(service.classify_array(im, deadline_ms, started) for im in images),
                                   return_exceptions=True)  # let every image finish before answering
        for g in got:
            if isinstance(g, BaseException):
                raise g
        done = got
    probs = np.stack([f.probs for f in done])  # (N, K) float64
    top = [int(np.argsort(-p)[0]) for p in probs]  # the same pick as /classify's top_k[0]
    values = {"probabilities": probs, "label": [service.classes[i].encode() for i in top], "class_id": top,
              "exit": [f.exit for f in done], "flops": [int(f.flops) for f in done]}
    response_params = {"flops_used": sum(values["flops"])}
    if budget is not None:
        response_params["flops_budget"] = budget
    if deadline_ms is not None:
        response_params["deadline_met"] = (time.monotonic() - started) * 1e3 <= deadline_ms
    tensors = [_tensor(n, values[n], binary) for n, binary in outputs]
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
