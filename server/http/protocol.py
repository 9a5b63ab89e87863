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
"""

from __future__ import annotations

import json
from collections.abc import Callable

from uvicorn.protocols.http.auto import AutoHTTPProtocol


def _raw_408(seconds: float) -> bytes:
    body = json.dumps({"error": {"code": "request_timeout", "message": f"request headers not received within "
                                 f"{seconds:g} s", "timeout_s": seconds}}).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body


class TimedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's protocol (httptools when installed, else h11) plus a header timeout.

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
        super().connection_made(transport)
        if len(self._pending) >= self.max_pending:
            self._report("too_many_pending")
            transport.close()
            return
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
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
