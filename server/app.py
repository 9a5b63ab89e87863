"""HTTP layer: routes translate requests to :class:`server.service.Service` calls.

Shared objects are created in the lifespan, none at import time. Every error is
a :class:`server.errors.ServiceError` mapped to its status and JSON body by one
handler; request validation errors become 422 with the same body shape.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import time
import uuid
from contextvars import ContextVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from model.checkpoint import load as load_checkpoint

from . import errors
from .schemas import BatchRequest, BatchResult, BudgetState, BudgetUpdate, ClassifyRequest, ClassifyResult, ErrorBody
from .service import Service
from .settings import Settings

log = logging.getLogger("msdnet.http")
request_id: ContextVar[str] = ContextVar("request_id", default="-")

ROUTE_LABELS = {"/classify", "/batch", "/budget", "/healthz", "/readyz", "/metrics"}
ERROR_RESPONSES = {s: {"model": ErrorBody} for s in (400, 413, 415, 422, 503, 504)}


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise errors.BadImage(f"{what} is not valid base64: {exc}") from exc


def _positive(value, name: str) -> float | None:
    """A form field that must be a positive number (422 otherwise)."""
    if value is None or value == "":
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise errors.InvalidParameter(f"{name} must be a positive number, got {value!r}", field=name) from None
    if not v > 0 or v == float("inf"):
        raise errors.InvalidParameter(f"{name} must be a positive number, got {value!r}", field=name)
    return v


async def _json_body(request: Request, model):
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = [(".".join(str(p) for p in e["loc"]) or "body", e["msg"]) for e in exc.errors()]
        raise errors.InvalidParameter("; ".join(f"{where}: {msg}" for where, msg in problems),
                                      field=problems[0][0]) from None


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _service(request: Request) -> Service:
    service = getattr(request.app.state, "service", None)
    if service is None or not service.runner.ready:
        raise errors.NotReady("model is loading or warming up")
    return service


MULTIPART_CLASSIFY = {"schema": {"type": "object", "required": ["file"], "properties": {
    "file": {"type": "string", "format": "binary"}, "deadline_ms": {"type": "integer", "minimum": 1}}}}
MULTIPART_BATCH = {"schema": {"type": "object", "required": ["files"], "properties": {
    "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
    "flops_budget": {"type": "number", "exclusiveMinimum": 0}}}}


def _body_doc(json_model, multipart) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": json_model.model_json_schema(),
                             "example": json_model.model_config["json_schema_extra"]["examples"][0]},
        "multipart/form-data": multipart,
        "image/*": {"schema": {"type": "string", "format": "binary"}}}}}


router = APIRouter()


@router.post("/classify", response_model=ClassifyResult, responses=ERROR_RESPONSES,
             openapi_extra=_body_doc(ClassifyRequest, MULTIPART_CLASSIFY),
             summary="Anytime classification of one image")
async def classify(request: Request) -> dict:
    """Leave at the first exit whose temperature-scaled confidence reaches its
    threshold; with ``deadline_ms``, never start a block the latency estimate
    says would overrun it. Body: JSON ``{"image": base64, "deadline_ms": int}``,
    multipart (``file``, ``deadline_ms``) or raw image bytes (``?deadline_ms=``)."""
    started = time.monotonic()
    service = _service(request)
    ctype = _content_type(request)
    if ctype == "application/json":
        body = await _json_body(request, ClassifyRequest)
        data, deadline = _b64(body.image, "image"), body.deadline_ms
    elif ctype == "multipart/form-data":
        form = await request.form()
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise errors.BadRequest("multipart body needs a file field named 'file'")
        data, deadline = await upload.read(), _positive(form.get("deadline_ms"), "deadline_ms")
    elif ctype.startswith("image/") or ctype == "application/octet-stream":
        data, deadline = await request.body(), _positive(request.query_params.get("deadline_ms"), "deadline_ms")
    else:
        raise errors.UnsupportedMedia(f"content type {ctype or '(none)'!r} is not accepted; send "
                                      "application/json, multipart/form-data or image/*")
    return await service.classify(data, deadline, started)


@router.post("/batch", response_model=BatchResult, responses=ERROR_RESPONSES,
             openapi_extra=_body_doc(BatchRequest, MULTIPART_BATCH),
             summary="Budgeted batch classification")
async def batch(request: Request) -> dict:
    """Classify many images under one total FLOPs budget (paper §5.2); easy
    images leave early, hard ones get more blocks; ``flops_used <= flops_budget``."""
    started = time.monotonic()
    service = _service(request)
    ctype = _content_type(request)
    if ctype == "application/json":
        body = await _json_body(request, BatchRequest)
        budget = body.flops_budget
        raw = body.images
        if len(raw) > service.settings.max_batch_images:
            raise errors.TooLarge(f"{len(raw)} images; at most {service.settings.max_batch_images} per /batch")
        items: list[bytes | errors.ServiceError] = []
        for i, s in enumerate(raw):
            try:
                items.append(_b64(s, f"images[{i}]"))
            except errors.BadImage as exc:
                items.append(exc)
    elif ctype == "multipart/form-data":
        form = await request.form(max_files=service.settings.max_batch_images + 1)
        uploads = [v for k, v in form.multi_items() if k in ("files", "file") and isinstance(v, UploadFile)]
        if not uploads:
            raise errors.BadRequest("multipart body needs one or more file fields named 'files'")
        if len(uploads) > service.settings.max_batch_images:
            raise errors.TooLarge(f"{len(uploads)} images; at most {service.settings.max_batch_images} per /batch")
        items = [await u.read() for u in uploads]
        budget = _positive(form.get("flops_budget"), "flops_budget")
    else:
        raise errors.UnsupportedMedia(f"content type {ctype or '(none)'!r} is not accepted; send "
                                      "application/json or multipart/form-data")
    return await service.batch(items, budget, started)


@router.get("/budget", response_model=BudgetState, summary="Budget controller state")
async def get_budget(request: Request) -> dict:
    """Target and realised mean FLOPs per /classify request and the thresholds."""
    return _service(request).budget_state()


@router.put("/budget", response_model=BudgetState, responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}},
            summary="Change the target mean FLOPs per request")
async def put_budget(request: Request) -> dict:
    """Needs ``Authorization: Bearer <MSDNET_BUDGET_TOKEN>``; refused (403) when
    no token is configured."""
    service = _service(request)
    token = service.settings.budget_token
    if token is None:
        raise errors.Forbidden("runtime budget changes are disabled: no MSDNET_BUDGET_TOKEN is configured")
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise errors.Unauthorized("missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
    body = await _json_body(request, BudgetUpdate)
    try:
        service.set_target(body.target_flops)
    except ValueError as exc:
        raise errors.InvalidParameter(str(exc), field="target_flops") from None
    log.info("budget target set to %.0f FLOPs per request", body.target_flops)
    return service.budget_state()


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: model loaded and warmed up", responses={503: {"model": ErrorBody}})
async def readyz(request: Request) -> dict:
    service = _service(request)
    return {"status": "ready", "num_exits": service.num_exits}


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise errors.NotReady("model is loading")
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


class BodyLimitAndContext:
    """ASGI middleware: request id, access log, request metrics, body size limit.

    A body over ``max_body_bytes`` gets 413: at once when ``Content-Length`` says
    so, or as soon as the streamed bytes pass the limit (the rest is not read).
    """

    def __init__(self, app, settings: Settings):
        self.app, self.limit, self.settings = app, settings.max_body_bytes, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        rid = headers.get("x-request-id") or uuid.uuid4().hex[:16]
        token = request_id.set(rid)
        path = scope["path"]
        endpoint = path if path in ROUTE_LABELS else ("/v2" if path.startswith("/v2") else "other")
        status = {"code": 500}
        service = getattr(scope.get("app").state, "service", None) if scope.get("app") else None

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        too_large = errors.TooLarge(f"request body is over the limit of {self.limit} bytes",
                                    max_body_bytes=self.limit)
        try:
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.limit:
                raise too_large
            seen = 0

            async def receive_limited():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.limit:
                        raise too_large
                return message

            await self.app(scope, receive_limited, send_wrapped)
        except errors.TooLarge as exc:
            await _send_error(send_wrapped, exc, v2=path.startswith("/v2"))
            if service is not None:
                service.metrics.rejected.labels(reason="too_large").inc()
        finally:
            elapsed = time.monotonic() - started
            if service is None:
                service = getattr(scope["app"].state, "service", None) if scope.get("app") else None
            if service is not None and endpoint != "other":
                service.metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()
                service.metrics.latency.labels(endpoint=endpoint).observe(elapsed)
            if self.settings.access_log and endpoint not in ("/metrics", "/healthz"):
                log.info("request", extra={"method": scope["method"], "path": path, "status": status["code"],
                                           "latency_ms": round(elapsed * 1e3, 3)})
            request_id.reset(token)


async def _send_error(send, exc: errors.ServiceError, v2: bool = False) -> None:
    # /v2 answers in the Open Inference Protocol's error shape.
    body = json.dumps({"error": exc.message} if v2 else exc.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    with contextlib.suppress(Exception):  # the response may have started already
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI application. The lifespan loads the checkpoint, starts the
    model thread (``/readyz`` turns 200 after its warm-up) and stops it on exit.

    Raises (at startup):
        model.checkpoint.CheckpointError: when the checkpoint cannot be served.
    """
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        checkpoint = load_checkpoint(settings.checkpoint)
        service = Service(checkpoint, settings)
        service.runner.start(settings.warmup_rounds)
        if settings.redis_url:
            from .fleet import Fleet

            service.fleet = Fleet(settings.redis_url, service, settings)
            service.fleet.start()
        app.state.service = service
        log.info("serving %s: %d exits, target %.0f FLOPs per request", settings.checkpoint,
                 service.num_exits, service.controller.target)
        try:
            yield
        finally:
            if service.fleet is not None:
                service.fleet.stop()
            await asyncio.to_thread(service.runner.stop, settings.drain_timeout_s)

    app = FastAPI(title="msdnet-serve", version="0.1.0", lifespan=lifespan,
                  description="Image classification with MSDNet early exit: each image gets only the compute it "
                              "needs. FLOPs = multiply-accumulates of convs and linears (MSDNet paper convention).")
    app.include_router(router)
    with contextlib.suppress(ImportError):
        from .v2 import router as v2_router

        app.include_router(v2_router)

    @app.exception_handler(errors.ServiceError)
    async def _service_error(request: Request, exc: errors.ServiceError):
        service = getattr(request.app.state, "service", None)
        if service is not None and exc.reason:
            service.metrics.rejected.labels(reason=exc.reason).inc()
        if exc.status >= 500 and not isinstance(exc, errors.NotReady):
            log.warning("%s: %s", exc.code, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": ["body"], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return await _service_error(request, errors.InvalidParameter(f"{where}: {first['msg']}", field=where))

    app.add_middleware(BodyLimitAndContext, settings=settings)
    return app
