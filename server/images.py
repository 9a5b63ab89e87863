"""Image decoding: bytes -> normalised array of the model's input shape.

Plain Pillow and numpy (no torch). Checks run before pixels are decoded: the
byte size by the HTTP layer, then the format and the pixel count from the header
(a decompression bomb is refused without decoding it).

Mode rule (every Pillow mode the model can meet), to the model's channels:

- transparency (``LA``, ``RGBA``, ``PA``, ``P`` with a transparent colour):
  alpha-composited onto the model's background (black for Fashion-MNIST, whose
  garments are light on black), then as below;
- ``1``: black/white to 0/255; ``P``: through its palette to RGB;
- ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: to RGB by Pillow;
- ``I;16`` (and ``I;16B``/``I;16L``): value / 257 (16-bit full range to 8-bit);
- ``I`` (32-bit integer): clipped to [0, 65535], then / 257;
- ``F`` (float): values in [0, 1] are scaled by 255, otherwise clipped to [0, 255];
- to 1 channel: ITU-R 601-2 luma (``L = 0.299 R + 0.587 G + 0.114 B``);
  to 3 channels: grey is repeated.

Then the checkpoint's input contract (``model/transforms.py``): its resize rule,
filter and center crop, and ``(x / 255 - mean) / std`` per channel; the shipped
model's is a bilinear resize to 28 x 28 (aspect ratio not kept).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from model.transforms import InputContract, preprocess

from .errors import BadImage, TooLarge, UnsupportedMedia

SUPPORTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")


@dataclass(frozen=True)
class InputSpec:
    """What the model takes (from the checkpoint's ``transforms``)."""

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    background: int = 0  # grey level transparent pixels become
    contract: InputContract | None = None  # resize, crop, normalisation (model/transforms.py)

    @classmethod
    def from_transforms(cls, t: dict) -> InputSpec:
        return cls(t["image_size"], t["channels"], tuple(t["mean"]), tuple(t["std"]), t.get("background", 0),
                   InputContract.from_transforms(t))


def _flatten_alpha(img: Image.Image, background: int) -> Image.Image:
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (background, background, background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _to_8bit(img: Image.Image, background: int) -> Image.Image:
    """Any supported mode -> "L" or "RGB" by the module's rule."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode in ("LA", "RGBA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        return _flatten_alpha(img, background)
    if mode == "1":
        return img.convert("L")
    if mode in ("P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return img.convert("RGB")
    if mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float64) / 257.0
    elif mode == "I":
        a = np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257.0
    elif mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a
        a = np.nan_to_num(np.clip(a, 0, 255))
    else:
        raise UnsupportedMedia(f"image mode {mode!r} is not supported", supported_formats=list(SUPPORTED_FORMATS))
    return Image.fromarray(np.rint(a).astype(np.uint8), mode="L")


def decode(data: bytes, spec: InputSpec, max_pixels: int) -> np.ndarray:
    """Decode one image to float32 (channels, image_size, image_size), normalised.

    Raises:
        BadImage: empty, truncated or corrupt data, or not an image at all.
        UnsupportedMedia: an image format or mode outside the supported ones.
        TooLarge: width x height over ``max_pixels`` (checked from the header,
            before any pixel is decoded).
    """
    supported = list(SUPPORTED_FORMATS)
    if not data:
        raise BadImage("empty image: the request carried no image bytes", supported_formats=supported)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooLarge(f"image is over the pixel limit of {max_pixels}: {exc}", max_pixels=max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise BadImage("not an image, or an image format that cannot be read",
                       supported_formats=supported) from exc
    except Exception as exc:  # Pillow raises many types on garbage headers
        raise BadImage(f"unreadable image header: {exc}", supported_formats=supported) from exc
    with img:
        if img.format not in SUPPORTED_FORMATS:
            raise UnsupportedMedia(f"image format {img.format} is not supported", supported_formats=supported)
        w, h = img.size
        if w * h > max_pixels:
            raise TooLarge(f"image is {w}x{h} = {w * h} pixels, over the pixel limit of {max_pixels}",
                           max_pixels=max_pixels)
        if w < 1 or h < 1:
            raise BadImage(f"image has no pixels ({w}x{h})", supported_formats=supported)
        try:
            img.load()
            img = _to_8bit(img, spec.background)
            img = img.convert("L" if spec.channels == 1 else "RGB")
            contract = spec.contract or InputContract(spec.channels, "exact", spec.image_size, "bilinear", None,
                                                      spec.mean, spec.std, spec.background)
            return preprocess(img, contract)  # the checkpoint's resize, crop and normalisation
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadImage(f"truncated or corrupt {img.format} image: {exc}", supported_formats=supported) from exc
