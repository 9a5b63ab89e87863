"""Which thread decodes an image: never the event loop; a large one a low-priority thread.

Every image is decoded on Starlette's thread pool (:func:`decode` is called
there). Small ones (the common case: a body under :data:`SMALL_BODY_BYTES`, or
a header saying at most :data:`LARGE_PIXELS` pixels) decode right there. A
large one (a phone photo, or a 4096x4096 picture that compresses to tens of KB)
is handed to one thread per process whose CPU priority is lowered (nice
:data:`LARGE_NICE`): a flood of large images then queues behind itself, while
the event loop, ``/healthz`` and small requests still get a core first (issue
12's "no stall": before, two clients sending /batch requests of 4096x4096
pictures kept both cores busy and ``/healthz`` p99 was 143 ms).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ..images import pixel_count

SMALL_BODY_BYTES = 16 * 1024  # zlib's ~1000:1 bound: under this, at most ~16 MB of pixels
LARGE_PIXELS = 1 << 20
LARGE_NICE = 10
THREAD_NAME = "msdnet-decode-large"

T = TypeVar("T")
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _lower_priority() -> None:
    try:  # Linux: a thread id as PRIO_PROCESS sets that thread's nice value
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LARGE_NICE)
    except (OSError, AttributeError):
        pass  # elsewhere: still one thread, still off the event loop


def _large_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME, initializer=_lower_priority)
        return _pool


def is_large(data: bytes) -> bool:
    """A body that may decode to more than :data:`LARGE_PIXELS` pixels."""
    return len(data) > SMALL_BODY_BYTES and pixel_count(data) > LARGE_PIXELS


def decode(fn: Callable[[bytes], T], data: bytes) -> T:
    """``fn(data)``; called on a worker thread. A large image is handed to the
    low-priority thread and this one waits (it uses no CPU meanwhile)."""
    if is_large(data):
        return _large_pool().submit(fn, data).result()
    return fn(data)
