"""The wire format between HTTP workers and the engine process (server/ipc/wire.py),
as a plain unit: exact round trips through a real asyncio stream reader, refusals
of malformed messages, no pickling."""

from __future__ import annotations

import asyncio

import msgpack
import numpy as np
import pytest

from server import errors
from server.engine.scheduler import Finished, Outcome
from server.ipc import wire


def through_stream(*messages: list[bytes], tail: bytes = b"") -> list:
    """Every message's frames as :func:`wire.read` gets them from a stream holding
    ``messages`` back to back (then ``tail`` and end of stream), then what the next read raised."""

    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(b"".join(b"".join(m) for m in messages) + tail)
        reader.feed_eof()
        got = []
        while True:
            try:
                got.append([bytes(f) for f in await wire.read(reader)])
            except (asyncio.IncompleteReadError, wire.WireError) as exc:
                return got, exc

    return asyncio.run(go())


def test_images_cross_as_raw_float32_with_their_shape():
    images = np.random.default_rng(0).normal(size=(3, 1, 28, 28)).astype(np.float32)
    msg = wire.pack({"op": "classify", "id": 7, "deadline_ms": 12.5, "started": 123.25}, images)
    assert len(msg[2]) == images.nbytes == wire.PREFIX.unpack(msg[0])[1]  # raw bytes, nothing else
    (frames, hello), end = through_stream(msg, wire.pack({"op": "hello"}))
    header, back = wire.unpack(frames)
    assert header == {"op": "classify", "id": 7, "deadline_ms": 12.5, "started": 123.25, "shape": [3, 1, 28, 28]}
    assert back.dtype == np.float32 and np.array_equal(back, images)
    assert wire.unpack(hello) == ({"op": "hello"}, None)
    assert isinstance(end, asyncio.IncompleteReadError) and end.partial == b""  # a clean end between messages


def test_malformed_messages_are_refused():
    with pytest.raises(wire.WireError, match="bad header"):
        wire.unpack([b"\xc1"])  # msgpack's never-used byte
    with pytest.raises(wire.WireError, match="not a map"):
        wire.unpack([msgpack.packb([1, 2])])
    with pytest.raises(wire.WireError, match="does not hold float32"):
        wire.unpack([msgpack.packb({"shape": [2, 3]}), b"\0" * 20])
    assert wire.request_id([msgpack.packb({"id": 9, "shape": [2, 3]}), b"\0" * 20]) == 9
    assert wire.request_id([b"\xc1"]) is None
    # A prefix announcing more than the limits: the stream cannot be trusted further.
    got, exc = through_stream(wire.pack({"op": "hello"}), tail=wire.PREFIX.pack(wire.MAX_HEADER_BYTES + 1, 0))
    assert len(got) == 1 and isinstance(exc, wire.WireError) and "announces" in str(exc)
    # A message cut short (the peer died mid-write) is an incomplete read, not a message.
    got, exc = through_stream(tail=wire.PREFIX.pack(4, 8) + b"abc")
    assert got == [] and isinstance(exc, asyncio.IncompleteReadError) and exc.partial == b"abc"


def test_errors_keep_their_class_status_details_and_headers():
    exc = errors.Overloaded("queue full", headers={"Retry-After": "2"}, retry_after_s=1.5)
    back = wire.error_from_wire(msgpack.unpackb(msgpack.packb(wire.error_to_wire(exc))))
    assert type(back) is errors.Overloaded and back.status == 503 and back.headers == {"Retry-After": "2"}
    assert back.body() == {"error": {"code": "overloaded", "message": "queue full", "retry_after_s": 1.5}}
    for name in ("NotAServiceError", "ValueError", "Path"):  # only ServiceError subclasses are rebuilt
        odd = wire.error_from_wire({"type": name, "message": "m"})
        assert type(odd) is errors.ServiceError and odd.status == 500


def test_answers_round_trip_with_and_without_probabilities():
    p = np.array([0.1, 0.7, 0.2], np.float32)
    done = [Finished(Outcome.CONFIDENT, 2, p, 1000, 0.7), Finished(Outcome.EXPIRED, 0, None, 0, None),
            Finished(Outcome.NON_FINITE, 1, np.full(3, np.nan, np.float32), 400, float("nan"))]
    rows, probs = wire.finished_to_wire(done, 3)
    [frames], _ = through_stream(wire.pack({"results": rows}, probs))
    header, arr = wire.unpack(frames)
    back = wire.finished_from_wire(header["results"], arr)
    assert [(f.outcome, f.exit, f.flops) for f in back] == [(Outcome.CONFIDENT, 2, 1000), (Outcome.EXPIRED, 0, 0),
                                                           (Outcome.NON_FINITE, 1, 400)]
    assert np.array_equal(back[0].probs, p) and back[0].confidence == pytest.approx(0.7)
    assert back[1].probs is None and back[1].confidence is None
    assert np.isnan(back[2].probs).all() and np.isnan(back[2].confidence)
    with pytest.raises(wire.WireError):
        wire.finished_from_wire(header["results"], None)
