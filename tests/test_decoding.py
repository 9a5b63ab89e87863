"""Where images are decoded: a large one in the low-priority process, a small one
on Starlette's thread pool, never on the event loop (server/http/decoding.py)."""

from __future__ import annotations

import io
import os
import threading

import numpy as np
from PIL import Image

from server.http import decoding
from server.images import decode as decode_image
from tests.inprocess import ready_client


def png(w: int, h: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_large_images_decode_in_the_low_priority_process_small_ones_on_the_pool(tiny_checkpoint, monkeypatch):
    big, small = png(1100, 1000), png(28, 28)  # 1.1 million pixels (noise: far over 16 KB), 784 pixels
    assert decoding.is_large(big) and not decoding.is_large(small) and not decoding.is_large(b"x" * 20000)
    seen = []
    with ready_client(tiny_checkpoint) as c:
        service, settings = c.app.state.engine, c.app.state.settings

        def recording(data, *args):  # what runs in this process
            seen.append((len(data), threading.current_thread().name))
            return decode_image(data, *args)

        monkeypatch.setattr(decoding, "decode_image", recording)
        loop_thread = c.portal.call(lambda: threading.current_thread().name)
        decoding.last_large = None
        for body in (big, small):
            assert c.post("/classify", content=body, headers={"content-type": "image/png"}).status_code == 200
        pid, nice = decoding.last_large
        assert pid != os.getpid() and nice == decoding.LARGE_NICE
        files = [("files", ("a.png", small, "image/png")), ("files", ("b.png", big, "image/png"))]
        r = c.post("/batch", files=files)
        assert r.status_code == 200 and [x["class_id"] for x in r.json()["results"]] == [
            c.post("/classify", content=b, headers={"content-type": "image/png"}).json()["class_id"]
            for b in (small, big)]
        bad = c.post("/classify", content=big[:30000], headers={"content-type": "image/png"})  # truncated
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_image"
        same = decoding.decode(big, service.transforms, settings)
        monkeypatch.undo()
        np.testing.assert_array_equal(same, decode_image(big, service.transforms, settings.max_image_pixels))
    assert [n for n, _ in seen] == [len(small)] * 3  # the big ones never decoded in this process
    assert all(name != loop_thread for _, name in seen)
