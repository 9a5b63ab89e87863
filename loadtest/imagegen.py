"""Generated images for benchmarks at a checkpoint's input contract (speed-only: no labels).

No real photos ship with the project, so the real-size benchmarks make their own:

- **photo-like JPEGs** (ImageNet-size contracts): smooth colour gradients, a few
  filled shapes, a mild blur and Gaussian sensor noise, saved at JPEG quality 90
  (4:2:0 chroma, as cameras and phones write them). Sizes are drawn around
  500 x 375 on average (ImageNet's validation images are about 500 x 400), in
  4:3, 3:4, 3:2 and 1:1 shapes; a share ``camera_share`` (default 1%) are
  camera-sized 4000 x 3000.
- **small RGB images** (CIFAR-size contracts): 32 x 32 of the same kind, as PNG
  and, for a share, JPEG.
- **grey 28 x 28 PNGs** for a 1-channel contract when no Fashion-MNIST is at hand.

The pixel content only has to cost what a photo costs to decode (JPEG entropy
decoding grows with detail, which noise and edges supply); labels are unknown,
so answers from these images say nothing about accuracy.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PHOTO_MEAN_SIZE = (500, 375)
CAMERA_SIZE = (4000, 3000)
JPEG_QUALITY = 90
_SHAPES = ((4, 3), (3, 4), (3, 2), (1, 1))


def photo_like(rng: np.random.Generator, width: int, height: int, channels: int = 3) -> Image.Image:
    """A synthetic photo of ``width`` x ``height`` pixels: an RGB (or "L" for
    ``channels`` 1) Pillow image with gradients, shapes, blur and noise.

    Raises:
        ValueError: when a side is below 1 or ``channels`` is not 1 or 3.
    """
    if width < 1 or height < 1 or channels not in (1, 3):
        raise ValueError(f"bad size {width}x{height} or channels {channels}")
    # Smooth gradient: a 3x3 grid of random colours, upsampled bicubically.
    grid = rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)
    img = Image.fromarray(grid, "RGB").resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, x1 = sorted(rng.integers(-width // 4, width + width // 4, 2).tolist())
        y0, y1 = sorted(rng.integers(-height // 4, height + height // 4, 2).tolist())
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)), fill=colour)
        else:
            draw.rectangle((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)), fill=colour)
    radius = max(0.5, min(width, height) / 300)
    img = img.filter(ImageFilter.GaussianBlur(radius))
    a = np.asarray(img, dtype=np.int16)
    noise = rng.normal(0.0, 10.0, (height, width, 1)) + rng.normal(0.0, 4.0, (height, width, 3))
    noise = noise.astype(np.int16)  # sensor noise, mostly in luminance
    a = np.clip(a + noise, 0, 255).astype(np.uint8)
    out = Image.fromarray(a, "RGB")
    return out if channels == 3 else out.convert("L")


def photo_size(rng: np.random.Generator, camera_share: float = 0.01) -> tuple[int, int]:
    """(width, height) of one generated photo: :data:`CAMERA_SIZE` with probability
    ``camera_share``, else a shape from 4:3, 3:4, 3:2, 1:1 with an area near
    500 x 375 (log-normal, sigma 0.15)."""
    if rng.random() < camera_share:
        return CAMERA_SIZE
    aw, ah = _SHAPES[int(rng.integers(len(_SHAPES)))]
    area = PHOTO_MEAN_SIZE[0] * PHOTO_MEAN_SIZE[1] * float(np.exp(rng.normal(0.0, 0.15)))
    h = int(round((area * ah / aw) ** 0.5))
    return max(1, int(round(h * aw / ah))), max(1, h)


def encode(img: Image.Image, fmt: str, quality: int = JPEG_QUALITY) -> tuple[bytes, str]:
    """``img`` as file bytes and their content type: ``fmt`` "jpeg" (``quality``,
    4:2:0 subsampling, not progressive) or "png".

    Raises:
        ValueError: for another format.
    """
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, "JPEG", quality=quality, subsampling=2)
        return buf.getvalue(), "image/jpeg"
    if fmt == "png":
        img.save(buf, "PNG")
        return buf.getvalue(), "image/png"
    raise ValueError(f"format must be 'jpeg' or 'png', not {fmt!r}")


def is_photo_contract(contract) -> bool:
    """True for a contract that takes photo-sized inputs (an ImageNet-style
    network: input side over 64 pixels), False for CIFAR- or MNIST-size ones."""
    return contract.image_size > 64


def generate(contract, n: int, seed: int = 0, camera_share: float = 0.01,
             jpeg_share: float = 0.5) -> list[tuple[bytes, str, tuple[int, int]]]:
    """``n`` generated image files for ``contract`` (a :class:`model.transforms.InputContract`):
    ``[(bytes, content type, (width, height))]``.

    Photo contracts (:func:`is_photo_contract`): JPEGs of :func:`photo_size`
    (``camera_share`` of them 4000 x 3000). Small contracts: images of the
    contract's side and channels, a share ``jpeg_share`` JPEG, the rest PNG.

    Raises:
        ValueError: on ``n`` < 0 or shares outside [0, 1].
    """
    if n < 0 or not 0 <= camera_share <= 1 or not 0 <= jpeg_share <= 1:
        raise ValueError(f"bad n {n}, camera_share {camera_share} or jpeg_share {jpeg_share}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if is_photo_contract(contract):
            w, h = photo_size(rng, camera_share)
            data, ctype = encode(photo_like(rng, w, h, contract.channels), "jpeg")
        else:
            w = h = contract.image_size
            fmt = "jpeg" if rng.random() < jpeg_share else "png"
            data, ctype = encode(photo_like(rng, w, h, contract.channels), fmt)
        out.append((data, ctype, (w, h)))
    return out
