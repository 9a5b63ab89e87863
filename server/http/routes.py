"""The native routes: ``/classify``, ``/batch``, ``/budget``, ``/feedback``, health and metrics.

Each route parses its request with :mod:`server.http.params` (one rule per
parameter), calls the engine (server.engine.interface) and shapes the typed result with
:mod:`server.http.responses`. Images are decoded on a worker thread, never on the
event loop; a request whose deadline has already passed is refused (504) before
its image is decoded.
"""

from __future__ import annotations

import hmac
import logging
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from .. import errors
from ..settings import Settings
from . import decoding, params
from .deps import AppMetrics, AppSettings, ReadyEngine, arrival
from .responses import batch_result, budget_state, classify_result, error_responses, feedback_result
from .schemas import (
    BatchRequest,
    BatchResult,
    BudgetState,
    BudgetUpdate,
    ClassifyRequest,
    ClassifyResult,
    FeedbackRequest,
    FeedbackResult,
    Readiness,
    Status,
)

log = logging.getLogger("msdnet.http")

_POSITIVE = {"type": "number", "exclusiveMinimum": 0, "maximum": params.MAX_NUMBER}
MULTIPART_CLASSIFY = {"schema": {"type": "object", "required": ["file"], "properties": {
    "file": {"type": "string", "format": "binary"}, "deadline_ms": _POSITIVE}}}
MULTIPART_BATCH = {"schema": {"type": "object", "required": ["files"], "properties": {
    "files": {"type": "array", "items": {"type": "string", "format": "binary"}}, "flops_budget": _POSITIVE}}}
RAW_IMAGE = {"schema": {"type": "string", "format": "binary"}}


def _json_doc(model) -> dict:
    return {"schema": model.model_json_schema(), "example": model.model_config["json_schema_extra"]["examples"][0]}


def _body_doc(json_model, multipart, raw: bool) -> dict:
    content = {"application/json": _json_doc(json_model), "multipart/form-data": multipart}
    if raw:  # /classify also takes the image file itself as the body
        content |= {"image/*": RAW_IMAGE, "application/octet-stream": RAW_IMAGE}
    doc = {"requestBody": {"required": True, "content": content}}
    if raw:
        doc["parameters"] = [{"name": "deadline_ms", "in": "query", "required": False, "schema": _POSITIVE,
                              "description": "With a raw image body: the deadline in milliseconds."}]
    return doc


async def decode_off_loop(data: bytes, contract, settings: Settings):
    """:func:`server.http.decoding.decode` on a worker thread (Pillow releases the GIL
    while it decodes); a large image in the low-priority process."""
    return await run_in_threadpool(decoding.decode, data, contract, settings)


def decoded(request: Request, started: float) -> None:
    """Tell this process's front door (with a latency objective) how long the request
    took from its arrival to its image(s) decoded."""
    door = getattr(request.app.state, "front_door", None)
    if door is not None:
        door.observe_decode(time.monotonic() - started)


router = APIRouter()


@router.post("/classify", response_model=ClassifyResult, responses=error_responses(400, 408, 413, 415, 422, 503, 504),
             openapi_extra=_body_doc(ClassifyRequest, MULTIPART_CLASSIFY, raw=True),
             summary="Anytime classification of one image")
async def classify(request: Request, engine: ReadyEngine, settings: AppSettings) -> dict:
    """Leave at the first exit whose temperature-scaled confidence reaches its
    threshold; with ``deadline_ms``, never start a block the latency estimate
    says would overrun it. Body: JSON ``{"image": base64, "deadline_ms": number}``,
    multipart (``file``, ``deadline_ms``) or raw image bytes (``?deadline_ms=``)."""
    started = arrival(request)
    ctype = params.content_type(request.headers)
    if ctype == "application/json":
        body = await params.json_body(request, ClassifyRequest)
        data, deadline = params.b64decode(body.image, "image"), body.deadline_ms
    elif ctype == "multipart/form-data":
        form = await request.form()
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise errors.BadRequest("multipart body needs a file field named 'file'")
        data, deadline = await upload.read(), params.positive_number(form.get("deadline_ms"), "deadline_ms")
    elif ctype.startswith("image/") or ctype == "application/octet-stream":
        data = await request.body()
        deadline = params.positive_number(request.query_params.get("deadline_ms"), "deadline_ms")
    else:
        raise errors.UnsupportedMedia(f"content type {ctype or '(none)'!r} is not accepted; send "
                                      "application/json, multipart/form-data or image/*")
    engine.admit(deadline, started)  # a passed deadline (504) or the latency objective (503): before decoding
    image = await decode_off_loop(data, engine.transforms, settings)
    decoded(request, started)
    (f,) = await engine.classify([image], deadline, started)
    return classify_result(engine, f, started, deadline, settings.top_k)


@router.post("/batch", response_model=BatchResult, responses=error_responses(400, 408, 413, 415, 422, 503),
             openapi_extra=_body_doc(BatchRequest, MULTIPART_BATCH, raw=False),
             summary="Budgeted batch classification")
async def batch(request: Request, engine: ReadyEngine, settings: AppSettings) -> dict:
    """Classify many images under one total FLOPs budget (paper §5.2); easy
    images leave early, hard ones get more blocks; ``flops_used <= flops_budget``.
    A bad image gets an error entry in its place; the others are served."""
    started = arrival(request)
    ctype = params.content_type(request.headers)
    limit = settings.max_batch_images
    if ctype == "application/json":
        body = await params.json_body(request, BatchRequest)
        params.image_count(len(body.images), limit, "/batch")
        budget, encoded = body.flops_budget, [(s, f"images[{i}]") for i, s in enumerate(body.images)]
    elif ctype == "multipart/form-data":
        form = await request.form(max_files=limit + 1)
        uploads = [v for k, v in form.multi_items() if k in ("files", "file") and isinstance(v, UploadFile)]
        if not uploads:
            raise errors.BadRequest("multipart body needs one or more file fields named 'files'")
        params.image_count(len(uploads), limit, "/batch")
        budget, encoded = params.positive_number(form.get("flops_budget"), "flops_budget"), None
        files = [await u.read() for u in uploads]
    else:
        raise errors.UnsupportedMedia(f"content type {ctype or '(none)'!r} is not accepted; send "
                                      "application/json or multipart/form-data")

    engine.admit(None, started)

    def decode_all() -> list:
        items = []
        for k in range(len(encoded) if encoded is not None else len(files)):
            try:
                data = params.b64decode(*encoded[k]) if encoded is not None else files[k]
                items.append(decoding.decode(data, engine.transforms, settings))
            except errors.ServiceError as exc:  # this image only
                items.append(exc)
        return items

    items = await run_in_threadpool(decode_all)
    decoded(request, started)
    out = await engine.batch(items, budget, started)
    return batch_result(engine, out, started, settings.top_k)


@router.get("/budget", response_model=BudgetState, responses=error_responses(503),
            summary="Budget controller state")
async def get_budget(engine: ReadyEngine) -> dict:
    """Target and realised mean FLOPs per /classify request, the thresholds, and the
    target in force with the latency objective's state and why."""
    return budget_state(await engine.budget())


@router.put("/budget", response_model=BudgetState, responses=error_responses(401, 403, 408, 413, 422, 503),
            openapi_extra={"requestBody": {"required": True,
                                           "content": {"application/json": _json_doc(BudgetUpdate)}}},
            summary="Change the target mean FLOPs per request")
async def put_budget(request: Request, engine: ReadyEngine, settings: AppSettings) -> dict:
    """Needs ``Authorization: Bearer <MSDNET_BUDGET_TOKEN>``; refused (403) when
    no token is configured."""
    token = settings.budget_token
    if token is None:
        raise errors.Forbidden("runtime budget changes are disabled: no MSDNET_BUDGET_TOKEN is configured")
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(given.encode("latin-1"), token.get_secret_value().encode()):
        raise errors.Unauthorized("missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
    body = await params.json_body(request, BudgetUpdate)
    try:
        await engine.set_target(body.target_flops)
    except ValueError as exc:
        raise errors.InvalidParameter(str(exc), field="target_flops") from None
    log.info("budget target set to %.0f FLOPs per request", body.target_flops)
    return budget_state(await engine.budget())


@router.post("/feedback", response_model=FeedbackResult, responses=error_responses(404, 408, 409, 413, 415, 422, 503),
             openapi_extra={"requestBody": {"required": True,
                                            "content": {"application/json": _json_doc(FeedbackRequest)}}},
             summary="The true label of an earlier /classify answer")
async def feedback(request: Request, engine: ReadyEngine) -> dict:
    """Labels often arrive later: the newest ``MSDNET_FEEDBACK_STORE_SIZE`` one-image
    /classify answers are kept by request id (the ``X-Request-ID`` echoed on each
    answer). Counts whether the answered class (and, for an audited answer, the last
    exit's) was right, per exit (``msdnet_feedback_total``, ``msdnet_feedback_last_exit_total``)."""
    if params.content_type(request.headers) != "application/json":
        raise errors.UnsupportedMedia("send application/json: {\"request_id\": ..., \"label\": ...}")
    body = await params.json_body(request, FeedbackRequest)
    label = params.label(body.label, engine.classes)
    return feedback_result(await engine.feedback(body.request_id, label))


@router.get("/healthz", summary="Liveness", response_model=Status, responses=error_responses())
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: model loaded and warmed up", response_model=Readiness,
            responses=error_responses(503))
async def readyz(engine: ReadyEngine) -> dict:
    return {"status": "ready", "num_exits": engine.num_exits}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response, responses={
    200: {"description": "Prometheus text exposition format",
          "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}, **error_responses(503)})
async def metrics(metrics: AppMetrics) -> Response:
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
