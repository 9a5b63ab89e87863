"""Issue 25, goal 6, the races of a stop made to happen on purpose: uvicorn with this
server's HTTP protocol (``server.http.protocol``) in a thread of the test, its event
loop held by a callback while the client writes, so bytes wait unread in the
server's socket buffer (or a connection waits in the accept queue) exactly when the
stop reaches them. uvicorn alone reset such a connection: an idle keep-alive
connection was closed with a request unread in it, a listening socket closed with
a connection queued on it. The stop is what uvicorn does: every connection's
``shutdown()`` once its listener is closed (``tests/test_stop_under_load.py``
covers the whole server and its signals).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading

import pytest
import uvicorn

from loadtest.harness import free_port
from server.http import listener
from server.http.drain import Drain
from server.http.protocol import TimedHTTPProtocol
from tests.test_server_live import wait_for
from tests.test_stop_under_load import Conn


class App:
    """Answers ``ok``; a request to ``/held`` waits until :attr:`release` is set."""

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()

    async def __call__(self, scope, receive, send):
        if scope["path"] == "/held":
            self.started.set()
            await asyncio.to_thread(self.release.wait, 60)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


class Served:
    """uvicorn serving :class:`App` from a thread; :meth:`hold` stops its event loop."""

    def __init__(self):
        self.app, self.port = App(), free_port()
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, http=TimedHTTPProtocol, lifespan="off",
                                log_level="warning", timeout_graceful_shutdown=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, "uvicorn to start", 60)
        self.loop = self.server.servers[0].get_loop()

    @contextlib.contextmanager
    def hold(self, then):
        """The event loop does nothing inside the block; on leaving it, ``then()`` runs
        on the loop before the loop reads any socket."""
        held, go = threading.Event(), threading.Event()

        def stall():
            held.set()
            go.wait(60)
            then()

        self.loop.call_soon_threadsafe(stall)
        held.wait(60)
        try:
            yield
        finally:
            go.set()

    def stop_connections(self) -> None:
        """What uvicorn's stop does to each connection once its listener is closed."""
        for connection in list(self.server.server_state.connections):
            connection.shutdown()

    def close(self) -> None:
        self.app.release.set()
        self.server.should_exit = True
        self.thread.join(60)


@pytest.fixture
def served():
    s = Served()
    yield s
    s.close()


def test_a_request_unread_on_an_idle_keep_alive_connection_at_the_stop_is_answered(served):
    c = Conn(served.port)
    c.send("GET", "/first")
    assert c.answer()[0] == 200  # kept alive, idle
    with served.hold(served.stop_connections):
        c.send("GET", "/second")
        wait_for(lambda: c.unread_by_server() > 0, "the request to wait in the server's socket buffer")
    status, headers, body = c.answer()  # uvicorn alone closed the idle connection: a reset, no answer
    assert (status, body, headers["connection"]) == (200, b"ok", "close")
    assert c.closed_by_server()
    c.close()


def test_the_last_answer_is_not_overtaken_by_a_reset(served):
    """The client writes again after the stop has chosen the connection's last
    request: those bytes are not read, and the close that follows that answer must
    not turn into a reset (a socket closed with bytes unread) that can overtake it:
    the answer comes whole, then a clean end of stream."""
    c = Conn(served.port)
    c.send("GET", "/held")
    served.app.started.wait(60)
    stopped = threading.Event()
    served.loop.call_soon_threadsafe(lambda: (served.stop_connections(), stopped.set()))
    stopped.wait(60)  # /held is the connection's last request now
    c.send("GET", "/after-the-stop")  # not read
    wait_for(c.delivered, "the bytes to reach the server's socket")
    served.app.release.set()
    status, headers, body = c.answer()
    assert (status, body, headers["connection"]) == (200, b"ok", "close")
    assert c.closed_by_server()
    c.close()


def test_uvicorn_is_told_to_stop_only_once_the_accept_queue_is_empty(monkeypatch):
    from server.http import drain as drain_module

    waiting = [2]  # connections in the accept queue, as the stop sees them
    monkeypatch.setattr(listener, "queued", lambda fds=None: waiting[0])
    monkeypatch.setattr(drain_module, "ACCEPT_WAIT_S", 600.0)  # never the reason here
    told = []

    async def main():
        drain = Drain(drain_timeout_s=30)
        drain.begin(lambda sig, frame: told.append(sig), signal.SIGTERM)
        assert drain.stopping  # not ready from the signal on
        for _ in range(3):
            await asyncio.sleep(0)
        assert not told  # connections still wait to be accepted: uvicorn keeps its listener
        waiting[0] = 0
        for _ in range(6000):  # a hang guard: 60 s
            if told:
                break
            await asyncio.sleep(0.01)
        assert told == [signal.SIGTERM]

    asyncio.run(main())


def test_the_stop_takes_in_the_accept_queue_before_the_listener_closes(served):
    """The same on a real listening socket: a connection the kernel completed while
    the event loop was held is in the queue the stop counts, and gets its answer."""

    def close_listener(sig, frame):  # as uvicorn's stop begins: the listening socket closes first
        for s in served.server.servers:
            s.close()
        served.stop_connections()
        served.server.should_exit = True

    drain = Drain(drain_timeout_s=30)
    with served.hold(lambda: drain.begin(close_listener, signal.SIGTERM)):
        c = Conn(served.port)  # completed by the kernel, not accepted: the event loop is held
        c.send("GET", "/queued")
        wait_for(lambda: listener.queued() == 1 and c.delivered(), "the connection and its request to wait")
    status, _, body = c.answer()  # closed with it still queued, the listener reset it
    assert (status, body) == (200, b"ok")
    assert c.closed_by_server()
    assert drain.stopping
    c.close()
