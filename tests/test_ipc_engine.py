"""The engine's socket server and the workers' client (server/ipc/engine.py,
server/ipc/client.py) over a real Unix socket, with a stand-in service whose
``classify`` the test holds and releases: bad messages are answered or cut off
without touching other requests, a lost engine fails waiting requests at once
(503), a hung one (alive, silent) turns the worker not ready and bounds every
request, and a stopping engine answers what it holds first."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import numpy as np
import pytest

from model.transforms import InputContract
from server import errors
from server.engine.scheduler import Finished, Outcome
from server.ipc import wire
from server.ipc.client import EngineClient
from server.ipc.engine import EngineServer
from server.settings import Settings


class HeldService:
    """What EngineServer uses of a Service; ``classify`` answers exit 1 with the
    image's mean as confidence once ``release`` is set."""

    def __init__(self):
        self.ready = True
        self.classes = ["a", "b"]
        self.exit_flops = [100, 300]
        self.transforms = InputContract.exact(4, 1, (0.5,), (0.25,))
        self.keeper = SimpleNamespace(target=200.0)
        self.settings = SimpleNamespace(drain_timeout_s=5.0)
        self.release = asyncio.Event()
        self.calls = 0
        self.cancelled = 0
        self.objective = None
        self.request_ids: list[str | None] = []

    async def classify(self, images, deadline_ms, started, request_id=None):
        self.calls += 1
        self.request_ids.append(request_id)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return [Finished(Outcome.CONFIDENT, 1, np.array([0.25, 0.75], np.float32), 100, float(x.mean()))
                for x in images]


def image(v: float) -> np.ndarray:
    return np.full((1, 4, 4), v, np.float32)


async def started_engine(tmp_path):
    service = HeldService()
    server = EngineServer(service, str(tmp_path / "engine.sock"))
    await server.start()
    stop = asyncio.Event()
    serving = asyncio.ensure_future(server.serve(stop))
    client = EngineClient(server.address, Settings(checkpoint="unused.pt"))
    await client.connect(timeout_s=5.0)
    return service, server, stop, serving, client


async def raw_call(address: str, *messages: list[bytes]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(address)
    for m in messages:
        writer.writelines(m)
    return reader, writer


async def until(cond, timeout_s: float = 5.0) -> None:
    """Wait (bounded) until ``cond()``: the engine got the requests the test sent."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "the engine did not get the requests"
        await asyncio.sleep(0.01)


def test_answers_come_back_to_the_request_that_asked(tmp_path):
    async def go():
        service, server, stop, serving, client = await started_engine(tmp_path)
        assert client.ready and client.classes == ["a", "b"] and client.exit_flops == [100, 300]
        assert client.transforms == service.transforms and client.target_flops == 200.0
        calls = [asyncio.ensure_future(client.classify([image(v)], None, time.monotonic())) for v in (0.1, 0.2, 0.3)]
        await until(lambda: service.calls == 3)
        assert not any(c.done() for c in calls)  # held in the service, nothing answered early
        service.release.set()
        got = [(await asyncio.wait_for(c, 5.0))[0] for c in calls]
        assert [f.confidence for f in got] == pytest.approx([0.1, 0.2, 0.3])
        assert all(f.exit == 1 and f.flops == 100 and f.probs.tolist() == [0.25, 0.75] for f in got)
        stop.set()
        await asyncio.wait_for(serving, 5.0)
        await client.close()

    asyncio.run(go())


def test_a_request_whose_client_left_is_cancelled_in_the_engine_and_the_others_are_answered(tmp_path):
    async def go():
        service, server, stop, serving, client = await started_engine(tmp_path)
        gone, stays = (asyncio.ensure_future(client.classify([image(v)], None, time.monotonic())) for v in (0.1, 0.2))
        await until(lambda: service.calls == 2)
        gone.cancel()  # what the HTTP layer does when the client closes its connection
        await until(lambda: service.cancelled == 1)
        service.release.set()
        (f,) = await asyncio.wait_for(stays, 5.0)
        assert f.confidence == pytest.approx(0.2) and service.cancelled == 1 and gone.cancelled()
        stop.set()
        await asyncio.wait_for(serving, 5.0)
        await client.close()

    asyncio.run(go())


def test_a_bad_message_is_answered_or_cut_off_and_touches_no_other_request(tmp_path):
    async def go():
        service, server, stop, serving, client = await started_engine(tmp_path)
        service.release.set()
        address = client.address
        # An array that does not fit its shape: answered with an error for its id, the connection stays.
        bad = wire.pack({"op": "classify", "id": 41, "started": 0.0}, np.zeros((1, 1, 4, 4), np.float32))
        bad[0] = wire.PREFIX.pack(len(bad[1]), 60)
        bad[2] = bad[2][:60]
        reader, writer = await raw_call(address, bad, wire.pack({"op": "hello", "id": 42}))
        first, second = [wire.unpack(await asyncio.wait_for(wire.read(reader), 5.0))[0] for _ in range(2)]
        assert first["id"] == 41 and first["error"]["type"] == "ServiceError"
        assert "could not read the request" in first["error"]["message"]
        assert second["id"] == 42 and second["classes"] == ["a", "b"]
        # A prefix beyond the limits: that connection is closed, the engine and other workers go on.
        writer.write(wire.PREFIX.pack(wire.MAX_HEADER_BYTES + 1, 0))
        assert await asyncio.wait_for(reader.read(), 5.0) == b""  # closed by the engine
        writer.close()
        [f] = await asyncio.wait_for(client.classify([image(0.5)], None, time.monotonic()), 5.0)
        assert f.confidence == pytest.approx(0.5)
        stop.set()
        await asyncio.wait_for(serving, 5.0)
        await client.close()

    asyncio.run(go())


def test_a_lost_engine_fails_waiting_requests_at_once_with_503(tmp_path):
    async def go():
        service, server, stop, serving, client = await started_engine(tmp_path)
        waiting = asyncio.ensure_future(client.classify([image(0.5)], None, time.monotonic()))
        await until(lambda: service.calls == 1)
        for w in list(server._writers):
            w.close()  # the engine's side of the connection goes away, as when the process dies
        with pytest.raises(errors.NotReady) as got:
            await asyncio.wait_for(waiting, 5.0)
        assert got.value.status == 503 and not client.ready
        assert client.not_ready_reason == "lost the connection to the engine process"
        with pytest.raises(errors.NotReady, match="lost the connection"):  # later requests: refused, not queued
            await client.classify([image(0.5)], None, time.monotonic())
        service.release.set()
        stop.set()
        await asyncio.wait_for(serving, 5.0)
        await client.close()

    asyncio.run(go())


def test_a_stopping_engine_answers_what_it_holds_then_reads_nothing_new(tmp_path):
    async def go():
        service, server, stop, serving, client = await started_engine(tmp_path)
        held = asyncio.ensure_future(client.classify([image(0.25)], None, time.monotonic()))
        await until(lambda: service.calls == 1)
        stop.set()
        await asyncio.sleep(0.05)
        assert not serving.done()  # draining: the held request is still owed an answer
        service.release.set()
        [f] = await asyncio.wait_for(held, 5.0)
        assert f.confidence == pytest.approx(0.25)
        await asyncio.wait_for(serving, 5.0)
        with pytest.raises(errors.NotReady):  # the engine has closed this worker's connection
            await asyncio.wait_for(client.classify([image(0.5)], None, time.monotonic()), 5.0)
        assert service.calls == 1
        await client.close()

    asyncio.run(go())


def test_a_hung_engine_turns_the_worker_not_ready_and_bounds_its_requests(tmp_path, monkeypatch):
    monkeypatch.setattr(EngineClient, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(EngineClient, "STALL_S", 0.2)
    monkeypatch.setattr(EngineClient, "DEADLINE_GRACE_S", 0.1)

    async def go():
        service = HeldService()
        path = str(tmp_path / "hung.sock")
        writers = []

        async def engine(reader, writer):  # answers the first hello, then is silent (a stopped process)
            writers.append(writer)
            header, _ = wire.unpack(await wire.read(reader))
            writer.writelines(wire.pack({"id": header["id"], **EngineServer(service, path).hello()}))
            while True:
                await wire.read(reader)

        server = await asyncio.start_unix_server(engine, path=path)
        client = EngineClient(path, Settings(checkpoint="unused.pt", engine_timeout_s=0.3))
        await client.connect(timeout_s=5.0)
        assert client.ready
        t0 = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded, match="did not answer within the deadline of 50 ms"):
            await asyncio.wait_for(client.classify([image(0.5)], 50.0, time.monotonic()), 5.0)
        assert 0.14 <= time.monotonic() - t0 < 2.0  # deadline 50 ms + grace 0.1 s, not forever
        with pytest.raises(errors.NotReady, match="did not answer within 0.3 s") as got:
            await asyncio.wait_for(client.classify([image(0.5)], None, time.monotonic()), 5.0)
        assert got.value.status == 503
        await until(lambda: not client.ready)
        assert client.not_ready_reason.startswith("the engine process has not answered for")
        # It answers again: ready again.
        writers[0].writelines(wire.pack({"id": -1}))
        await until(lambda: client.ready)
        await client.close()
        server.close()

    asyncio.run(go())
