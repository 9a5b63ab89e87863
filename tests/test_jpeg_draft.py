"""JPEG draft mode (issue 22): a large JPEG decodes at a reduced scale (keeping twice the
resize target and 256 pixels a side) first; the tensor stays within a few grey levels of the full decode;
smaller JPEGs and other formats are decoded exactly as before."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from model.official import OFFICIAL_TRANSFORMS
from model.transforms import preprocess
from server.images import decode

IMAGENET = OFFICIAL_TRANSFORMS["ImageNet"]
STD = np.asarray(IMAGENET.std, dtype=np.float32).reshape(3, 1, 1)


def photo(w: int, h: int, fmt: str = "JPEG", exif_orientation: int | None = None) -> bytes:
    """A smooth photo-like picture (gradients and a disc) with a little noise."""
    rng = np.random.default_rng(w * h)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 128 + 100 * np.sin(x / w * 6.0) * np.cos(y / h * 4.0)
    g = 255 * x / w
    b = np.where((x - w / 2) ** 2 + (y - h / 2) ** 2 < (h / 3) ** 2, 220.0, 40.0)
    a = np.stack([r, g, b], -1) + rng.normal(0, 6, (h, w, 3))
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(buf, fmt, quality=90, exif=exif)
    else:
        img.save(buf, fmt, quality=90) if fmt == "JPEG" else img.save(buf, fmt)
    return buf.getvalue()


def grey_levels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| of two normalised tensors, in 8-bit grey levels."""
    return np.abs(a - b) * STD * 255


def test_a_large_jpeg_decodes_in_draft_mode_within_a_few_grey_levels():
    data = photo(2048, 1536)  # at least 4 x (341, 256): libjpeg decodes at 1/2 (1024x768), keeping >= 2 x the target
    drafted, full = decode(data, IMAGENET, 1 << 24), decode(data, IMAGENET, 1 << 24, draft=False)
    assert drafted.shape == full.shape == (3, 224, 224)
    # it is the draft decode, not the full one: equal to Pillow's reduced decode + the same preprocessing
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (682, 512))
        assert img.size == (1024, 768)
        by_hand = preprocess(img.convert("RGB"), IMAGENET)
    np.testing.assert_array_equal(drafted, by_hand)
    diff = grey_levels(drafted, full)
    assert diff.max() > 0  # not the full decode
    assert diff.max() <= 8 and diff.mean() <= 1.0, (diff.max(), diff.mean())


@pytest.mark.parametrize("size,fmt", [((600, 450), "JPEG"), ((1300, 1000), "JPEG"), ((2048, 1536), "PNG")])
def test_small_jpegs_and_other_formats_decode_in_full(size, fmt):
    data = photo(*size, fmt=fmt)  # 600x450: under four times the target (1364x1024), no reduction
    np.testing.assert_array_equal(decode(data, IMAGENET, 1 << 24), decode(data, IMAGENET, 1 << 24, draft=False))


def test_draft_mode_keeps_the_exif_orientation():
    data = photo(2048, 1536, exif_orientation=6)  # stored landscape, shown portrait (rotated 90 degrees)
    drafted, full = decode(data, IMAGENET, 1 << 24), decode(data, IMAGENET, 1 << 24, draft=False)
    diff = grey_levels(drafted, full)
    assert diff.mean() <= 1.0
    with Image.open(io.BytesIO(data)) as img:
        upright = preprocess(ImageOps.exif_transpose(img).convert("RGB"), IMAGENET)
    np.testing.assert_array_equal(full, upright)


def test_a_small_contract_keeps_256_pixels():
    """At 32x32 (CIFAR) a 500x375 photo decodes in full (1/2 would give 250x188 < 256: libjpeg's
    1/4 gave up to 26 grey levels); a camera photo still decodes at 1/8 (500x375)."""
    cifar = OFFICIAL_TRANSFORMS["cifar100"]
    std = np.asarray(cifar.std, dtype=np.float32).reshape(3, 1, 1)
    small = photo(500, 375)
    np.testing.assert_array_equal(decode(small, cifar, 1 << 24), decode(small, cifar, 1 << 24, draft=False))
    data = photo(4000, 3000)
    drafted, full = decode(data, cifar, 1 << 25), decode(data, cifar, 1 << 25, draft=False)
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (256, 256))
        assert img.size == (500, 375)
        np.testing.assert_array_equal(drafted, preprocess(img.convert("RGB"), cifar))
    diff = np.abs(drafted - full) * std * 255
    assert 0 < diff.max() <= 8 and diff.mean() <= 0.5, (diff.max(), diff.mean())
