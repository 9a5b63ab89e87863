"""The FastAPI application: factory, lifespan, error handlers, OpenAPI document.

Only the CLI imports this package. Shared objects are made in the lifespan, none
at import time. Every error becomes one answer through
:func:`server.http.responses.error_response` (the native or the v2 shape by
path): service errors, request validation errors, Starlette's own (unknown
route, wrong method, malformed multipart) and unexpected exceptions (500).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import errors
from ..metrics import Metrics
from ..settings import Settings
from . import decoding, listener
from .drain import MODEL_STOP_S, Drain
from .frontdoor import FrontDoor
from .middleware import RequestContext, watch_loop_lag
from .protocol import TimedHTTPProtocol
from .responses import count_rejection, error_response
from .routes import router
from .v2 import router as v2_router

log = logging.getLogger("msdnet.http")

_HTTP_ERRORS = {400: errors.BadRequest, 404: errors.NotFound, 405: errors.MethodNotAllowed, 413: errors.TooLarge}


def _count_slow_client(metrics: Metrics, what: str) -> None:
    """A connection closed by :class:`server.http.protocol.TimedHTTPProtocol`."""
    metrics.rejected.labels(reason="timeout").inc()
    if what == "header_timeout":
        metrics.requests.labels(endpoint="other", status="408").inc()
    log.info("slow client: %s", what)


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document without the 422 ``HTTPValidationError`` it adds to every
    route with parameters: this server answers validation errors in its own
    error shape, and each route documents the statuses it can return."""
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in spec["paths"].values():
            for op in path.values():
                if "HTTPValidationError" in json.dumps(op.get("responses", {}).get("422", {})):
                    del op["responses"]["422"]
        for name in ("HTTPValidationError", "ValidationError"):
            spec.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = spec
    return app.openapi_schema


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.ServiceError)
    async def service_error(request: Request, exc: errors.ServiceError):
        count_rejection(getattr(request.app.state, "metrics", None), exc)
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": ["body"], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return await service_error(request, errors.InvalidParameter(f"{where}: {first['msg']}", field=where))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = _HTTP_ERRORS.get(exc.status_code, errors.BadRequest)
        if "maximum size" in str(exc.detail):  # python-multipart: a form field over its size limit
            kind = errors.TooLarge
        return await service_error(request, kind(str(exc.detail), headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.error("unhandled %s", type(exc).__name__, exc_info=exc)
        return error_response(errors.ServiceError(f"internal error ({type(exc).__name__}); the request id is in "
                                                  "the X-Request-ID header"), request.url.path)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI application. The lifespan loads the checkpoint, starts the
    model thread (``/readyz`` turns 200 after its warm-up; 503 again from SIGTERM
    on, ``server.http.drain``) and stops it on exit;
    or, with ``settings.engine_address`` (a worker of ``msdnet serve --workers N``),
    connects to the replica's engine process instead (``server.ipc``).

    Raises (at startup):
        model.checkpoint.CheckpointError: when the checkpoint cannot be served.
        server.http.listener.SharedListener: when started as one of several worker
            processes (``uvicorn --workers 2``, gunicorn ``-w 2``).
    """
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        TimedHTTPProtocol.configure(settings.receive_timeout_s, settings.max_pending_connections)
        if settings.engine_address:  # one of `msdnet serve --workers N`: the model is in the engine process
            from ..ipc.client import EngineClient
            from ..lifeline import follow_parent

            follow_parent(grace_s=settings.drain_timeout_s + 5)  # the CLI killed (SIGKILL): drain and stop
            service = EngineClient(settings.engine_address, settings)
            # The engine answers before the workers start (the CLI waits for it): silence
            # means it is gone, and this worker's startup fails rather than hang.
            await service.connect(timeout_s=15.0)
            stop = service.close
        else:  # the whole replica in this process
            from model.checkpoint import load as load_checkpoint

            from ..engine.service import Service

            listener.claim()  # one process per replica, however the app was started
            service = Service(load_checkpoint(settings.checkpoint, calibrated=True), settings)
            service.start()
            stop = functools.partial(asyncio.to_thread, service.stop, MODEL_STOP_S)
        TimedHTTPProtocol.on_reject = functools.partial(_count_slow_client, service.metrics)
        watcher = None
        if settings.latency_slo_ms:  # this process's own front door (HTTP-bound load: server.budget.objective)
            app.state.front_door = FrontDoor(settings.latency_slo_ms / 1e3)
            watcher = asyncio.ensure_future(watch_loop_lag(app.state.front_door))
        app.state.metrics = service.metrics  # the engine, the settings and the metrics: three dependencies
        app.state.engine = service
        # One decode through the request path's thread pool: its first use starts a thread and
        # loads Pillow's plugins (a first request with deadline_ms=20 on a fresh worker got 504).
        sample = Path(__file__).resolve().parent.parent / "samples" / "shirt.png"
        with contextlib.suppress(OSError, errors.ServiceError):
            await run_in_threadpool(decoding.decode, sample.read_bytes(), service.transforms, settings)
        await run_in_threadpool(decoding.prestart)  # the large-image process, before the first large image
        gc.collect()  # what start-up loaded lives for good: keep full GC passes short (the engine does the same)
        gc.freeze()
        app.state.drain = drain = Drain(settings.drain_timeout_s)
        drain.watch_signals()  # at SIGTERM: not ready, the accept queue taken in, then uvicorn's drain
        log.info("serving %s: %d exits (%s)", settings.checkpoint, service.num_exits,
                 f"engine at {settings.engine_address}" if settings.engine_address else "model in this process")
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            await drain.answered()  # the drain time's 503s go out before the service stops
            await stop()
            decoding.shutdown()

    app = FastAPIOffline(title="msdnet-serve", version="0.1.0", lifespan=lifespan,
                         description="Image classification with MSDNet early exit: each image gets only the compute "
                                     "it needs. FLOPs = multiply-accumulates of convs and linears (MSDNet paper "
                                     "convention).")
    app.state.settings = settings
    app.include_router(router)
    app.include_router(v2_router)
    app.openapi = functools.partial(_openapi, app)
    _add_error_handlers(app)
    app.add_middleware(RequestContext, settings=settings)
    return app
