"""Issue 25, goal 6: nothing lost when a process stops.

A real ``msdnet serve`` (one process, and 2 HTTP workers + the engine) whose model
steps are held by a test hook (``tests.held_serve``), so requests are really in
flight when SIGTERM arrives, however fast the CPU: several keep-alive connections
each with a request held in the model, one with two more requests pipelined
behind its held one, one whose next request is written just before the signal,
and one idle. The held steps are
released only once every HTTP process has begun its drain. Every request written
before the signal gets a whole answer, the last one on each connection with
``Connection: close``; readiness is 503 from the signal on; a new connection is
refused once the workers have stopped accepting (with 2 workers it waited,
unaccepted, until the server exited, and was reset); the server exits 0 and
leaves no process. A request still held when the drain time is up gets a JSON 503
naming it (it got uvicorn's plain-text 500 in one process, and no answer at all
from a worker of ``--workers 2``). A signal to the whole process group reaches the
engine only after the workers. The races that a whole server cannot be made to
lose on purpose (a request unread in an idle connection's socket buffer, a
connection in the accept queue) are in ``tests/test_drain_protocol.py``.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import signal
import socket
import struct
import sys
import termios
from pathlib import Path

import pytest

from loadtest.harness import process_tree
from tests.live import LiveServer
from tests.test_server_live import png, wait_for

pytestmark = pytest.mark.integration


class _Answer(http.client.HTTPResponse):
    def _close_conn(self) -> None:  # the connection's stream is shared by its answers: keep it open
        self.fp = None


class Conn:
    """One raw HTTP/1.1 keep-alive connection: requests written as they come (pipelined
    if the test likes), answers read in order."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.stream = self.sock.makefile("rb")

    def send(self, method: str, path: str, body: bytes = b"") -> None:
        head = f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: image/png\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + body)

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        """The next answer, whole: ``(status, headers with lower-case names, body)``."""
        r = _Answer(type("Stream", (), {"makefile": lambda *_a, **_k: self.stream})())
        r.begin()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()

    def closed_by_server(self) -> bool:
        """The server closed the connection cleanly (FIN, no reset) and sent nothing more."""
        return self.stream.read(1) == b""

    def delivered(self) -> bool:
        """Every byte written so far is in the server's socket buffer or read from it
        (none waits in this end's send queue: ``SIOCOUTQ``)."""
        return struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0] == 0

    def unread_by_server(self) -> int:
        """Bytes of this connection waiting unread in the server's socket buffer
        (``/proc/net/tcp``'s ``rx_queue`` of the server's end)."""
        me, server = self.sock.getsockname(), self.sock.getpeername()
        ends = (f"0100007F:{server[1]:04X}", f"0100007F:{me[1]:04X}")
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if (fields[1], fields[2]) == ends:
                return int(fields[4].split(":")[1], 16)
        raise AssertionError(f"no server end for {me}")

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


def refused(port: int) -> bool:
    """A connection to ``port`` is refused (not taken, nor left waiting)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    except ConnectionRefusedError:
        return True
    except TimeoutError:  # an accept queue full of connections nobody takes
        pass
    return False


def held_server(checkpoint, folder: Path, workers: int, drain_s: float) -> LiveServer:
    srv = LiveServer(checkpoint, {"MSDNET_WORKERS": str(workers), "MSDNET_DRAIN_TIMEOUT_S": str(drain_s)})
    assert srv.cmd[2:4] == ["server.cli", "serve"]
    srv.cmd = [sys.executable, "-m", "tests.held_serve", str(folder), *srv.cmd[4:]]
    return srv


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def running(srv: LiveServer, folder: Path):
    """``srv`` started, its model steps held until ``folder/release``. The block must
    stop it: then it exits 0 and none of the processes it had started (its process
    tree, taken at the start) is left. Whatever happens, the steps are released
    before the server is left (a server held forever could not drain).

    Ready means one worker answers ``/readyz``; the block starts only once every
    worker has started its application, so that a signal finds each one draining
    (one still importing when the signal came died of it without a drain: CI saw a
    single "Shutting down") and the process tree taken here is whole."""
    with srv:
        workers = int(srv.env["MSDNET_WORKERS"])
        wait_for(lambda: srv.read_log().count("Application startup complete") >= workers,
                 f"all {workers} HTTP processes to start", timeout_s=180)
        tree = process_tree(srv.proc.pid)
        assert tree, "an engine, workers and decoding processes were expected"
        try:
            yield
            code = srv.proc.wait(120)
            assert code == 0, srv.read_log()[-3000:]
            wait_for(lambda: not any(alive(p) for p in tree), "the server's processes to end")
        finally:
            (folder / "release").touch()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_answers_every_request_read_on_keep_alive_connections(tiny_checkpoint, tmp_path, workers):
    srv = held_server(tiny_checkpoint, tmp_path, workers, drain_s=120)  # a drain time the test never reaches
    conns: list[Conn] = []

    def connect() -> Conn:  # a connection that has had one answer: kept alive
        c = Conn(srv.port)
        conns.append(c)
        c.send("GET", "/healthz")
        assert c.answer()[0] == 200
        return c

    try:
        with running(srv, tmp_path):
            busy, piped = [connect() for _ in range(3)], connect()
            for i, c in enumerate([*busy, piped]):
                c.send("POST", "/classify", png(i))
            wait_for((tmp_path / "held").exists, "a request to reach its model step")
            late, idle = connect(), connect()  # just now: uvicorn closes a keep-alive connection idle for 5 s
            piped.send("GET", "/readyz")  # pipelined behind the held request...
            wait_for(lambda: piped.delivered() and piped.unread_by_server() == 0, "the pipelined request read")
            piped.send("POST", "/classify", png(11))  # ...and one more, read or not when the signal comes
            late.send("POST", "/classify", png(12))  # on a kept-alive connection, right at the signal
            # Written before the signal means there, in the server's socket buffer, when it comes.
            wait_for(lambda: piped.delivered() and late.delivered(), "the requests to reach the server's socket")
            srv.proc.send_signal(signal.SIGTERM)
            # Each HTTP process logs this as its drain begins, after it has told its connections.
            wait_for(lambda: srv.read_log().count("Shutting down") >= workers, "every HTTP process to drain")
            # No process listens now: a new connection is refused at once (it waited unaccepted until the end).
            wait_for(lambda: refused(srv.port), "the listening socket to close")
            assert srv.proc.poll() is None  # still draining: the requests are in flight
            (tmp_path / "release").touch()

            for c in [*busy, late]:
                status, headers, body = c.answer()
                assert status == 200 and b'"exit"' in body
                assert headers["connection"] == "close"  # answered, then closed: nothing more is read
                assert c.closed_by_server()
            status, headers, _ = piped.answer()
            assert status == 200 and "connection" not in headers  # more requests follow on this one
            status, headers, body = piped.answer()
            assert status == 503 and b'"not_ready"' in body  # readiness, asked during the drain
            assert "connection" not in headers
            status, headers, body = piped.answer()
            assert status == 200 and b'"exit"' in body and headers["connection"] == "close"
            assert piped.closed_by_server()
            assert idle.closed_by_server()  # an idle connection is closed, without a reset
    finally:
        for c in conns:
            c.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_request_still_running_when_the_drain_time_is_up_gets_a_json_503(tiny_checkpoint, tmp_path, workers):
    srv = held_server(tiny_checkpoint, tmp_path, workers, drain_s=1)
    with running(srv, tmp_path):
        c = Conn(srv.port)
        c.send("POST", "/classify", png(1))
        wait_for((tmp_path / "held").exists, "the request to reach its model step")
        srv.proc.send_signal(signal.SIGTERM)
        status, headers, body = c.answer()  # held until the drain time has run out
        (tmp_path / "release").touch()
        assert status == 503 and headers["content-type"] == "application/json", (status, headers, body)
        assert headers["connection"] == "close"
        error = json.loads(body)["error"]
        assert error["code"] == "not_ready" and "drain time" in error["message"]
        assert error["drain_timeout_s"] == 1
        assert c.closed_by_server()
        c.close()


def test_a_signal_to_the_whole_process_group_still_stops_the_engine_after_the_workers(tiny_checkpoint, tmp_path):
    """Ctrl-C in a terminal or ``kill -- -PGID`` signals every process of the group at
    once; the engine, in a group of its own, hears it from the CLI after the workers:
    a request a worker reads before the signal but sends the engine only after it
    (pipelined behind a held one) is answered. The engine used to stop taking requests
    at the signal: 503 ("lost the connection to the engine process"), exit status 1."""
    srv = held_server(tiny_checkpoint, tmp_path, 2, drain_s=120)
    srv.new_session = True  # its own process group, which the test may signal whole
    with running(srv, tmp_path):
        c = Conn(srv.port)
        c.send("POST", "/classify", png(1))
        wait_for((tmp_path / "held").exists, "the request to reach its model step")
        c.send("POST", "/classify", png(2))
        wait_for(lambda: c.delivered() and c.unread_by_server() == 0, "the pipelined request read")
        os.killpg(srv.proc.pid, signal.SIGTERM)
        wait_for(lambda: srv.read_log().count("Shutting down") >= 2, "both workers to drain")
        (tmp_path / "release").touch()
        first, second = c.answer(), c.answer()
        assert first[0] == 200 and "connection" not in first[1]
        assert second[0] == 200 and second[1]["connection"] == "close", second
        assert c.closed_by_server()
        c.close()
