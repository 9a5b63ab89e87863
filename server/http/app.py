"""HTTP layer: routes translate requests to :class:`server.service.Service` calls.

Shared objects are created in the lifespan, none at import time. Every error is
a :class:`server.errors.ServiceError` mapped to its status and JSON body by one
handler; request validation errors become 422 with the same body shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import time

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.checkpoint import load as load_checkpoint

from .. import errors
from ..logs import request_id
from ..service import Service
from ..settings import Settings
from . import listener, params
from .protocol import TimedHTTPProtocol
from .schemas import (
    BatchRequest,
    BatchResult,
    BudgetState,
    BudgetUpdate,
    ClassifyRequest,
    ClassifyResult,
    ErrorBody,
    Readiness,
    Status,
)

log = logging.getLogger("msdnet.http")

ROUTE_LABELS = {"/classify", "/batch", "/budget", "/healthz", "/readyz", "/metrics"}
ERROR_MEANING = {400: "Bad image data, bad base64 or a malformed body", 401: "Missing or wrong bearer token",
                 403: "Budget changes are disabled", 404: "Unknown model, version or endpoint",
                 408: "The request was not received in time",
                 413: "Body, image count or image pixels over a limit", 415: "Unsupported content type or format",
                 422: "Invalid parameter, budget below the minimum, or a non-finite network output",
                 500: "Internal error", 503: "Model not ready, or the queue is full (with Retry-After)",
                 504: "The deadline passed before exit 1 could run"}


def error_responses(*statuses: int) -> dict:
    """OpenAPI ``responses`` for these error statuses, each with the error schema (and 500 always)."""
    return {s: {"model": ErrorBody, "description": ERROR_MEANING[s]} for s in sorted({*statuses, 500})}


IMAGE_ROUTE_ERRORS = error_responses(400, 408, 413, 415, 422, 503, 504)


async def _json_body(request: Request, model):
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = [(".".join(str(p) for p in e["loc"]) or "body", e["msg"].removeprefix("Value error, "))
                    for e in exc.errors()]
        raise errors.InvalidParameter("; ".join(f"{where}: {msg}" for where, msg in problems),
                                      field=problems[0][0]) from None


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def arrival(request: Request) -> float:
    """When the request's headers arrived (s, monotonic), as the middleware saw it."""
    return getattr(request.state, "arrival", None) or time.monotonic()


def _service(request: Request) -> Service:
    service = getattr(request.app.state, "service", None)
    if service is None or not service.runner.ready:
        raise errors.NotReady("model is loading or warming up")
    return service


_POSITIVE = {"type": "number", "exclusiveMinimum": 0, "maximum": params.MAX_NUMBER}
MULTIPART_CLASSIFY = {"schema": {"type": "object", "required": ["file"], "properties": {
    "file": {"type": "string", "format": "binary"}, "deadline_ms": _POSITIVE}}}
MULTIPART_BATCH = {"schema": {"type": "object", "required": ["files"], "properties": {
    "files": {"type": "array", "items": {"type": "string", "format": "binary"}}, "flops_budget": _POSITIVE}}}
RAW_IMAGE = {"schema": {"type": "string", "format": "binary"}}


def _body_doc(json_model, multipart, raw: bool) -> dict:
    content = {"application/json": {"schema": json_model.model_json_schema(),
                                    "example": json_model.model_config["json_schema_extra"]["examples"][0]},
               "multipart/form-data": multipart}
    if raw:  # /classify also takes the image file itself as the body
        content |= {"image/*": RAW_IMAGE, "application/octet-stream": RAW_IMAGE}
    doc = {"requestBody": {"required": True, "content": content}}
    if raw:
        doc["parameters"] = [{"name": "deadline_ms", "in": "query", "required": False, "schema": _POSITIVE,
                              "description": "With a raw image body: the deadline in milliseconds."}]
    return doc


router = APIRouter()


@router.post("/classify", response_model=ClassifyResult, responses=IMAGE_ROUTE_ERRORS,
             openapi_extra=_body_doc(ClassifyRequest, MULTIPART_CLASSIFY, raw=True),
             summary="Anytime classification of one image")
async def classify(request: Request) -> dict:
    """Leave at the first exit whose temperature-scaled confidence reaches its
    threshold; with ``deadline_ms``, never start a block the latency estimate
    says would overrun it. Body: JSON ``{"image": base64, "deadline_ms": int}``,
    multipart (``file``, ``deadline_ms``) or raw image bytes (``?deadline_ms=``)."""
    started = arrival(request)
    service = _service(request)
    ctype = _content_type(request)
    if ctype == "application/json":
        body = await _json_body(request, ClassifyRequest)
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
    return await service.classify(data, deadline, started)


@router.post("/batch", response_model=BatchResult, responses=error_responses(400, 408, 413, 415, 422, 503),
             openapi_extra=_body_doc(BatchRequest, MULTIPART_BATCH, raw=False),
             summary="Budgeted batch classification")
async def batch(request: Request) -> dict:
    """Classify many images under one total FLOPs budget (paper §5.2); easy
    images leave early, hard ones get more blocks; ``flops_used <= flops_budget``."""
    started = arrival(request)
    service = _service(request)
    ctype = _content_type(request)
    if ctype == "application/json":
        body = await _json_body(request, BatchRequest)
        budget = body.flops_budget
        raw = body.images
        params.image_count(len(raw), service.settings.max_batch_images)
        items: list[bytes | errors.ServiceError] = []
        for i, s in enumerate(raw):
            try:
                items.append(params.b64decode(s, f"images[{i}]"))
            except errors.BadImage as exc:
                items.append(exc)
    elif ctype == "multipart/form-data":
        form = await request.form(max_files=service.settings.max_batch_images + 1)
        uploads = [v for k, v in form.multi_items() if k in ("files", "file") and isinstance(v, UploadFile)]
        if not uploads:
            raise errors.BadRequest("multipart body needs one or more file fields named 'files'")
        params.image_count(len(uploads), service.settings.max_batch_images)
        items = [await u.read() for u in uploads]
        budget = params.positive_number(form.get("flops_budget"), "flops_budget")
    else:
        raise errors.UnsupportedMedia(f"content type {ctype or '(none)'!r} is not accepted; send "
                                      "application/json or multipart/form-data")
    return await service.batch(items, budget, started)


@router.get("/budget", response_model=BudgetState, responses=error_responses(503),
            summary="Budget controller state")
async def get_budget(request: Request) -> dict:
    """Target and realised mean FLOPs per /classify request and the thresholds."""
    return _service(request).budget_state()


@router.put("/budget", response_model=BudgetState, responses=error_responses(401, 403, 408, 413, 422, 503),
            openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                "schema": BudgetUpdate.model_json_schema(),
                "example": BudgetUpdate.model_config["json_schema_extra"]["examples"][0]}}}},
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


@router.get("/healthz", summary="Liveness", response_model=Status, responses=error_responses())
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: model loaded and warmed up", response_model=Readiness,
            responses=error_responses(503))
async def readyz(request: Request) -> dict:
    service = _service(request)
    return {"status": "ready", "num_exits": service.num_exits}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response, responses={
    200: {"description": "Prometheus text exposition format",
          "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}, **error_responses(503)})
async def metrics(request: Request) -> Response:
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise errors.NotReady("model is loading")
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


class RequestContext:
    """ASGI middleware around every HTTP request: request id, receive limits,
    request metrics and the access log.

    - Request id: a safe client ``X-Request-ID`` or a new one (``params.request_id``),
      echoed in the response and carried by every log line.
    - Receive limits: a body over ``max_body_bytes`` gets 413, at once when
      ``Content-Length`` says so, or as soon as the streamed bytes pass the limit;
      a body not complete within ``receive_timeout_s`` of the headers gets 408.
      Both close the connection (the rest is not read).
    - Every response, whatever produced it (route, error handler, this middleware,
      Starlette's 404/405, an unhandled exception's 500), is counted in
      ``msdnet_requests_total{endpoint,status}``; unknown paths as ``other``.
    Header bytes are decoded as Latin-1 (RFC 9110 obs-text), so no header value
    can fail a request.
    """

    def __init__(self, app, settings: Settings):
        self.app, self.limit, self.settings = app, settings.max_body_bytes, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        raw_id = next((v for k, v in scope["headers"] if k.lower() == b"x-request-id"), None)
        rid = params.request_id(raw_id)
        token = request_id.set(rid)
        scope.setdefault("state", {})["arrival"] = started  # deadlines count from here
        path = scope["path"]
        status = {"code": 500}

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        try:
            length = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), b"")
            if length.isdigit() and int(length) > self.limit:
                raise errors.TooLarge(f"request body is over the limit of {self.limit} bytes",
                                      max_body_bytes=self.limit, headers={"Connection": "close"})
            await self.app(scope, self._limited(receive, started), send_wrapped)
        except errors.ServiceError as exc:  # raised here, outside the routes' handlers
            await _send_error(send_wrapped, exc, path, _service_of(scope))
        finally:
            elapsed = time.monotonic() - started
            service = _service_of(scope)
            endpoint = path if path in ROUTE_LABELS else ("/v2" if path.startswith("/v2") else "other")
            if service is not None:
                service.metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()
                service.metrics.latency.labels(endpoint=endpoint).observe(elapsed)
            if self.settings.access_log and endpoint not in ("/metrics", "/healthz"):
                log.info("request", extra={"method": scope["method"], "path": path, "status": status["code"],
                                           "latency_ms": round(elapsed * 1e3, 3)})
            request_id.reset(token)

    def _limited(self, receive, started: float):
        """``receive`` with the body's size and time limits."""
        seen, done = 0, False
        limit, timeout = self.limit, self.settings.receive_timeout_s

        async def receive_limited():
            nonlocal seen, done
            if done:  # after the body: waiting for a disconnect is not bounded
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, started + timeout - time.monotonic()))
            except TimeoutError:
                raise errors.RequestTimeout(f"request body not received within {timeout:g} s",
                                            timeout_s=timeout, headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise errors.TooLarge(f"request body is over the limit of {limit} bytes",
                                          max_body_bytes=limit, headers={"Connection": "close"})
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        return receive_limited


def _count_slow_client(service: Service, what: str) -> None:
    """A connection closed by :class:`server.http.protocol.TimedHTTPProtocol`."""
    service.metrics.rejected.labels(reason="timeout").inc()
    if what == "header_timeout":
        service.metrics.requests.labels(endpoint="other", status="408").inc()
    log.info("slow client: %s", what)


def _service_of(scope) -> Service | None:
    app = scope.get("app")
    return getattr(app.state, "service", None) if app is not None else None


def error_response(exc: errors.ServiceError, path: str) -> JSONResponse:
    """The one mapping of a :class:`errors.ServiceError` to a response: the
    service's ``{"error": {"code", "message", ...}}``, or under ``/v2`` the Open
    Inference Protocol's ``{"error": "<message>"}``; the error's status and headers."""
    body = {"error": exc.message} if path.startswith("/v2") else exc.body()
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def _count_rejection(service: Service | None, exc: errors.ServiceError) -> None:
    if service is not None and exc.reason:
        service.metrics.rejected.labels(reason=exc.reason).inc()
    if exc.status >= 500 and not isinstance(exc, errors.NotReady):
        log.warning("%s: %s", exc.code, exc.message)


async def _send_error(send, exc: errors.ServiceError, path: str, service: Service | None) -> None:
    _count_rejection(service, exc)
    with contextlib.suppress(Exception):  # the response may have started already
        await error_response(exc, path)({"type": "http"}, None, send)


_HTTP_ERRORS = {400: errors.BadRequest, 404: errors.NotFound, 405: errors.MethodNotAllowed,
                413: errors.TooLarge}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document without the 422 ``HTTPValidationError`` it adds to every
    route with parameters: this server answers validation errors in its own
    error shape, and each route documents the statuses it can return."""
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in spec["paths"].values():
            for op in path.values():
                r422 = op.get("responses", {}).get("422", {})
                if "HTTPValidationError" in json.dumps(r422):
                    del op["responses"]["422"]
        for name in ("HTTPValidationError", "ValidationError"):
            spec.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = spec
    return app.openapi_schema


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI application. The lifespan loads the checkpoint, starts the
    model thread (``/readyz`` turns 200 after its warm-up) and stops it on exit.

    Raises (at startup):
        model.checkpoint.CheckpointError: when the checkpoint cannot be served.
    """
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        listener.claim()  # one process per replica, however the app was started
        checkpoint = load_checkpoint(settings.checkpoint)
        service = Service(checkpoint, settings)
        TimedHTTPProtocol.on_reject = functools.partial(_count_slow_client, service)
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

    app = FastAPIOffline(title="msdnet-serve", version="0.1.0", lifespan=lifespan,
                  description="Image classification with MSDNet early exit: each image gets only the compute it "
                              "needs. FLOPs = multiply-accumulates of convs and linears (MSDNet paper convention).")
    app.include_router(router)
    app.openapi = functools.partial(_openapi, app)
    with contextlib.suppress(ImportError):
        from .v2 import router as v2_router

        app.include_router(v2_router)

    @app.exception_handler(errors.ServiceError)
    async def _service_error(request: Request, exc: errors.ServiceError):
        _count_rejection(getattr(request.app.state, "service", None), exc)
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": ["body"], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return await _service_error(request, errors.InvalidParameter(f"{where}: {first['msg']}", field=where))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # Starlette's own errors (unknown route, wrong method, malformed multipart)
        # in the service's error shape.
        kind = _HTTP_ERRORS.get(exc.status_code, errors.BadRequest)
        if "maximum size" in str(exc.detail):  # python-multipart: a form field over its size limit
            kind = errors.TooLarge
        return await _service_error(request, kind(str(exc.detail), headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("unhandled %s", type(exc).__name__, exc_info=exc)
        return error_response(errors.ServiceError(f"internal error ({type(exc).__name__}); the request id is in "
                                                  "the X-Request-ID header"), request.url.path)

    app.add_middleware(RequestContext, settings=settings)
    return app
