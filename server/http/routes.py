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

from .. import errors
from ..settings import Settings
from . import bodies, decoding, params
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

CLASSIFY_BODY = bodies.BodySpec(
    "/classify", ClassifyRequest, json_field="image", file_field="file", number="deadline_ms", many=False,
    accepts=("application/json", "multipart/form-data", "image/*", "application/octet-stream"),
    number_doc="The deadline in milliseconds.")
BATCH_BODY = bodies.BodySpec(
    "/batch", BatchRequest, json_field="images", file_field="files", number="flops_budget", many=True,
    accepts=("application/json", "multipart/form-data"), number_doc="The total FLOPs budget of the batch.")


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
             openapi_extra=bodies.openapi(CLASSIFY_BODY),
             summary="Anytime classification of one image")
async def classify(request: Request, engine: ReadyEngine, settings: AppSettings) -> dict:
    """Leave at the first exit whose temperature-scaled confidence reaches its
    threshold; with ``deadline_ms``, never start a block the latency estimate
    says would overrun it. Body: JSON ``{"image": base64, "deadline_ms": number}``,
    multipart (``file``, ``deadline_ms``) or raw image bytes (``?deadline_ms=``)."""
    started = arrival(request)
    body = await bodies.read_body(request, CLASSIFY_BODY)
    (data,), deadline = body.images, body.number
    engine.admit(deadline, started)  # a passed deadline (504) or the latency objective (503): before decoding
    image = await decode_off_loop(data, engine.transforms, settings)
    decoded(request, started)
    (f,) = await engine.classify([image], deadline, started)
    return classify_result(engine, f, started, deadline, settings.top_k)


@router.post("/batch", response_model=BatchResult, responses=error_responses(400, 408, 413, 415, 422, 503),
             openapi_extra=bodies.openapi(BATCH_BODY),
             summary="Budgeted batch classification")
async def batch(request: Request, engine: ReadyEngine, settings: AppSettings) -> dict:
    """Classify many images under one total FLOPs budget (paper §5.2); easy
    images leave early, hard ones get more blocks; ``flops_used <= flops_budget``.
    A bad image gets an error entry in its place; the others are served."""
    started = arrival(request)
    body = await bodies.read_body(request, BATCH_BODY, settings.max_batch_images)

    engine.admit(None, started)

    def decode_all() -> list:
        items = []
        for image in body.images:
            try:
                data = image.decode() if isinstance(image, bodies.Base64) else image
                items.append(decoding.decode(data, engine.transforms, settings))
            except errors.ServiceError as exc:  # this image only
                items.append(exc)
        return items

    items = await run_in_threadpool(decode_all)
    decoded(request, started)
    out = await engine.batch(items, body.number, started)
    return batch_result(engine, out, started, settings.top_k)


@router.get("/budget", response_model=BudgetState, responses=error_responses(503),
            summary="Budget controller state")
async def get_budget(engine: ReadyEngine) -> dict:
    """Target and realised mean FLOPs per /classify request, the thresholds, and the
    target in force with the latency objective's state and why."""
    return budget_state(await engine.budget())


@router.put("/budget", response_model=BudgetState, responses=error_responses(401, 403, 408, 413, 422, 503),
            openapi_extra={"requestBody": {"required": True,
                                           "content": {"application/json": bodies.json_content(BudgetUpdate)}}},
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
                                            "content": {"application/json": bodies.json_content(FeedbackRequest)}}},
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
