"""uvicorn's HTTP protocol with a bound on slow clients (slowloris).

uvicorn bounds the idle time between requests (``timeout_keep_alive``) but not
the time a client takes to send a request's headers: a client that opens a
connection and sends one byte a minute holds it forever. This protocol arms a
timer when a connection opens and after each response; if the request's headers
are not complete when it fires, the client gets ``408`` (JSON, the service's
error shape) and the connection is closed. At most ``max_pending`` connections
may be waiting for their headers at once; a connection beyond that is closed at
once. The body's own bound is in the HTTP middleware (``server.http.middleware``).

Both events are reported through :attr:`TimedHTTPProtocol.on_reject` (set by the
app, which counts them in ``msdnet_rejected_requests_total{reason="timeout"}``
and ``msdnet_requests_total{endpoint="other",status="408"}``).

When the process stops (uvicorn calls :meth:`TimedHTTPProtocol.shutdown` on every
connection, its listening socket already closed), no request that reached the
connection is dropped (issue 25, goal 6). uvicorn closed an idle keep-alive
connection at once, though a request could be waiting unread in its socket
buffer (sent just before the signal: the kernel then answers the client with a
reset), and closed a busy one after its current answer, dropping requests already
pipelined behind it. Here a connection goes on reading while a request is on its
way (half parsed, queued behind another, or unread in the socket buffer); once
none is, the newest request is its last: that answer says ``Connection: close``,
nothing after it is read, and an idle connection closes. Every close the server
makes is graceful (RFC 9112, 9.6): a FIN after the last answer, then what the
client still sends is read and dropped until it closes too (at most
:data:`LINGER_S`), so no reset can overtake that answer.
"""

from __future__ import annotations

import fcntl
import json
import struct
import termios
from collections.abc import Callable

from uvicorn.protocols.http.auto import AutoHTTPProtocol

LINGER_S = 2.0  # after a close, how long the client's last bytes are read and dropped (Apache lingers 2 s)


def _raw_408(seconds: float) -> bytes:
    body = json.dumps({"error": {"code": "request_timeout", "message": f"request headers not received within "
                                 f"{seconds:g} s", "timeout_s": seconds}}).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body


class _GracefulClose:
    """A connection's transport whose :meth:`close` is graceful: the FIN goes after
    what was written (``write_eof``), then reading goes on, its bytes dropped
    (:attr:`lingering`), until the client closes or :data:`LINGER_S` passes. A
    socket closed with unread bytes makes the kernel send a reset, which can
    reach the client before the last answer does. Everything else is the
    transport's own."""

    def __init__(self, transport, loop):
        self._transport, self._loop = transport, loop
        self.lingering = False
        self._timer = None

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        t = self._transport
        if self.lingering or t.is_closing():
            return
        if not t.can_write_eof():  # TLS: no half-close
            t.close()
            return
        self.lingering = True
        try:
            t.write_eof()
        except OSError:  # the peer is gone already
            t.close()
            return
        t.resume_reading()
        self._timer = self._loop.call_later(LINGER_S, t.close)

    def closed(self) -> None:
        """The connection is gone: no timer left behind."""
        if self._timer is not None:
            self._timer.cancel()


def unread_bytes(transport) -> int:
    """Bytes in the connection's socket buffer that the event loop has not read yet (0 if unknown)."""
    sock = transport.get_extra_info("socket")
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    except (AttributeError, OSError, ValueError):
        return 0


class TimedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's protocol (httptools when installed, else h11) plus a header timeout
    and a stop that drops no request (see the module docstring).

    Class attributes (set once per process with :meth:`configure`):
        header_timeout_s: seconds from connection open (or the previous response)
            to complete request headers.
        max_pending: connections allowed to wait for their headers at once.
        on_reject: called with ``"header_timeout"`` or ``"too_many_pending"``.
    """

    header_timeout_s: float = 30.0
    max_pending: int = 256
    on_reject: Callable[[str], None] | None = None
    _pending: set[TimedHTTPProtocol] = set()

    @classmethod
    def configure(cls, header_timeout_s: float, max_pending: int) -> type[TimedHTTPProtocol]:
        cls.header_timeout_s, cls.max_pending = header_timeout_s, max_pending
        return cls

    # uvicorn assigns ``self.cycle`` when a request's headers are complete (both
    # implementations): the one place that marks "headers received".
    @property
    def cycle(self):
        return self.__dict__.get("_cycle")

    @cycle.setter
    def cycle(self, value) -> None:
        self.__dict__["_cycle"] = value
        if value is not None:
            self._disarm()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._in_request = False  # a request's bytes are being parsed (begun, not complete)
        self._last = False  # stopping: the connection's last request has been read
        self._stopping = False
        super().connection_made(_GracefulClose(transport, self.loop))
        if len(self._pending) >= self.max_pending:
            self._report("too_many_pending")
            transport.close()  # at once: the point is to hold no more sockets
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering or self._last:
            return  # closing, or stopping after the last request: not read
        super().data_received(data)
        if self._stopping:
            self._settle()

    def on_message_begin(self) -> None:  # httptools' parser callbacks
        self._in_request = True
        super().on_message_begin()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_request = False

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()
            if self._stopping:
                self._settle()

    def shutdown(self) -> None:
        """uvicorn: the process is stopping (its listener is closed already)."""
        self._stopping = True
        self._settle()

    def _settle(self) -> None:
        """While stopping: read on while a request is on its way; once none is, the
        newest one is the last (``Connection: close``), and an idle connection closes."""
        if self.transport.is_closing():
            return
        cycle = self.cycle
        idle = cycle is None or cycle.response_complete
        if not self._last:
            if self._in_request or unread_bytes(self.transport) > 0:
                return  # uvicorn reads it (now, or once the request ahead is answered)
            self._last = True
            self.flow.pause_reading()
            if not idle and not cycle.response_started:
                cycle.keep_alive = False  # its answer says so, and uvicorn closes after it
                return
        if idle:
            self.transport.close()  # every request read has its answer

    def connection_lost(self, exc) -> None:
        self._disarm()
        self.transport.closed()
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and not cycle.response_complete:
            # The client left mid-request: the middleware cancels its handler, so the
            # engine runs no further block for it (server.http.middleware).
            gone = cycle.scope.get("state", {}).get("on_client_gone")
            if gone is not None:
                gone()

    def _arm(self) -> None:
        self._disarm()
        self._pending.add(self)
        self.__dict__["_timer"] = self.loop.call_later(self.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        timer = self.__dict__.pop("_timer", None)
        if timer is not None:
            timer.cancel()
        self._pending.discard(self)

    def _expired(self) -> None:
        self.__dict__.pop("_timer", None)
        self._pending.discard(self)
        if not self.transport.is_closing():
            self._report("header_timeout")
            self.transport.write(_raw_408(self.header_timeout_s))
            self.transport.close()

    def _report(self, what: str) -> None:
        hook = type(self).on_reject
        if hook is not None:
            hook(what)
