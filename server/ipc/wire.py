"""The messages between HTTP worker processes and the engine process.

One message is a list of ZeroMQ frames: a msgpack header (a small dict) and, when
images or probabilities travel, one frame of raw float32 bytes in C order whose
shape the header gives: ``(N, C, H, W)`` decoded images one way, ``(N, num_classes)``
probabilities the other. Nothing is pickled: a frame is ``ndarray.tobytes()`` and
is read back with ``np.frombuffer`` (no copy). Pure: numpy and msgpack only.

Requests (header ``op``): ``hello``, ``classify``, ``batch``, ``budget``,
``set_target``. Every reply carries the request's ``id`` and either the result
fields or ``error`` (a :class:`server.errors.ServiceError` as a dict).
"""

from __future__ import annotations

import math

import msgpack
import numpy as np

from .. import errors
from ..engine.scheduler import Finished, Outcome

OPS = ("hello", "classify", "batch", "budget", "set_target")


class WireError(ValueError):
    """A message that does not follow this module's format."""


def pack(header: dict, array: np.ndarray | None = None) -> list[bytes]:
    """Frames for ``header`` and, optionally, one float32 array (shape goes in the header)."""
    if array is None:
        return [msgpack.packb(header)]
    array = np.ascontiguousarray(array, dtype=np.float32)
    return [msgpack.packb({**header, "shape": list(array.shape)}), array.tobytes()]


def unpack(frames: list) -> tuple[dict, np.ndarray | None]:
    """``(header, array or None)`` from :func:`pack`'s frames (``bytes`` or ``zmq.Frame``).

    Raises:
        WireError: a malformed header, or an array frame whose size is not its shape's.
    """
    try:
        header = msgpack.unpackb(bytes(frames[0]))
    except (ValueError, msgpack.UnpackException, IndexError) as exc:
        raise WireError(f"bad header: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("header is not a map")
    if len(frames) < 2:
        return header, None
    shape = tuple(int(n) for n in header.get("shape", ()))
    buf = frames[1].buffer if hasattr(frames[1], "buffer") else frames[1]
    if len(buf) != 4 * math.prod(shape):
        raise WireError(f"array frame of {len(buf)} bytes does not hold float32 {shape}")
    return header, np.frombuffer(buf, dtype=np.float32).reshape(shape)


def request_id(frames: list) -> int | None:
    """The ``id`` of a message whose array frame is malformed (None if unreadable),
    so that the sender still gets an answer."""
    try:
        header = msgpack.unpackb(bytes(frames[0]))
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
    """``(rows, probs)``: per image ``[outcome, exit, flops, confidence, has_probs]`` and
    the probabilities ``(N, num_classes)`` float32 (zeros where there are none)."""
    probs = np.zeros((len(done), num_classes), np.float32)
    rows = []
    for i, f in enumerate(done):
        if f.probs is not None:
            probs[i] = f.probs
        rows.append([f.outcome.value, int(f.exit), int(f.flops), None if f.confidence is None else float(f.confidence),
                     f.probs is not None])
    return rows, probs


def finished_from_wire(rows: list, probs: np.ndarray | None) -> list[Finished]:
    """The answers :func:`finished_to_wire` described.

    Raises:
        WireError: fewer probability rows than answers.
    """
    if rows and (probs is None or len(probs) < len(rows)):
        raise WireError(f"{len(rows)} answers but {0 if probs is None else len(probs)} probability rows")
    return [Finished(Outcome(o), int(k), probs[i] if has else None, int(flops), conf)
            for i, (o, k, flops, conf, has) in enumerate(rows)]
