"""The one mapping of errors to HTTP answers, and the answers' shapes.

Every :class:`server.errors.ServiceError` becomes its status, its headers and a
JSON body: the service's ``{"error": {"code", "message", ...}}``, or under
``/v2`` the Open Inference Protocol's ``{"error": "<message>"}``. The same table
documents each route's error statuses in the OpenAPI document. Results are
turned into the response schemas here, once.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from fastapi.responses import JSONResponse

from .. import errors
from ..engine.interface import BatchOutcome, BudgetReport, Engine, Finished, Labelled
from ..metrics import Metrics
from .schemas import ErrorBody

log = logging.getLogger("msdnet.http")

ERROR_MEANING = {400: "Bad image data, bad base64 or a malformed body", 401: "Missing or wrong bearer token",
                 403: "Budget changes are disabled",
                 404: "Unknown model, version or endpoint; for /feedback: no answer of that request id is held "
                      "(unknown, not a one-image /classify answer, or forgotten)",
                 409: "That answer was labelled already",
                 408: "The request was not received in time",
                 413: "Body, image count or image pixels over a limit", 415: "Unsupported content type or format",
                 422: "Invalid parameter, budget below the minimum, or a non-finite network output",
                 500: "Internal error",
                 503: "Model not ready; the queue is full; or, with a latency objective (MSDNET_LATENCY_SLO_MS), "
                      "even exit 1 cannot keep it (or this HTTP process is behind): refused at once, before "
                      "decoding. Full and objective refusals carry Retry-After (seconds).",
                 504: "The deadline passed before exit 1 could run (with a latency objective: or cannot be met at "
                      "the forecast queueing delay); nothing was computed"}


RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying (queue full, or the latency "
                                               "objective refusing).", "schema": {"type": "integer"}}}


def error_responses(*statuses: int, model=ErrorBody) -> dict:
    """OpenAPI ``responses`` for these error statuses with the error schema (and 500
    always); a 503 documents its ``Retry-After`` header."""
    return {s: {"model": model, "description": ERROR_MEANING[s], **({"headers": RETRY_AFTER} if s == 503 else {})}
            for s in sorted({*statuses, 500})}


def error_response(exc: errors.ServiceError, path: str) -> JSONResponse:
    """The answer to ``exc`` on ``path`` (the v2 shape under ``/v2``)."""
    body = {"error": exc.message} if path.startswith("/v2") else exc.body()
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def count_rejection(metrics: Metrics | None, exc: errors.ServiceError) -> None:
    """``msdnet_rejected_requests_total{reason}``, and a log line for server-side faults."""
    if metrics is not None and exc.reason:
        metrics.rejected.labels(reason=exc.reason).inc()
    if exc.status >= 500 and not isinstance(exc, errors.NotReady):
        log.warning("%s: %s", exc.code, exc.message)


def ranked(probs: np.ndarray, k: int) -> list[int]:
    """The ``k`` most probable class ids of ``probs`` ``(num_classes,)``, most probable
    first (the one pick of the top class, for the native and the v2 answers)."""
    return [int(i) for i in np.argsort(-probs)[:k]]


def classify_result(engine: Engine, f: Finished, started: float, deadline_ms: float | None, top_k: int) -> dict:
    """A ``/classify`` answer (:class:`server.http.schemas.ClassifyResult`) with the
    ``top_k`` classes; the latency (ms) is counted from ``started``, the request's arrival."""
    latency_ms = (time.monotonic() - started) * 1e3
    top = [{"class_id": i, "label": engine.classes[i], "probability": float(f.probs[i])}
           for i in ranked(f.probs, top_k)]
    return {"class_id": top[0]["class_id"], "label": top[0]["label"], "confidence": float(f.confidence),
            "top_k": top, "exit": f.exit, "num_exits": engine.num_exits, "flops": int(f.flops),
            "deadline_met": None if deadline_ms is None else latency_ms <= deadline_ms,
            "latency_ms": round(latency_ms, 3), "target_flops": f.target_flops, "degraded": f.degraded}


def batch_result(engine: Engine, out: BatchOutcome, started: float, top_k: int) -> dict:
    """A ``/batch`` answer (:class:`server.http.schemas.BatchResult`)."""
    results = [r.body() if isinstance(r, errors.ServiceError) else classify_result(engine, r, started, None, top_k)
               for r in out.results]
    return {"results": results, "flops_used": out.flops_used, "flops_budget": out.flops_budget,
            "exit_counts": out.exit_counts}


def feedback_result(out: Labelled) -> dict:
    """A ``POST /feedback`` answer (:class:`server.http.schemas.FeedbackResult`)."""
    last = out.last_class
    return {"request_id": out.request_id, "label": out.label, "exit": out.exit, "class_id": out.served_class,
            "correct": out.served_class == out.label, "audited": out.audited, "last_exit_class_id": last,
            "last_exit_correct": None if last is None else last == out.label}


def budget_state(report: BudgetReport) -> dict:
    """``GET /budget`` (:class:`server.http.schemas.BudgetState`); an infinite threshold is null."""
    v = report.view
    return {"target_flops": v.target_flops, "realised_flops": v.realised_flops, "window": v.window,
            "thresholds": [None if th == float("inf") else th for th in v.thresholds],
            "command_flops": v.command_flops, "requests": v.requests, "controller": v.controller,
            "mode": report.mode, "fleet_realised_flops": report.fleet_realised_flops,
            "in_force_flops": v.in_force_flops,
            "objective": None if report.objective is None else report.objective.__dict__}
