"""The messages between HTTP worker processes and the engine process.

They travel over one Unix stream socket per worker (asyncio streams). A message is
an 8-byte prefix (two little-endian uint32: header bytes, array bytes), a msgpack
header (a small dict) and, when images or probabilities travel, raw float32
bytes in C order whose shape the header gives: ``(N, C, H, W)`` decoded images
one way, ``(N, num_classes)`` probabilities the other. Nothing is pickled: the
array is ``ndarray.tobytes()`` and is read back with ``np.frombuffer`` (no copy).
Pure apart from :func:`read`: numpy, msgpack and an ``asyncio.StreamReader``.

Requests (header ``op``): ``hello``, ``classify`` (with the HTTP request's id,
``rid``, for feedback), ``batch``, ``budget``, ``set_target``, ``feedback``
(``request_id``, ``label``: the engine holds the answers of every worker).
Every reply carries the request's ``id`` and either the result fields or
``error`` (a :class:`server.errors.ServiceError` as a dict). One message has no
reply: ``cancel`` (header ``cancels``: the id of an earlier request on the same
connection whose client left; its images run no further block).
"""

from __future__ import annotations

import asyncio
import math
import struct

import msgpack
import numpy as np

from .. import errors
from ..engine.interface import Finished, Outcome

OPS = ("hello", "classify", "batch", "budget", "set_target", "feedback", "cancel")
PREFIX = struct.Struct("<II")  # header bytes, array bytes
MAX_HEADER_BYTES = 1 << 20     # a header is a few hundred bytes; more means the stream is corrupt
MAX_ARRAY_BYTES = 1 << 31      # decoded images are the model's input size: far below this


class WireError(ValueError):
    """A message that does not follow this module's format."""


def pack(header: dict, array: np.ndarray | None = None) -> list[bytes]:
    """The buffers of one message, to write in order (``writer.writelines``): the
    prefix, ``header`` (plus the array's shape) and, optionally, one float32 array."""
    if array is None:
        head = msgpack.packb(header)
        return [PREFIX.pack(len(head), 0), head]
    array = np.ascontiguousarray(array, dtype=np.float32)
    head = msgpack.packb({**header, "shape": list(array.shape)})
    data = array.tobytes()
    return [PREFIX.pack(len(head), len(data)), head, data]


async def read(reader: asyncio.StreamReader) -> list[memoryview]:
    """The next message's frames ``[header]`` or ``[header, array]`` (for :func:`unpack`).

    Raises:
        asyncio.IncompleteReadError: the peer closed the stream (at a message
            boundary: ``partial`` is empty).
        WireError: a prefix announcing more than the limits; the stream cannot be
            read further (close it).
    """
    n_head, n_array = PREFIX.unpack(await reader.readexactly(PREFIX.size))
    if n_head > MAX_HEADER_BYTES or n_array > MAX_ARRAY_BYTES:
        raise WireError(f"message prefix announces {n_head} + {n_array} bytes")
    body = memoryview(await reader.readexactly(n_head + n_array))  # slices below copy nothing
    return [body[:n_head], body[n_head:]] if n_array else [body]


def unpack(frames: list) -> tuple[dict, np.ndarray | None]:
    """``(header, array or None)`` from the frames (bytes-like) of one message (:func:`read`).

    Raises:
        WireError: a malformed header, or an array whose size is not its shape's.
    """
    try:
        header = msgpack.unpackb(frames[0])
    except (ValueError, msgpack.UnpackException, IndexError) as exc:
        raise WireError(f"bad header: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("header is not a map")
    if len(frames) < 2:
        return header, None
    shape = tuple(int(n) for n in header.get("shape", ()))
    if len(frames[1]) != 4 * math.prod(shape):
        raise WireError(f"array of {len(frames[1])} bytes does not hold float32 {shape}")
    return header, np.frombuffer(frames[1], dtype=np.float32).reshape(shape)


def request_id(frames: list) -> int | None:
    """The ``id`` of a message whose array is malformed (None if unreadable),
    so that the sender still gets an answer."""
    try:
        header = msgpack.unpackb(frames[0])
        return header.get("id") if isinstance(header, dict) else None
    except (ValueError, msgpack.UnpackException, IndexError):
        return None


# ---- errors ---------------------------------------------------------------------
def error_to_wire(exc: errors.ServiceError) -> dict:
    """A service error as plain data (its class name, message, details, headers)."""
    return {"type": type(exc).__name__, "message": exc.message, "details": exc.details, "headers": exc.headers}


def error_from_wire(d: dict) -> errors.ServiceError:
    """The error :func:`error_to_wire` described; an unknown type becomes a plain 500."""
    kind = getattr(errors, str(d.get("type")), errors.ServiceError)
    if not (isinstance(kind, type) and issubclass(kind, errors.ServiceError)):
        kind = errors.ServiceError
    return kind(str(d.get("message", "")), headers=dict(d.get("headers") or {}), **dict(d.get("details") or {}))


# ---- answers ----------------------------------------------------------------------
def finished_to_wire(done: list[Finished], num_classes: int) -> tuple[list, np.ndarray]:
    """``(rows, probs)``: per image ``[outcome, exit, flops, confidence, has_probs, target_flops, degraded]`` and
    the probabilities ``(N, num_classes)`` float32 (zeros where there are none)."""
    probs = np.zeros((len(done), num_classes), np.float32)
    rows = []
    for i, f in enumerate(done):
        if f.probs is not None:
            probs[i] = f.probs
        rows.append([f.outcome.value, int(f.exit), int(f.flops), None if f.confidence is None else float(f.confidence),
                     f.probs is not None, f.target_flops, f.degraded])
    return rows, probs


def finished_from_wire(rows: list, probs: np.ndarray | None) -> list[Finished]:
    """The answers :func:`finished_to_wire` described.

    Raises:
        WireError: fewer probability rows than answers.
    """
    if rows and (probs is None or len(probs) < len(rows)):
        raise WireError(f"{len(rows)} answers but {0 if probs is None else len(probs)} probability rows")
    return [Finished(Outcome(o), int(k), probs[i] if has else None, int(flops), conf, target, bool(degraded))
            for i, (o, k, flops, conf, has, target, degraded) in enumerate(rows)]
