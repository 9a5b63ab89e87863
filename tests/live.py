"""A real server process for tests: uvicorn via ``msdnet serve`` on a free loopback
port. The process logic is :class:`loadtest.harness.ServerProcess`."""

from __future__ import annotations

from loadtest.harness import ServerProcess, free_port, serve_command

__all__ = ["LiveServer", "free_port"]


class LiveServer(ServerProcess):
    """``with LiveServer(checkpoint, env) as srv: httpx.get(srv.url + "/healthz")``.

    ``msdnet serve`` with one torch thread, 2 warm-up rounds and one process
    (``MSDNET_WORKERS=1``; ``tests/test_workers.py`` runs ``--workers 2``) and no audits
    (``MSDNET_AGREEMENT_SAMPLE=0``: no block runs beside the requests') unless ``env``
    or ``args`` say otherwise, torch eager blocks (the reference: tests compare with offline torch and
    count torch modules; the ONNX Runtime backend has its own tests), access log on
    (tests read it). Raises ``RuntimeError`` if the server
    exits or is not ready (``/readyz`` 200) within ``ready_timeout_s`` seconds. On
    exit it sends SIGTERM and waits; ``returncode`` and ``log`` are kept.
    """

    def __init__(self, checkpoint=None, env: dict | None = None, args: list[str] | None = None,
                 ready_timeout_s: float = 120.0):
        super().__init__(serve_command(checkpoint, args),
                         {"MSDNET_TORCH_THREADS": "1", "MSDNET_WARMUP_ROUNDS": "2", "MSDNET_BACKEND": "torch",
                          "MSDNET_WORKERS": "1", "MSDNET_AGREEMENT_SAMPLE": "0",
                          **(env or {})},
                         ready_timeout_s=ready_timeout_s, name="live")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait ``timeout`` seconds, then SIGKILL; the exit status."""
        return super().stop(timeout)
