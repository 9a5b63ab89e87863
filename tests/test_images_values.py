"""Decoding checked pixel by pixel on non-uniform, non-square images and
out-of-range values of modes I and F (expected values computed here)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from model.transforms import InputContract
from server.images import decode


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_three_channels_keep_rows_columns_and_channel_order():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # (H, W, C), no resize needed
    spec = InputContract.exact(8, 3, (0.1, 0.2, 0.3), (0.5, 0.25, 2.0))
    out = decode(encode(Image.fromarray(arr, "RGB")), spec, 10**6)
    mean = np.array([0.1, 0.2, 0.3])[:, None, None]
    std = np.array([0.5, 0.25, 2.0])[:, None, None]
    expected = (arr.transpose(2, 0, 1) / 255.0 - mean) / std  # out[c, row, column]
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_a_non_square_image_is_resized_bilinearly_without_a_transpose():
    w, h = 12, 5
    ramp = np.tile(np.linspace(0, 255, w), (h, 1)).astype(np.uint8)  # brighter to the right
    rgb = np.stack([ramp, 255 - ramp, np.full_like(ramp, 40)], axis=2)
    spec = InputContract.exact(6, 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    out = decode(encode(Image.fromarray(rgb, "RGB")), spec, 10**6)
    ref = np.asarray(Image.fromarray(rgb, "RGB").resize((6, 6), Image.BILINEAR), dtype=np.float64) / 255
    np.testing.assert_allclose(out, ref.transpose(2, 0, 1), atol=1e-6)
    assert out[0, 0, 0] < out[0, 0, -1] and out[1, 0, 0] > out[1, 0, -1]  # columns run left to right
    np.testing.assert_allclose(out[2], 40 / 255, atol=1e-6)


def test_colour_to_grey_is_the_601_luma_per_pixel():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    out = decode(encode(Image.fromarray(arr, "RGB")), InputContract.exact(6, 1, (0.0,), (1.0,)), 10**6)
    a = arr.astype(np.int64)
    luma = (a[..., 0] * 299 + a[..., 1] * 587 + a[..., 2] * 114) / 1000
    np.testing.assert_allclose(out[0] * 255, luma, atol=0.51)


GREY4 = InputContract.exact(4, 1, (0.0,), (1.0,))


def test_mode_i_is_clipped_to_16_bits_then_scaled():
    values = np.array([[-5, 0, 70000, 65535],
                       [257 * 100, 257, 2**31 - 1, -(2**31)],
                       [514, 1000, 30000, 65536],
                       [0, 0, 0, 0]], dtype=np.int32)
    out = decode(encode(Image.fromarray(values, "I"), "TIFF"), GREY4, 10**6)[0]
    expected = np.rint(np.clip(values.astype(np.float64), 0, 65535) / 257) / 255
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_mode_f_outside_0_1_is_clipped_and_inside_is_scaled():
    big = np.array([[-3.0, 0.0, 300.0, 127.6],
                    [255.0, 1e9, -1e9, 2.0],
                    [0.5, 1.5, 254.4, 100.0],
                    [np.nan, 10.0, 20.0, 30.0]], dtype=np.float32)
    out = decode(encode(Image.fromarray(big, "F"), "TIFF"), GREY4, 10**6)[0]
    expected = np.rint(np.nan_to_num(np.clip(big.astype(np.float64), 0, 255))) / 255
    np.testing.assert_allclose(out, expected, atol=1e-6)
    unit = np.array([[0.0, 0.25, 0.5, 1.0]] * 4, dtype=np.float32)  # all in [0, 1]: scaled by 255
    out = decode(encode(Image.fromarray(unit, "F"), "TIFF"), GREY4, 10**6)[0]
    np.testing.assert_allclose(out, np.rint(unit * 255) / 255, atol=1e-6)


@pytest.mark.parametrize("value,expected", [(65535, 255), (257 * 3, 3), (128, 0)])
def test_mode_i16_is_divided_by_257(value, expected):
    img = Image.new("I;16", (4, 4), value)
    assert decode(encode(img, "TIFF"), GREY4, 10**6)[0, 1, 2] * 255 == pytest.approx(expected, abs=1e-4)
