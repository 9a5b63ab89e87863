"""One process harness for tests and benchmarks: a server process on a free
loopback port, started, polled until ready, stopped with SIGTERM (then SIGKILL).

``tests/live.py`` (``LiveServer``) and ``loadtest/servers.py`` build on this
module; it imports nothing from ``tests``.
"""

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
from collections.abc import Callable
from pathlib import Path

# Loopback only: a proxy from the environment must never see these requests.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it; another
    process may still take it before the caller binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_port_args(port: int) -> list[str]:
    """``--host 127.0.0.1 --port PORT``: how ``msdnet serve`` and uvicorn-style servers take their address."""
    return ["--host", "127.0.0.1", "--port", str(port)]


def serve_command(checkpoint: str | Path | None = None, args: list[str] | None = None) -> list[str]:
    """``python -m server.cli serve [--checkpoint C] [args]`` with this interpreter;
    :class:`ServerProcess` appends ``--host`` and ``--port``."""
    cmd = [sys.executable, "-m", "server.cli", "serve"]
    if checkpoint is not None:
        cmd += ["--checkpoint", str(checkpoint)]
    return cmd + list(args or [])


def process_tree(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux ``/proc/<pid>/task/*/children``; [] elsewhere)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


class ServerProcess:
    """``with ServerProcess(cmd_without_port) as srv: ... srv.url ...``.

    ``cmd`` gets ``listen_args(P)`` appended (default ``--host 127.0.0.1 --port P``;
    ``P`` from :func:`free_port`). ``env`` is added to this process's environment;
    ``self.env``, ``self.cmd`` and ``self.new_session`` (start it as the leader of
    a session and process group of its own) may be changed before the start; ``cwd``: the
    process's working folder (default: this one's). The start waits until ``ready_path`` answers 200
    (polled every 0.2 s) and raises ``RuntimeError`` with the end of the server's
    log when the process exits first or is not ready within ``ready_timeout_s``
    seconds; the process is stopped before the error propagates. :meth:`stop` sends
    SIGTERM, waits ``stop_timeout_s`` seconds, then kills; it keeps ``returncode``
    and the whole log as ``log``. The log file is deleted on exit.
    """

    def __init__(self, cmd: list[str], env: dict | None = None, ready_path: str = "/readyz",
                 ready_timeout_s: float = 180.0, stop_timeout_s: float = 30.0, name: str = "server",
                 listen_args: Callable[[int], list[str]] = host_port_args, cwd: str | Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [*cmd, *listen_args(self.port)]
        self.cwd = cwd
        self.new_session = False
        self.env = {**os.environ, **(env or {})}
        self.ready_path, self.ready_timeout_s, self.stop_timeout_s = ready_path, ready_timeout_s, stop_timeout_s
        self.name = name
        self.returncode: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log = ""
        self.logfile = None

    @classmethod
    def msdnet(cls, checkpoint: str | Path | None = None, torch_threads: int = 1, env: dict | None = None,
               args: list[str] | None = None, name: str = "msdnet") -> ServerProcess:
        """``python -m server.cli serve`` for benchmarks: access log off and log level
        warning (per-request logging would cost CPU the baseline does not pay)."""
        base = {"MSDNET_TORCH_THREADS": str(torch_threads), "MSDNET_ACCESS_LOG": "false",
                "MSDNET_LOG_LEVEL": "warning"}
        return cls(serve_command(checkpoint, args), {**base, **(env or {})}, name=name)

    @classmethod
    def naive(cls, checkpoint: str | Path | None = None, torch_threads: int = 1,
              name: str = "naive") -> ServerProcess:
        """The baseline ``python -m loadtest.naive_server`` (whole network per request)."""
        cmd = [sys.executable, "-m", "loadtest.naive_server", "--torch-threads", str(torch_threads)]
        if checkpoint is not None:
            cmd += ["--checkpoint", str(checkpoint)]
        return cls(cmd, name=name)

    def _status(self, path: str, timeout: float = 2.0) -> int:
        try:
            with _NO_PROXY.open(self.url + path, timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def start(self) -> ServerProcess:
        """Start the process and return once it is ready (see the class docstring)."""
        self.logfile = tempfile.NamedTemporaryFile("w+", prefix=f"msdnet-{self.name}-", suffix=".log", delete=False)
        try:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.logfile, stderr=subprocess.STDOUT,
                                         cwd=self.cwd, start_new_session=self.new_session)
            self._wait_ready()
        except BaseException:  # also KeyboardInterrupt: never leave the process behind
            self.close()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.read_log()[-3000:]}")
            try:
                if self._status(self.ready_path) == 200:
                    return
            except OSError:  # not listening yet (URLError is an OSError)
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} not ready in {self.ready_timeout_s} s: {self.log[-3000:]}")

    def cpu_s(self) -> float | None:
        """CPU seconds (user + system, all threads) the server has used: its process
        and every process under it (``msdnet serve --workers N`` does its work in
        children); None where /proc is not available."""
        try:
            pids = [self.proc.pid, *process_tree(self.proc.pid)]
        except AttributeError:
            return None
        total, tick = 0.0, os.sysconf("SC_CLK_TCK")
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, ValueError, IndexError):
                if pid == self.proc.pid:
                    return None
        return total

    def read_log(self) -> str:
        """The server's stdout and stderr so far (after :meth:`close`: as kept by the last stop)."""
        if self.logfile is None or self.logfile.closed:
            return self.log
        self.logfile.flush()
        return Path(self.logfile.name).read_text(errors="replace")

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, wait ``timeout`` seconds (default ``stop_timeout_s``), then SIGKILL.
        Returns the exit status (negative: killed by that signal); None if never started."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout_s if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        self.log = self.read_log()
        return self.returncode

    def close(self) -> None:
        """Stop the process and delete the log file (``log`` keeps its text)."""
        self.stop()
        if self.logfile is not None and not self.logfile.closed:
            self.logfile.close()
            Path(self.logfile.name).unlink(missing_ok=True)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
