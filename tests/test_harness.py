"""The process harness (loadtest/harness.py) that tests and benchmarks share:
start, readiness, failure when never ready, stop and kill, the log; and the
tests' LiveServer built on it. Fake servers (a few lines of http.server), no model."""

from __future__ import annotations

import os
import signal
import socket
import sys
import textwrap
from pathlib import Path

import pytest

from loadtest.harness import ServerProcess, free_port, serve_command
from tests.live import LiveServer

# A fake server: ``python fake.py MODE --host H --port P``. MODE ready: /readyz 200;
# busy: /readyz 503 forever; crash: exits 7 at once; stubborn: ready, ignores SIGTERM.
# SIGTERM (ready, busy) exits with status 3, so a clean stop is told from a kill.
FAKE = textwrap.dedent("""
    import http.server, os, signal, sys
    mode = sys.argv[1]
    print("fake", mode, "argv", sys.argv[2:], "cwd", os.getcwd(), "X", os.environ.get("HARNESS_X"), flush=True)
    if mode == "crash":
        print("boom", flush=True)
        sys.exit(7)
    def bye(*_):
        print("bye", flush=True)
        os._exit(3)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else bye)
    args = sys.argv[2:]
    port = int(args[args.index("--port") + 1]) if "--port" in args else int(args[0].rsplit(":", 1)[1])
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(503 if mode == "busy" else 200)
            self.send_header("content-length", "0")
            self.end_headers()
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
""")


@pytest.fixture
def fake(tmp_path) -> Path:
    path = tmp_path / "fake.py"
    path.write_text(FAKE)
    return path


def test_free_port_can_be_bound():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_start_ready_stop_and_log(fake, tmp_path):
    srv = ServerProcess([sys.executable, str(fake), "ready"], env={"HARNESS_X": "42"}, name="fake", cwd=tmp_path)
    assert srv.url == f"http://127.0.0.1:{srv.port}"
    assert srv.cmd[-4:] == ["--host", "127.0.0.1", "--port", str(srv.port)]
    assert srv.env["HARNESS_X"] == "42" and srv.env["PATH"] == os.environ["PATH"]
    with srv:
        assert srv.proc.poll() is None
        logfile = Path(srv.logfile.name)
        assert logfile.is_file()
        log = srv.read_log()
        assert f"argv ['--host', '127.0.0.1', '--port', '{srv.port}']" in log
        assert f"cwd {tmp_path}" in log and "X 42" in log
        assert srv.cpu_s() is not None and srv.cpu_s() >= 0
    assert srv.returncode == 3  # SIGTERM reached the handler: a clean stop, not a kill
    assert "bye" in srv.log and srv.read_log() == srv.log
    assert not logfile.exists()


def test_custom_listen_args(fake):
    with ServerProcess([sys.executable, str(fake), "ready"],
                       listen_args=lambda p: [f"--web.listen-address=127.0.0.1:{p}"]) as srv:
        assert srv.cmd[-1] == f"--web.listen-address=127.0.0.1:{srv.port}"
        assert f"argv ['--web.listen-address=127.0.0.1:{srv.port}']" in srv.read_log()


def test_never_ready_raises_and_stops_the_process(fake):
    srv = ServerProcess([sys.executable, str(fake), "busy"], ready_timeout_s=1.0, name="busy")
    with pytest.raises(RuntimeError, match=r"busy not ready in 1\.0 s"):
        srv.start()
    assert srv.proc.poll() is not None and srv.returncode == srv.proc.returncode
    assert not Path(srv.logfile.name).exists()


def test_exit_before_ready_raises_with_the_log(fake):
    srv = ServerProcess([sys.executable, str(fake), "crash"], name="crashy")
    with pytest.raises(RuntimeError, match=r"(?s)crashy exited with 7:.*boom"):
        with srv:
            pytest.fail("a crashed server must not be entered")
    assert srv.returncode == 7 and "boom" in srv.log


def test_stop_kills_a_server_that_ignores_sigterm(fake):
    with ServerProcess([sys.executable, str(fake), "stubborn"], stop_timeout_s=0.5) as srv:
        assert srv.stop() == -signal.SIGKILL
    assert srv.returncode == -signal.SIGKILL


def test_live_server_keeps_its_interface(tmp_path):
    srv = LiveServer(tmp_path / "c.pt", {"MSDNET_WARMUP_ROUNDS": "5", "HARNESS_X": "1"}, args=["--no-controller"],
                     ready_timeout_s=7.0)
    assert srv.cmd == [*serve_command(tmp_path / "c.pt", ["--no-controller"]),
                       "--host", "127.0.0.1", "--port", str(srv.port)]
    assert srv.cmd[:4] == [sys.executable, "-m", "server.cli", "serve"]
    assert srv.url == f"http://127.0.0.1:{srv.port}" and srv.ready_timeout_s == 7.0
    assert srv.env["MSDNET_TORCH_THREADS"] == "1" and srv.env["MSDNET_WARMUP_ROUNDS"] == "5"
    assert srv.env["HARNESS_X"] == "1" and srv.returncode is None and srv.log == ""
    assert LiveServer().cmd[4:6] == ["--host", "127.0.0.1"]  # no checkpoint: the CLI's default


def test_live_server_raises_when_never_ready(fake):
    srv = LiveServer(ready_timeout_s=1.0)
    srv.cmd = [sys.executable, str(fake), "busy", *srv.cmd[4:]]
    with pytest.raises(RuntimeError, match="not ready"):
        with srv:
            pytest.fail("never ready, never entered")
    assert srv.proc.poll() is not None
