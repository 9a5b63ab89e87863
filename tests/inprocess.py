"""The app in-process (FastAPI's TestClient, lifespan included), once it is ready."""

from __future__ import annotations

import contextlib
import time

from fastapi.testclient import TestClient

from server.http.app import create_app
from server.settings import Settings


@contextlib.contextmanager
def ready_client(checkpoint, ready_timeout_s: float = 60.0, **settings):
    """A TestClient on ``checkpoint`` once ``/readyz`` answers 200 (torch eager blocks,
    the reference, with one thread, one warm-up round, and no audits (tests that count
    the blocks a request runs must not see an audit's), unless ``settings`` say otherwise).

    Raises:
        AssertionError: the server did not become ready within ``ready_timeout_s``.
    """
    settings = {"torch_threads": 1, "warmup_rounds": 1, "backend": "torch", "agreement_sample": 0.0, **settings}
    with TestClient(create_app(Settings(checkpoint=checkpoint, **settings))) as c:
        deadline = time.monotonic() + ready_timeout_s
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.02)
        yield c
