"""Image decoding: every Pillow mode, bad data, and decompression bombs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from model.transforms import InputContract
from server import errors
from server.images import decode

GREY = InputContract.exact(28, 1, (0.0,), (1.0,))  # identity normalisation: values in [0, 1]
RGB = InputContract.exact(16, 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def grey_of(data: bytes) -> float:
    return float(decode(data, GREY, 10**7)[0, 14, 14])


@pytest.mark.parametrize("mode,value,expected", [
    ("L", 128, 128 / 255),
    ("1", 1, 1.0),
    ("RGB", (255, 0, 0), round(0.299 * 255) / 255),  # ITU-R 601-2 luma
    ("I;16", 65535, 1.0),
    ("I", 32896, 128 / 255),  # 16-bit range: 32896 / 257 = 128
    ("F", 0.5, 128 / 255),  # [0, 1] floats are scaled by 255
    ("CMYK", (0, 0, 0, 0), 1.0),  # no ink: white
])
def test_modes_convert_by_the_documented_rule(mode, value, expected):
    img = Image.new(mode, (28, 28), value)
    fmt = "TIFF" if mode in ("I;16", "I", "F", "CMYK") else "PNG"
    assert grey_of(encode(img, fmt)) == pytest.approx(expected, abs=1 / 255)


def test_transparency_becomes_the_model_background():
    rgba = Image.new("RGBA", (28, 28), (255, 255, 255, 0))  # fully transparent white
    assert grey_of(encode(rgba)) == 0.0
    la = Image.new("LA", (28, 28), (200, 255))  # opaque
    assert grey_of(encode(la)) == pytest.approx(200 / 255, abs=1 / 255)
    p = Image.new("P", (28, 28), 1)
    p.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    p.info["transparency"] = 1
    assert grey_of(encode(p, transparency=1)) == 0.0
    p_opaque = Image.new("P", (28, 28), 1)
    p_opaque.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    assert grey_of(encode(p_opaque)) == 1.0


def test_resize_and_rgb_output():
    img = Image.new("L", (64, 40), 255)
    out = decode(encode(img, "JPEG"), RGB, 10**7)
    assert out.shape == (3, 16, 16) and out.dtype == np.float32
    assert np.allclose(out, 1.0, atol=0.02)


def test_normalisation():
    spec = InputContract.exact(28, 1, (0.2860,), (0.3530,))
    out = decode(encode(Image.new("L", (28, 28), 0)), spec, 10**7)
    assert out[0, 0, 0] == pytest.approx(-0.2860 / 0.3530, rel=1e-5)


def test_bad_data_names_the_problem():
    with pytest.raises(errors.BadImage, match="empty image"):
        decode(b"", GREY, 10**7)
    with pytest.raises(errors.BadImage, match="not an image") as e:
        decode(b"hello, world", GREY, 10**7)
    assert "PNG" in e.value.body()["error"]["supported_formats"]
    png = encode(Image.effect_noise((28, 28), 50).convert("L"))
    with pytest.raises(errors.BadImage, match="truncated or corrupt"):
        decode(png[: len(png) // 2], GREY, 10**7)
    with pytest.raises(errors.UnsupportedMedia, match="ICO"):
        decode(encode(Image.new("RGB", (16, 16)), "ICO"), GREY, 10**7)


def test_decompression_bomb_is_refused_from_the_header():
    # A 20000 x 20000 PNG compresses to a few hundred kB; only the header is read.
    big = encode(Image.new("1", (20000, 20000), 0), optimize=True)
    assert len(big) < 2_000_000
    with pytest.raises(errors.TooLarge, match="over the pixel limit"):
        decode(big, GREY, max_pixels=4096 * 4096)
    with pytest.raises(errors.TooLarge, match="100x100 = 10000 pixels, over the pixel limit of 5000"):
        decode(encode(Image.new("L", (100, 100))), GREY, max_pixels=5000)
