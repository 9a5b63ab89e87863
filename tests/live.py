"""A real server process for tests: uvicorn via ``msdnet serve`` on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``with LiveServer(checkpoint, env) as srv: httpx.get(srv.url + "/healthz")``.

    On exit it sends SIGTERM and waits; ``returncode`` and ``log`` are kept.
    """

    def __init__(self, checkpoint=None, env: dict | None = None, args: list[str] | None = None,
                 ready_timeout_s: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if checkpoint is not None:
            cmd += ["--checkpoint", str(checkpoint)]
        self.cmd = cmd + (args or [])
        self.env = {**os.environ, "MSDNET_TORCH_THREADS": "1", "MSDNET_WARMUP_ROUNDS": "2", **(env or {})}
        self.ready_timeout_s = ready_timeout_s
        self.returncode: int | None = None
        self.log = ""

    def __enter__(self) -> LiveServer:
        self.logfile = open(f"/tmp/msdnet-live-{self.port}.log", "w+")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.logfile, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.read_log()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready in {self.ready_timeout_s} s: {self.read_log()[-3000:]}")

    def read_log(self) -> str:
        self.logfile.flush()
        self.logfile.seek(0)
        return self.logfile.read()

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        self.log = self.read_log()
        return self.returncode

    def __exit__(self, *exc) -> None:
        self.stop()
        self.logfile.close()
