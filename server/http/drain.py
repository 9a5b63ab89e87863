"""What an HTTP process does from SIGTERM (or SIGINT) to its exit: nothing read is lost.

uvicorn, on the signal, closes its listening socket, asks every connection to
finish (``server.http.protocol``: a connection answers every request that reached
it, the last one with ``Connection: close``), waits for them at most
``drain_timeout_s``, cancels the requests still running, and runs the app's
lifespan shutdown. Around that, :class:`Drain` (one per app, ``app.state.drain``):

- turns the process not ready at the signal: the readiness routes (``/readyz``,
  the v2 ``ready`` routes) answer 503 from then on (the middleware checks
  :attr:`Drain.stopping`); requests already read are still served;
- lets the event loop accept the connections waiting in the listening socket's
  accept queue before uvicorn closes it (at most :data:`ACCEPT_WAIT_S`): closing
  a listening socket resets the connections queued on it, requests sent before
  the signal included, and a lagging event loop leaves some there;
- answers a request still running when the drain time is up with a JSON 503
  instead of uvicorn's plain-text 500 (``--workers 1``) or no answer at all
  (a worker of ``--workers N``, which uvicorn ends with the signal as soon as the
  lifespan is done): the middleware turns uvicorn's cancel into the 503
  (:meth:`Drain.timed_out`), and :meth:`Drain.answered` lets those answers go
  out before the lifespan stops the service.

The signal reaches this code through uvicorn's own handler, which uvicorn installs
with ``signal.signal`` before the lifespan starts; :meth:`Drain.watch_signals`
puts this one in front of it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import threading

from .. import errors
from . import listener

log = logging.getLogger("msdnet.http")

ACCEPT_WAIT_S = 1.0  # the longest the stop waits for the accept queue to empty
ANSWER_WAIT_S = 1.0  # the longest the lifespan waits for the drain time's 503s to go out
# Once the HTTP drain is over, the model's stop (its threads, or the engine process) may take this long: every
# request read has its answer by then, so nobody waits for what the model still holds.
MODEL_STOP_S = 5.0
# The most a stop takes beyond MSDNET_DRAIN_TIMEOUT_S (s): uvicorn's supervisor passes the signal on within 0.5 s
# (--workers N), a worker's server notices it within 0.1 s and waits 0.1 s before its drain; then the accept queue,
# the drain time's 503s and the model's stop above. An orchestrator's grace period must cover it.
STOP_BEYOND_DRAIN_S = 0.5 + ACCEPT_WAIT_S + 0.2 + ANSWER_WAIT_S + MODEL_STOP_S  # 7.7 s


class Drain:
    """One HTTP process's stop.

    Args:
        drain_timeout_s: the server's drain time (``settings.drain_timeout_s``), named
            in the 503 of a request it cut short.

    Attributes:
        stopping: set at the first stop signal.
        requests: the tasks of the requests being handled (kept by the middleware).
    """

    def __init__(self, drain_timeout_s: float):
        self.drain_timeout_s = drain_timeout_s
        self.stopping = False
        self.requests: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None

    def watch_signals(self) -> None:
        """Put :meth:`_on_signal` in front of the SIGTERM and SIGINT handlers (uvicorn's);
        call from the lifespan's start-up. Off the main thread (an in-process test
        client) signals are not this process's to handle: nothing changes."""
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            server_handler = signal.getsignal(sig)
            if callable(server_handler):
                signal.signal(sig, functools.partial(self._on_signal, loop, server_handler))

    def _on_signal(self, loop: asyncio.AbstractEventLoop, server_handler, sig: int, frame) -> None:
        if self.stopping:  # a second signal means what it means to uvicorn (a second Ctrl-C: stop now)
            server_handler(sig, frame)
            return
        self.stopping = True  # readiness answers 503 from now on
        loop.call_soon_threadsafe(self.begin, server_handler, sig)

    def begin(self, server_handler, sig: int = signal.SIGTERM) -> None:
        """Stop (on the event loop): not ready; the connections waiting in the accept
        queue taken in; then ``server_handler(sig, None)`` (uvicorn's: its drain begins)."""
        self.stopping = True
        log.info("%s: not ready; stopping once every request read is answered (%d in progress)",
                 signal.Signals(sig).name, len(self.requests))
        self._task = asyncio.ensure_future(self._accept_then(server_handler, sig))

    async def _accept_then(self, server_handler, sig: int) -> None:
        """Accept what waits in the accept queue (the event loop does, meanwhile), then let uvicorn stop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ACCEPT_WAIT_S
        fds = listener.listening()
        while listener.queued(fds) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        server_handler(sig, None)

    def timed_out(self) -> errors.NotReady:
        """The answer to a request still running when the drain time is up."""
        return errors.NotReady(f"the server is stopping, and the drain time ({self.drain_timeout_s:g} s) ran out "
                               "before this request was answered; retry it", drain_timeout_s=self.drain_timeout_s,
                               headers={"Connection": "close"})

    async def answered(self) -> None:
        """Wait (at most :data:`ANSWER_WAIT_S`) for the requests still being handled:
        after uvicorn's cancel at the end of the drain time they are sending their 503."""
        if self.requests:
            await asyncio.wait(set(self.requests), timeout=ANSWER_WAIT_S)


def supervisor_class():
    """uvicorn's supervisor of the HTTP workers (``--workers N``), letting go of its
    listening socket at the stop.

    The workers share the socket that the supervisor bound. uvicorn's supervisor kept
    its own descriptor until the process exited, after the workers' drain and the
    engine's stop: meanwhile the kernel went on completing new connections that no
    worker would accept, and reset them all at the end (a client waited the whole drain
    for nothing). Closed when the stop begins, the socket lives on in the workers until
    each has taken in its accept queue (:class:`Drain`); after that a new connection is
    refused at once.
    """
    from uvicorn.supervisors import Multiprocess

    class Supervisor(Multiprocess):
        def terminate_all(self) -> None:  # the stop: SIGTERM to each worker
            for sock in self.sockets:
                sock.close()
            super().terminate_all()

    return Supervisor
