"""Where an image is decoded: never on the event loop; a large one in a low-priority process.

Every image is decoded from Starlette's thread pool (:func:`decode` is called
there). Small ones (the common case: a body under :data:`SMALL_BODY_BYTES`, or
a header saying at most :data:`LARGE_PIXELS` pixels) decode right there. A
large one (a phone photo, or a 4096x4096 picture that compresses to tens of KB)
goes to one child process per HTTP process, at a lower CPU priority (nice
:data:`LARGE_NICE`): Pillow and numpy hold the GIL for parts of such a decode
(copies of 64 MB arrays), which stalled the event loop even from a thread, and a
flood of large images now queues behind itself while the event loop,
``/healthz`` and small requests get a core first (issue 12's "no stall").
Only the encoded bytes go in and the small decoded input comes back.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from model.transforms import InputContract

from ..images import decode as decode_image
from ..images import pixel_count
from ..lifeline import follow_parent

SMALL_BODY_BYTES = 16 * 1024  # zlib's ~1000:1 bound: under this, at most ~16 MB of pixels
LARGE_PIXELS = 1 << 20
LARGE_NICE = 10

_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()
last_large: tuple[int, int] | None = None  # (pid, nice) of the last large decode: for tests and debugging


def _start_child() -> None:
    """The decoding process's start: low priority, and gone with its HTTP process."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, LARGE_NICE)
    except OSError:
        pass  # still a separate process, still off the event loop
    follow_parent(on_orphan=lambda: os._exit(0))  # holds no request of its own: nothing to drain


def _large_pool() -> ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_start_child)
        return _pool


def _decode_large(data: bytes, contract: InputContract, max_pixels: int,
                  draft: bool) -> tuple[np.ndarray, int, int]:
    return decode_image(data, contract, max_pixels, draft), os.getpid(), os.getpriority(os.PRIO_PROCESS, 0)


def is_large(data: bytes) -> bool:
    """A body that may decode to more than :data:`LARGE_PIXELS` pixels."""
    return len(data) > SMALL_BODY_BYTES and pixel_count(data) > LARGE_PIXELS


def decode(data: bytes, contract: InputContract, settings) -> np.ndarray:
    """Encoded image bytes to the model's input, float32 ``(C, H, W)`` normalised by
    ``contract`` (:func:`server.images.decode` with ``settings.max_image_pixels`` and
    ``settings.jpeg_draft``): here for a small image, in the low-priority process for
    a large one (this thread waits, using no CPU). Call it from a worker thread. The
    one place the HTTP side decodes, in one process or as one of ``--workers N``.

    Raises:
        errors.ServiceError: as :func:`server.images.decode` (bad, unsupported, too large).
    """
    global last_large
    if not is_large(data):
        return decode_image(data, contract, settings.max_image_pixels, settings.jpeg_draft)
    out, pid, nice = _large_pool().submit(_decode_large, data, contract, settings.max_image_pixels,
                                          settings.jpeg_draft).result()
    last_large = (pid, nice)
    return out


def _ready() -> int:
    return os.getpid()


def prestart() -> int:
    """Start the decoding process now and wait until it runs (its PID). Called at start-up:
    started on the first large image instead, the spawn (~1 s: a fresh interpreter importing
    numpy and Pillow) made that request miss a deadline of 150 ms (issue 22's new-user trial)."""
    return _large_pool().submit(_ready).result()


def shutdown() -> None:
    """Stop the decoding process (the app's lifespan calls this on exit), waiting for
    it (at most one decode: every request was answered before the lifespan ends). Left
    running, it outlived this process and wrote a plain-text "parent is gone" line, and
    multiprocessing's resource tracker warned of leaked semaphores."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.shutdown(wait=True, cancel_futures=True)
            _pool = None
