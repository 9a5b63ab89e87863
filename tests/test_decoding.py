"""Which thread decodes: large images on the one low-priority thread, small ones
on Starlette's pool, never on the event loop (server/http/decoding.py)."""

from __future__ import annotations

import io
import os
import threading

import numpy as np
from PIL import Image

from server.http import decoding
from tests.inprocess import ready_client


def png(w: int, h: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_large_images_decode_on_the_low_priority_thread_small_ones_on_the_pool(tiny_checkpoint):
    big, small = png(1100, 1000), png(28, 28)  # 1.1 million pixels (noise: far over 16 KB), 784 pixels
    assert decoding.is_large(big) and not decoding.is_large(small) and not decoding.is_large(b"x" * 20000)
    seen = []
    with ready_client(tiny_checkpoint) as c:
        service = c.app.state.service
        original = service.decode

        def recording(data):
            seen.append((len(data), threading.current_thread().name,
                         os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
            return original(data)

        service.decode = recording
        loop_thread = c.portal.call(lambda: threading.current_thread().name)
        for body in (big, small):
            assert c.post("/classify", content=body, headers={"content-type": "image/png"}).status_code == 200
        files = [("files", ("a.png", small, "image/png")), ("files", ("b.png", big, "image/png"))]
        r = c.post("/batch", files=files)
        assert r.status_code == 200 and all("class_id" in x for x in r.json()["results"])
    where = {(n, name.startswith(decoding.THREAD_NAME), nice) for n, name, nice in seen}
    assert where == {(len(big), True, decoding.LARGE_NICE), (len(small), False, 0)}, seen
    assert len(seen) == 4 and all(name != loop_thread for _, name, _ in seen)
