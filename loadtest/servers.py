"""Server processes for benchmarks: ``msdnet serve`` or the naive baseline, each
on a free loopback port, started and stopped by the caller (like tests/live.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``with ServerProcess(cmd_without_port) as srv: ... srv.url ...``.

    ``cmd`` gets ``--host 127.0.0.1 --port P`` appended. Ready when ``ready_path``
    answers 200. On exit: SIGTERM, then kill after ``stop_timeout_s``.
    """

    def __init__(self, cmd: list[str], env: dict | None = None, ready_path: str = "/readyz",
                 ready_timeout_s: float = 180.0, stop_timeout_s: float = 30.0, name: str = "server"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [*cmd, "--host", "127.0.0.1", "--port", str(self.port)]
        self.env = {**os.environ, **(env or {})}
        self.ready_path, self.ready_timeout_s, self.stop_timeout_s = ready_path, ready_timeout_s, stop_timeout_s
        self.name = name
        self.returncode: int | None = None
        self.proc: subprocess.Popen | None = None

    @classmethod
    def msdnet(cls, checkpoint: str | Path | None = None, torch_threads: int = 1, env: dict | None = None,
               args: list[str] | None = None, name: str = "msdnet") -> ServerProcess:
        """``python -m server.cli serve``; access log off and log level warning
        (per-request logging would cost CPU the baseline does not pay)."""
        cmd = [sys.executable, "-m", "server.cli", "serve"]
        if checkpoint is not None:
            cmd += ["--checkpoint", str(checkpoint)]
        base = {"MSDNET_TORCH_THREADS": str(torch_threads), "MSDNET_ACCESS_LOG": "false",
                "MSDNET_LOG_LEVEL": "warning"}
        return cls(cmd + (args or []), {**base, **(env or {})}, name=name)

    @classmethod
    def naive(cls, checkpoint: str | Path | None = None, torch_threads: int = 1,
              name: str = "naive") -> ServerProcess:
        cmd = [sys.executable, "-m", "loadtest.naive_server", "--torch-threads", str(torch_threads)]
        if checkpoint is not None:
            cmd += ["--checkpoint", str(checkpoint)]
        return cls(cmd, name=name)

    def _get(self, path: str, timeout: float = 2.0) -> int:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def __enter__(self) -> ServerProcess:
        self.logfile = tempfile.NamedTemporaryFile("w+", prefix=f"msdnet-bench-{self.name}-", suffix=".log",
                                                   delete=False)
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.logfile, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.read_log()[-3000:]}")
            try:
                if self._get(self.ready_path) == 200:
                    return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} not ready in {self.ready_timeout_s} s: {self.read_log()[-3000:]}")

    def cpu_s(self) -> float | None:
        """CPU seconds (user + system, all threads) the server process has used;
        None where /proc is not available."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, AttributeError):
            return None

    def read_log(self) -> str:
        self.logfile.flush()
        return Path(self.logfile.name).read_text(errors="replace")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        return self.returncode

    def __exit__(self, *exc) -> None:
        self.stop()
        self.logfile.close()
        Path(self.logfile.name).unlink(missing_ok=True)
