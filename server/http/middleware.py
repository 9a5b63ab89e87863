"""ASGI middleware around every HTTP request (see :class:`RequestContext`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from .. import errors
from ..logs import request_id
from ..metrics import Metrics
from ..settings import Settings
from . import params
from .responses import count_rejection, error_response

log = logging.getLogger("msdnet.http")

ROUTE_LABELS = {"/classify", "/batch", "/budget", "/feedback", "/healthz", "/readyz", "/metrics"}
LAG_INTERVAL_S = 0.01


def is_readiness(path: str) -> bool:
    """The readiness routes: ``/readyz`` and the v2 ``.../ready`` ones."""
    return path == "/readyz" or (path.startswith("/v2/") and path.endswith("/ready"))


def is_inference(path: str) -> bool:
    """The paths that run the model: what a front door may refuse."""
    return path in ("/classify", "/batch") or (path.startswith("/v2/models/") and path.endswith("/infer"))


async def watch_loop_lag(door, interval_s: float = LAG_INTERVAL_S) -> None:
    """Feed ``door`` (a :class:`server.http.frontdoor.FrontDoor`) how late a timer of
    ``interval_s`` seconds fires on this event loop, forever (cancel to stop)."""
    loop = asyncio.get_running_loop()
    while True:
        t = loop.time()
        await asyncio.sleep(interval_s)
        door.observe(loop.time() - t - interval_s)


class RequestContext:
    """ASGI middleware around every HTTP request: request id, receive limits,
    request metrics and the access log.

    - Request id: a safe client ``X-Request-ID`` or a new one (``params.request_id``),
      echoed in the response and carried by every log line.
    - Receive limits: a body over ``max_body_bytes`` gets 413, at once when
      ``Content-Length`` says so, or as soon as the streamed bytes pass the limit;
      a body not complete within ``receive_timeout_s`` of the headers gets 408.
      Both close the connection (the rest is not read).
    - While the process stops (``server.http.drain``): the readiness routes answer
      503; a request still running when the drain time is up gets a 503 (JSON, the
      drain time named) rather than uvicorn's cancel.
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
        state = scope.setdefault("state", {})
        state["arrival"] = started  # deadlines count from here
        path = scope["path"]
        status = {"code": 500}
        handler = asyncio.current_task()

        def client_gone() -> None:  # the protocol saw the connection close before the answer
            status["gone"] = True
            if handler is not None and not handler.done():
                handler.cancel()

        state["on_client_gone"] = client_gone
        drain = _drain_of(scope)
        if drain is not None:
            drain.requests.add(handler)

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        try:
            length = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), b"")
            if length.isdigit() and int(length) > self.limit:
                raise errors.TooLarge(f"request body is over the limit of {self.limit} bytes",
                                      max_body_bytes=self.limit, headers={"Connection": "close"})
            if drain is not None and drain.stopping and is_readiness(path):
                raise errors.NotReady("the server is stopping")
            door = _front_door_of(scope)
            if door is not None and is_inference(path) and not door.admits(random.random()):
                raise errors.Saturated(
                    f"this HTTP process is {door.lag_s * 1e3:.0f} ms behind (over {door.limit_s * 1e3:.0f} ms of "
                    "the latency objective): refused before reading the body; retry later",
                    headers={"Retry-After": "1"}, retry_after_s=1.0, loop_lag_ms=round(door.lag_s * 1e3, 1))
            await self.app(scope, self._limited(receive, started), send_wrapped)
        except errors.ServiceError as exc:  # raised here, outside the routes' handlers
            await _send_error(send_wrapped, exc, path, _metrics_of(scope))
        except asyncio.CancelledError:
            if status.get("gone"):
                handler.uncancel()  # our own cancel: the client left; nothing to answer
                status["code"] = 499  # nginx's "client closed request", for the metrics and the access log
            elif drain is not None and drain.stopping and not status.get("started"):
                handler.uncancel()  # uvicorn's, at the end of the drain time: answer rather than drop
                await _send_error(send_wrapped, drain.timed_out(), path, _metrics_of(scope))
            else:
                raise
        finally:
            if drain is not None:
                drain.requests.discard(handler)
            elapsed = time.monotonic() - started
            metrics = _metrics_of(scope)
            endpoint = path if path in ROUTE_LABELS else ("/v2" if path.startswith("/v2") else "other")
            if metrics is not None:
                metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()
                metrics.latency.labels(endpoint=endpoint).observe(elapsed)
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


def _drain_of(scope):
    app = scope.get("app")
    return getattr(app.state, "drain", None) if app is not None else None


def _front_door_of(scope):
    app = scope.get("app")
    return getattr(app.state, "front_door", None) if app is not None else None


def _metrics_of(scope) -> Metrics | None:
    app = scope.get("app")
    return getattr(app.state, "metrics", None) if app is not None else None


async def _send_error(send, exc: errors.ServiceError, path: str, metrics: Metrics | None) -> None:
    count_rejection(metrics, exc)
    with contextlib.suppress(Exception):  # the response may have started already
        await error_response(exc, path)({"type": "http"}, None, send)


