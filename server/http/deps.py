"""FastAPI dependencies: what a route gets from the app (``Depends``).

The engine (:class:`server.engine.interface.Engine`: the in-process service or a
worker's engine client), the settings and the metrics are three dependencies of
their own, made in the app's lifespan (``app.state``); a route never reaches one
through another.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Request

from .. import errors
from ..engine.interface import Engine
from ..metrics import Metrics
from ..settings import Settings


def loaded_engine(request: Request) -> Engine:
    """The engine once the checkpoint is loaded (warmed up or not: metadata needs no model thread).

    Raises:
        errors.NotReady: (503) still loading.
    """
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise errors.NotReady("model is loading")
    return engine


def ready_engine(request: Request) -> Engine:
    """The engine once the model is warm and answering.

    Raises:
        errors.NotReady: (503) loading, warming up, or the engine process not answering.
    """
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not engine.ready:
        raise errors.NotReady(engine.not_ready_reason if engine is not None else "model is loading")
    return engine


def app_settings(request: Request) -> Settings:
    """The settings the app was made with."""
    return request.app.state.settings


def app_metrics(request: Request) -> Metrics:
    """This process's metrics (made with the engine, in the lifespan).

    Raises:
        errors.NotReady: (503) still loading.
    """
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is None:
        raise errors.NotReady("model is loading")
    return metrics


def arrival(request: Request) -> float:
    """When the request's headers arrived (s, monotonic), as the middleware saw it:
    deadlines and latencies count from here."""
    return getattr(request.state, "arrival", None) or time.monotonic()


ReadyEngine = Annotated[Engine, Depends(ready_engine)]
LoadedEngine = Annotated[Engine, Depends(loaded_engine)]
AppSettings = Annotated[Settings, Depends(app_settings)]
AppMetrics = Annotated[Metrics, Depends(app_metrics)]
