"""The engine as an HTTP worker process sees it.

:class:`EngineClient` implements :class:`server.engine.interface.Engine`, as the
in-process :class:`server.engine.service.Service` does, so ``server.http`` serves
the same routes in one process or as one of ``--workers N``. Images are decoded
by the worker (``server.http.decoding``) and cross to the engine process as raw
float32 arrays (``server.ipc.wire``). No torch is imported in a worker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import numpy as np

from model.transforms import InputContract

from .. import errors
from ..engine.interface import (
    OPEN,
    BatchOutcome,
    BudgetReport,
    BudgetView,
    Finished,
    Labelled,
    ObjectiveView,
    check_admission,
)
from ..logs import request_id as current_request_id
from ..metrics import Metrics
from ..settings import Settings
from . import wire
from .board import AdmissionBoard, board_path

log = logging.getLogger("msdnet.client")


class EngineClient:
    """One worker's connection to its replica's engine process (a Unix stream socket).

    Args:
        address: path of the engine's socket (``MSDNET_ENGINE_ADDRESS``).
        settings: this worker's settings (the same environment as the engine's).

    Use from one event loop: :meth:`connect` first, :meth:`close` last.

    A hung engine (alive, not answering) must not hang the worker's requests or
    keep it "ready": when nothing has come back for :attr:`HEARTBEAT_S` seconds the
    client sends a ``hello``; unanswered after :attr:`STALL_S` seconds, the worker
    turns not ready (``/readyz`` 503, so a load balancer routes elsewhere) until
    any answer arrives again. Each request also waits a bounded time
    (``deadline_ms`` + :attr:`DEADLINE_GRACE_S`, else ``settings.engine_timeout_s``).
    """

    HEARTBEAT_S = 1.0
    STALL_S = 3.0
    DEADLINE_GRACE_S = 1.0

    def __init__(self, address: str, settings: Settings):
        self.address = address
        self.settings = settings
        self.metrics: Metrics | None = None
        self.classes: list[str] = []
        self.exit_flops: list[int] = []
        self.transforms: InputContract | None = None
        self.target_flops = 0.0
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._receiver: asyncio.Task | None = None
        self._heartbeat_task: asyncio.Task | None = None
        self._ready = False
        self._last_reply = time.monotonic()
        self._stalled_since: float | None = None
        self._lost: str | None = None
        self._board: AdmissionBoard | None = None  # the engine's admission rule (latency objective set)

    @property
    def num_exits(self) -> int:
        return len(self.exit_flops)

    @property
    def ready(self) -> bool:
        """Connected, the engine answered (it answers only once warm) and it still answers."""
        return self._ready and self._stalled_since is None

    @property
    def not_ready_reason(self) -> str:
        """Why :attr:`ready` is False, for the 503's message."""
        if self._lost:
            return self._lost
        if self._stalled_since is not None:
            silent = time.monotonic() - self._stalled_since + self.STALL_S
            return f"the engine process has not answered for {silent:.0f} s"
        return "model is loading or warming up"

    async def connect(self, timeout_s: float) -> None:
        """Connect and fetch the model's metadata.

        Raises:
            TimeoutError: the engine did not answer within ``timeout_s`` seconds.
        """
        reader, self._writer = await asyncio.wait_for(asyncio.open_unix_connection(self.address), timeout_s)
        self._receiver = asyncio.ensure_future(self._receive(reader))
        meta, _ = await asyncio.wait_for(self._call({"op": "hello"}), timeout_s)
        self.classes = list(meta["classes"])
        self.exit_flops = [int(f) for f in meta["exit_flops"]]
        self.transforms = InputContract.from_transforms(meta["transforms"])
        self.target_flops = float(meta["target_flops"])
        self.metrics = Metrics(self.num_exits, self.exit_flops)
        self._ready = bool(meta["ready"])
        if meta.get("objective"):
            self._board = AdmissionBoard.open(board_path(self.address))
        self._heartbeat_task = asyncio.ensure_future(self._heartbeat())

    async def _heartbeat(self) -> None:
        while self._lost is None:
            await asyncio.sleep(self.HEARTBEAT_S)
            if time.monotonic() - self._last_reply < self.HEARTBEAT_S:
                continue  # answers are flowing: the engine is alive
            try:
                await self._call({"op": "hello"}, timeout_s=self.STALL_S)
            except errors.NotReady:
                if self._lost is None and self._stalled_since is None:
                    self._stalled_since = time.monotonic()
                    log.error("the engine process has not answered for %.0f s: not ready", self.STALL_S)

    async def close(self) -> None:
        """Stop receiving; requests still waiting get 503."""
        for task in (self._receiver, self._heartbeat_task):
            if task is not None:
                task.cancel()
        self._fail_pending("the engine process stopped")
        if self._writer is not None:
            self._writer.close()
        board, self._board = self._board, None
        if board is not None:
            board.close()

    def _fail_pending(self, why: str) -> None:
        self._ready = False
        self._lost = why
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(errors.NotReady(why))
        self._pending.clear()

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                header, array = wire.unpack(await wire.read(reader))
                self._last_reply = time.monotonic()
                if self._stalled_since is not None:
                    log.warning("the engine process answers again: ready")
                    self._stalled_since = None
                fut = self._pending.pop(header.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result((header, array))
        except (asyncio.IncompleteReadError, ConnectionError, wire.WireError) as exc:
            # The engine is gone (the CLI stops this worker next) or the stream is out of
            # step: either way no answer can come, so the waiting requests get 503 now.
            log.error("lost the engine connection: %s", exc)
            self._fail_pending("lost the connection to the engine process")

    async def _call(self, header: dict, array: np.ndarray | None = None, timeout_s: float | None = None,
                    on_timeout: errors.ServiceError | None = None) -> tuple[dict, np.ndarray | None]:
        """Send one request and wait for its reply, at most ``timeout_s`` seconds
        (default ``settings.engine_timeout_s``).

        Raises:
            errors.ServiceError: the one the engine answered with; ``on_timeout``
                (default :class:`errors.NotReady`, 503) when no answer came in time.
        """
        if self._writer is None or self._writer.is_closing() or (self._receiver and self._receiver.done()):
            raise errors.NotReady(self._lost or "no connection to the engine process")
        timeout_s = self.settings.engine_timeout_s if timeout_s is None else timeout_s
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            # No drain(): the engine's queue bound (503) limits what is in flight.
            self._writer.writelines(wire.pack({**header, "id": rid}, array))
            try:
                reply, out = await asyncio.wait_for(fut, max(timeout_s, 0.0))
            except TimeoutError:
                raise on_timeout or errors.NotReady(
                    f"the engine process did not answer within {timeout_s:.1f} s") from None
            except asyncio.CancelledError:  # the client left: the engine runs no further block for it
                if not self._writer.is_closing():
                    self._writer.writelines(wire.pack({"op": "cancel", "cancels": rid}))
                raise
        finally:
            self._pending.pop(rid, None)
        if "error" in reply:
            raise wire.error_from_wire(reply["error"])
        return reply, out

    # ---- the Service surface the HTTP layer uses -------------------------------------
    def admit(self, deadline_ms: float | None, started: float) -> None:
        """As :meth:`server.engine.service.Service.admit`, from the engine's admission board.

        Raises:
            errors.DeadlineExceeded: (504) its deadline passed or cannot be met at the forecast wait.
            errors.Saturated: (503, Retry-After) the latency objective refuses it.
        """
        check_admission(self._board.read() if self._board is not None else OPEN, deadline_ms, started, self.metrics)

    async def classify(self, images: list[np.ndarray], deadline_ms: float | None, started: float) -> list[Finished]:
        """As :meth:`server.engine.service.Service.classify`, run by the engine process
        (``started`` is ``time.monotonic()``: one clock for all processes on a host)."""
        timeout_s, late = None, None
        if deadline_ms is not None:  # the engine answers well within it; a hung one must not hold the request
            timeout_s = started + deadline_ms / 1e3 + self.DEADLINE_GRACE_S - time.monotonic()
            late = errors.DeadlineExceeded(f"the engine process did not answer within the deadline of "
                                           f"{deadline_ms:g} ms", deadline_ms=deadline_ms)
        rid = current_request_id.get()  # the engine keeps the answer for POST /feedback to any worker
        reply, probs = await self._call({"op": "classify", "deadline_ms": deadline_ms, "started": started,
                                         "rid": None if rid == "-" else rid}, np.stack(images), timeout_s, late)
        return wire.finished_from_wire(reply["results"], probs)

    async def batch(self, items: list[np.ndarray | errors.ServiceError], flops_budget: float | None,
                    started: float) -> BatchOutcome:
        """As :meth:`server.engine.service.Service.batch`, run by the engine process."""
        good = [x for x in items if not isinstance(x, errors.ServiceError)]
        bad = {str(i): wire.error_to_wire(x) for i, x in enumerate(items) if isinstance(x, errors.ServiceError)}
        reply, probs = await self._call({"op": "batch", "n": len(items), "errors": bad, "flops_budget": flops_budget,
                                         "started": started}, np.stack(good) if good else None)
        served = iter(wire.finished_from_wire(reply["results"], probs))
        failed = {int(i): wire.error_from_wire(e) for i, e in reply["errors"].items()}
        results = [failed[i] if i in failed else next(served) for i in range(len(items))]
        return BatchOutcome(results, int(reply["flops_used"]), float(reply["flops_budget"]),
                            dict(reply["exit_counts"]))

    async def budget(self) -> BudgetReport:
        reply, _ = await self._call({"op": "budget"})
        v, o = reply["view"], reply.get("objective")
        return BudgetReport(BudgetView(**{**v, "thresholds": tuple(v["thresholds"])}), reply["mode"],
                            reply["fleet_realised_flops"], ObjectiveView(**o) if o else None)

    async def feedback(self, request_id: str, label: int) -> Labelled:
        """As :meth:`server.engine.service.Service.feedback`, by the engine process (it holds every worker's answers).

        Raises:
            errors.UnknownRequest: (404) no answer of that id is held.
            errors.AlreadyLabelled: (409) it was labelled already.
        """
        reply, _ = await self._call({"op": "feedback", "request_id": request_id, "label": int(label)})
        return Labelled(**reply["labelled"])

    async def set_target(self, target: float) -> None:
        """Raises: ValueError: outside [exit 1's cost, last exit's cost] (as the service's)."""
        try:
            await self._call({"op": "set_target", "target_flops": float(target)})
        except errors.InvalidParameter as exc:
            raise ValueError(exc.message) from None
