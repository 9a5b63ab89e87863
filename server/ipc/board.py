"""The admission board: the engine's latest :class:`Admission`, shared with the HTTP workers.

A worker must refuse a request the latency objective cannot take *before* it
decodes the image (decoding is most of a worker's CPU per request), so it cannot
ask the engine over the socket first. The engine process writes its latest
admission rule into a small memory-mapped file beside its socket at every
control step; each worker maps the same file and reads it per request (a few
hundred nanoseconds, no system call). Three float64 fields; a read that races a
write may mix two consecutive rules, each of which was valid a moment ago.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

from ..engine.interface import OPEN, Admission

_LAYOUT = struct.Struct("<ddd")  # wait_s, refuse_above_s, retry_after_s


def board_path(engine_address: str) -> Path:
    """The board's file for the engine listening on ``engine_address`` (a Unix socket path)."""
    return Path(engine_address).with_suffix(".admission")


class AdmissionBoard:
    """One memory-mapped :class:`Admission` (``path``); :meth:`create` in the
    engine, :meth:`open` in a worker.

    Raises:
        OSError: the file cannot be created or opened.
    """

    def __init__(self, path: Path, writable: bool):
        self.path = path
        flags = os.O_RDWR | os.O_CREAT if writable else os.O_RDONLY
        fd = os.open(path, flags, 0o600)
        try:
            if writable:
                os.ftruncate(fd, _LAYOUT.size)
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            self._map = mmap.mmap(fd, _LAYOUT.size, access=access)
        finally:
            os.close(fd)
        if writable:
            self.write(OPEN)

    @classmethod
    def create(cls, path: Path) -> AdmissionBoard:
        return cls(path, writable=True)

    @classmethod
    def open(cls, path: Path) -> AdmissionBoard:
        return cls(path, writable=False)

    def write(self, admission: Admission) -> None:
        _LAYOUT.pack_into(self._map, 0, admission.wait_s, admission.refuse_above_s, admission.retry_after_s)

    def read(self) -> Admission:
        return Admission(*_LAYOUT.unpack_from(self._map, 0))

    def close(self) -> None:
        self._map.close()
