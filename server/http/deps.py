"""FastAPI dependencies: what a route gets from the app (``Depends``)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Request

from .. import errors
from ..service import Service


def loaded_service(request: Request) -> Service:
    """The service once the checkpoint is loaded (warmed up or not: metadata needs no model thread).

    Raises:
        errors.NotReady: (503) still loading.
    """
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise errors.NotReady("model is loading")
    return service


def ready_service(request: Request) -> Service:
    """The service once the model thread has warmed up.

    Raises:
        errors.NotReady: (503) loading or warming up.
    """
    service = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        raise errors.NotReady(getattr(service, "not_ready_reason", None) or "model is loading or warming up")
    return service


def arrival(request: Request) -> float:
    """When the request's headers arrived (s, monotonic), as the middleware saw it:
    deadlines and latencies count from here."""
    return getattr(request.state, "arrival", None) or time.monotonic()


ReadyService = Annotated[Service, Depends(ready_service)]
LoadedService = Annotated[Service, Depends(loaded_service)]
