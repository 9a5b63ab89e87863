"""Inputs a real-size server meets (issue 22's new-user trial): a thin picture whose resize would
be enormous is refused before it is decoded; calibration reads a phone photo upright, as the
server does; the large-image decoding process is running before the first large image."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from model.data import load_folder
from model.official import OFFICIAL_TRANSFORMS
from model.transforms import MAX_RESIZED_PIXELS, geometry, normalise
from server.errors import TooLarge
from server.images import decode

IMAGENET = OFFICIAL_TRANSFORMS["ImageNet"]


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size", [(100_000, 1), (1, 100_000), (16_384, 4)])
def test_a_thin_picture_is_refused_before_its_resize(size):
    data = _png(*size)  # a few hundred bytes; shorter side to 256 would make 25,600,000 x 256 pixels
    assert len(data) < 16 * 1024
    with pytest.raises(TooLarge, match="resize rule") as err:
        decode(data, IMAGENET, 4096 * 4096)
    assert err.value.details["max_pixels"] == 4096 * 4096
    with pytest.raises(ValueError, match="aspect ratio too extreme"):  # calibration's path too
        geometry(Image.new("RGB", size), IMAGENET)
    assert 4096 * 4096 < MAX_RESIZED_PIXELS


def test_a_wide_but_sane_picture_is_served():
    x = decode(_png(4000, 600), IMAGENET, 4096 * 4096)  # 1706x256 after the resize
    assert x.shape == (3, 224, 224)


def test_calibration_reads_exif_rotated_photos_as_the_server_does(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated by 90 degrees
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif)
    (tmp_path / "val" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a" / "phone.jpg").write_bytes(buf.getvalue())
    loaded = load_folder(tmp_path, "val", 224, 3, contract=IMAGENET, classes=["a"], progress=False)
    served = decode(buf.getvalue(), IMAGENET, 4096 * 4096)
    np.testing.assert_allclose(normalise(loaded.images[0].numpy(), IMAGENET), served, rtol=0, atol=1e-6)


def test_the_decoding_process_runs_before_the_first_large_image(tiny_checkpoint):
    from server.http import decoding
    from tests.inprocess import ready_client

    with ready_client(tiny_checkpoint):
        pool = decoding._large_pool()
        assert pool._processes, "no decoding process at start"  # started by the lifespan, not by a request
        (pid,) = pool._processes
        assert decoding.prestart() == pid  # the same process serves the first large image
