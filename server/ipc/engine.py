"""The engine process: one per replica, it owns the model, the scheduler and the
budget controller (a :class:`server.engine.service.Service`), and answers the HTTP
worker processes over a Unix stream socket, one connection per worker
(asyncio streams, ``server.ipc.wire`` messages).

Workers send images already decoded (float32 ``(N, C, H, W)``), so this process
does no HTTP, JSON or image decoding: its event loop only unpacks frames, submits
to the model thread and packs answers. Started by ``msdnet serve --workers N``
(``server.cli``) with :func:`run` as a ``multiprocessing`` spawn target.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading

from .. import errors
from ..engine.service import Service
from ..lifeline import follow_parent
from ..settings import Settings
from . import wire
from .board import AdmissionBoard, board_path

log = logging.getLogger("msdnet.engine")


class EngineServer:
    """Answers :mod:`server.ipc.wire` requests with a :class:`Service`.

    Args:
        service: the replica's service (started by the caller).
        address: path of the Unix socket to listen on, e.g. ``/tmp/msdnet-x/engine.sock``.

    Call :meth:`start` (listens), then :meth:`serve`.
    """

    def __init__(self, service: Service, address: str):
        self.service = service
        self.address = address
        self._server: asyncio.AbstractServer | None = None
        self._readers: set[asyncio.Task] = set()       # one per worker connection
        self._tasks: set[asyncio.Task] = set()         # one per request being answered
        self._by_id: dict[tuple[int, int], asyncio.Task] = {}  # (connection, request id): for ``cancel``
        self._writers: set[asyncio.StreamWriter] = set()

    def hello(self) -> dict:
        """What a worker needs to decode images and shape answers."""
        s = self.service
        return {"ready": s.ready, "classes": list(s.classes), "exit_flops": [int(f) for f in s.exit_flops],
                "transforms": s.transforms.to_transforms(), "target_flops": float(s.keeper.target),
                "objective": s.objective is not None}

    async def handle(self, header: dict, images) -> tuple[dict, object]:
        """One request's reply ``(header, array or None)``; a :class:`ServiceError` becomes an ``error`` reply."""
        s, op = self.service, header.get("op")
        try:
            if op == "hello":
                return self.hello(), None
            if op == "classify":
                done = await s.classify(list(images), header.get("deadline_ms"), header["started"], header.get("rid"))
                rows, probs = wire.finished_to_wire(done, len(s.classes))
                return {"results": rows}, probs
            if op == "batch":
                bad = {int(i): wire.error_from_wire(e) for i, e in header.get("errors", {}).items()}
                good = iter(images if images is not None else ())
                items = [bad[i] if i in bad else next(good) for i in range(header["n"])]
                out = await s.batch(items, header.get("flops_budget"), header["started"])
                served = [r for r in out.results if not isinstance(r, errors.ServiceError)]
                rows, probs = wire.finished_to_wire(served, len(s.classes))
                return {"results": rows, "errors": {str(i): wire.error_to_wire(r) for i, r in enumerate(out.results)
                                                    if isinstance(r, errors.ServiceError)},
                        "flops_used": out.flops_used, "flops_budget": out.flops_budget,
                        "exit_counts": out.exit_counts}, probs
            if op == "budget":
                report = await s.budget()
                v = report.view
                return {"view": {**v.__dict__, "thresholds": list(v.thresholds)}, "mode": report.mode,
                        "fleet_realised_flops": report.fleet_realised_flops,
                        "objective": report.objective.__dict__ if report.objective else None}, None
            if op == "set_target":
                try:
                    await s.set_target(float(header["target_flops"]))
                except ValueError as exc:
                    raise errors.InvalidParameter(str(exc), field="target_flops") from None
                return {}, None
            if op == "feedback":
                out = await s.feedback(str(header["request_id"]), int(header["label"]))
                return {"labelled": out.__dict__}, None
            raise errors.BadRequest(f"unknown engine operation {op!r}")
        except errors.ServiceError as exc:
            return {"error": wire.error_to_wire(exc)}, None
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the engine
            log.error("engine request %s failed: %s", op, type(exc).__name__, exc_info=exc)
            return {"error": wire.error_to_wire(errors.ServiceError(f"engine error ({type(exc).__name__})"))}, None

    async def start(self) -> None:
        """Listen on the socket (workers may connect once this returns)."""
        self._server = await asyncio.start_unix_server(self._connection, path=self.address)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read one worker's requests until it disconnects; each is answered in its own task."""
        self._readers.add(asyncio.current_task())
        self._writers.add(writer)
        try:
            while True:
                frames = await wire.read(reader)
                if len(frames) == 1 and self._cancel(writer, frames):  # a cancel carries no array
                    continue
                task = asyncio.ensure_future(self._answer(writer, frames))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):  # the worker is gone
            self._writers.discard(writer)
            writer.close()
        except wire.WireError as exc:  # the stream is out of step: drop this worker's connection
            log.error("malformed message, closing the connection: %s", exc)
            self._writers.discard(writer)
            writer.close()
        finally:  # cancelled at shutdown: the writer stays open for the answers in flight
            self._readers.discard(asyncio.current_task())

    def _cancel(self, writer: asyncio.StreamWriter, frames: list) -> bool:
        """Handle a ``cancel`` message (True), else leave ``frames`` alone (False):
        the named request's task is cancelled, and with it its images' futures."""
        try:
            header, _ = wire.unpack(frames)
        except wire.WireError:
            return False
        if header.get("op") != "cancel":
            return False
        task = self._by_id.get((id(writer), header.get("cancels")))
        if task is not None:
            task.cancel()
        return True

    async def _answer(self, writer: asyncio.StreamWriter, frames: list) -> None:
        try:
            header, images = wire.unpack(frames)
        except wire.WireError as exc:
            log.error("malformed message: %s", exc)
            rid = wire.request_id(frames)
            if rid is not None and not writer.is_closing():  # answer it: the worker's request must not hang
                err = wire.error_to_wire(errors.ServiceError(f"engine could not read the request: {exc}"))
                writer.writelines(wire.pack({"id": rid, "error": err}))
            return
        key = (id(writer), header.get("id"))
        self._by_id[key] = asyncio.current_task()
        try:
            reply, array = await self.handle(header, images)
        except asyncio.CancelledError:  # the worker's client left (``cancel``): nobody waits for a reply
            return
        finally:
            self._by_id.pop(key, None)
        if not writer.is_closing():  # a worker that left gets nothing
            writer.writelines(wire.pack({"id": header.get("id"), **reply}, array))

    async def serve(self, stop: asyncio.Event) -> None:
        """Answer requests until ``stop`` is set; requests in flight then finish first
        (within the drain timeout), new ones are no longer read."""
        if self._server is None:
            await self.start()
        try:
            await stop.wait()
            self._server.close()
            for task in list(self._readers):
                task.cancel()
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=self.service.settings.drain_timeout_s)
        finally:
            self._server.close()
            for writer in self._writers:
                writer.close()


def _loop_factory():
    """uvloop's loop when installed (as uvicorn picks for the workers), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(settings: Settings, address: str, ready: threading.Event | None = None) -> None:
    """The engine process's main: load, warm up, then serve ``address`` until SIGTERM/SIGINT.

    ``ready`` (a ``multiprocessing.Event``) is set once the model is warm and the
    socket is bound; the CLI starts the HTTP workers after that.

    Raises:
        model.checkpoint.CheckpointError: the checkpoint cannot be served.
    """
    import sys

    from model.checkpoint import CheckpointError, load

    from .. import logs

    logs.configure(settings.log_level)
    follow_parent(grace_s=settings.drain_timeout_s + 5)  # the CLI killed (SIGKILL): stop, do not serve on as an orphan
    try:
        checkpoint = load(settings.checkpoint, calibrated=True)
        checkpoint.check_target(settings.target_flops)
    except CheckpointError as exc:  # one line and status 2, as `msdnet serve` gives in one process
        print(f"msdnet serve: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    service = Service(checkpoint, settings)
    if service.objective is not None:  # the workers refuse before decoding from what this board says
        service.on_admission = AdmissionBoard.create(board_path(address)).write
    service.start()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        while not service.ready:  # warm-up runs on the model thread
            await asyncio.sleep(0.05)
        # Everything loaded so far (torch, the model, ~176,000 objects) lives for good: out of the
        # cyclic GC's sight, a full collection no longer pauses this process for ~55 ms.
        gc.collect()
        gc.freeze()
        server = EngineServer(service, address)
        await server.start()  # listening before the workers are told to connect
        if ready is not None:
            ready.set()
        log.info("engine serving %s on %s: %d exits, target %.0f FLOPs per request", settings.checkpoint,
                 address, service.num_exits, service.keeper.target)
        await server.serve(stop)

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(main())
    finally:
        service.stop(settings.drain_timeout_s)
