"""Image decoding: bytes -> normalised array of the model's input shape.

Plain Pillow and numpy (no torch). Checks run before pixels are decoded: the
byte size by the HTTP layer, then the format and the pixel count from the header
(a decompression bomb is refused without decoding it).

First the EXIF orientation tag (values 2 to 8) is applied, so a photo stored
rotated is seen upright; a missing, invalid (0, 9, ...) or corrupt tag leaves the
pixels as stored. A camera JPEG with an embedded preview (MPO) is served as its
primary image.

Mode rule (every Pillow mode the model can meet), to the model's channels:

- transparency, in every form an image can carry it (``LA``, ``RGBA``, ``PA``,
  and ``L``, ``RGB``, ``P`` or ``I;16`` with a transparent colour, e.g. a PNG
  tRNS chunk): alpha-composited onto the model's background (black for
  Fashion-MNIST, whose garments are light on black), then as below;
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

JPEG draft mode (``draft=True``, the default; ``MSDNET_JPEG_DRAFT``): libjpeg
decodes a large JPEG at 1/2, 1/4 or 1/8 scale (DCT scaling), the largest
reduction that keeps it at least twice the contract's resize target and at least
256 pixels on each side, then it is resized as usual. Measured (issue 22,
generated noisy photos, max / mean difference of the network's input in 8-bit
grey levels): a 4000x3000 photo at the ImageNet contract 155 -> 46 ms CPU, 3 /
0.04; at the CIFAR contract (32x32) 184 -> 39 ms, 2 / 0.03. Keeping only twice a
32-pixel target (a 500x375 photo reduced to 125x94) differed by up to 26 grey
levels: libjpeg's scaled IDCT filters worse than Pillow's resampling, so the
reduced image must stay large. Other JPEGs and other formats decode in full.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from model.transforms import InputContract, preprocess, resized_pixels, resized_size, upright

from .errors import BadImage, TooLarge, UnsupportedMedia

SUPPORTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
# Formats Pillow may report for files of the supported ones: a camera JPEG with a
# preview image (Multi-Picture Object) is a JPEG whose first frame is the photo.
FORMAT_ALIASES = {"MPO": "JPEG"}
# Image formats Pillow cannot open, recognised from their first bytes so that they
# get 415 "unsupported format" rather than 400 "not an image".
_SIGNATURES = (
    (4, (b"ftypheic", b"ftypheix", b"ftyphevc", b"ftypheim", b"ftypheis", b"ftypmif1", b"ftypmsf1"), "HEIF/HEIC"),
    (4, (b"ftypavif", b"ftypavis"), "AVIF"),
    (0, (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n"), "JPEG XL"),
    (0, (b"<svg", b"<?xml"), "SVG"),
)


def _known_format(data: bytes) -> str | None:
    """The name of a known image format Pillow cannot read, from its magic bytes."""
    for offset, magics, name in _SIGNATURES:
        if any(data[offset: offset + len(m)] == m for m in magics):
            return name
    return None


def _flatten_alpha(img: Image.Image, background: int) -> Image.Image:
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (background, background, background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _to_8bit(img: Image.Image, background: int) -> Image.Image:
    """Any supported mode -> "L" or "RGB" by the module's rule."""
    mode = img.mode
    transparent = img.info.get("transparency")
    if mode in ("LA", "RGBA", "PA", "La", "RGBa") or (transparent is not None and mode in ("L", "RGB", "P", "1")):
        return _flatten_alpha(img, background)
    if mode in ("L", "RGB"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode in ("P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return img.convert("RGB")
    raw = np.asarray(img)
    if mode.startswith("I;16"):
        a = raw.astype(np.float64) / 257.0
    elif mode == "I":
        a = np.clip(raw.astype(np.float64), 0, 65535) / 257.0
    elif mode == "F":
        a = raw.astype(np.float64)
        a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a
        a = np.nan_to_num(np.clip(a, 0, 255))
    else:
        raise UnsupportedMedia(f"image mode {mode!r} is not supported", supported_formats=list(SUPPORTED_FORMATS))
    if transparent is not None:  # a transparent grey level (16-bit PNG tRNS): Pillow's convert ignores it
        a = np.where(raw == transparent, background, a)
    return Image.fromarray(np.rint(a).astype(np.uint8), mode="L")


DRAFT_GAP = 2  # the reduced JPEG stays at least this many times the resize target...
DRAFT_MIN_SIDE = 256  # ...and at least this many pixels on each side (module docstring)


def _draft(img: Image.Image, contract: InputContract) -> None:
    """Ask libjpeg for a reduced decode of a JPEG (see the module docstring); other formats: no-op.
    The target is the resize's in stored orientation (EXIF rotation swaps both sides alike);
    Pillow picks the scale and reduces nothing when even 1/2 would go under it."""
    if FORMAT_ALIASES.get(img.format, img.format) != "JPEG":
        return
    tw, th = resized_size(img.width, img.height, contract.resize_rule, contract.resize_size)
    img.draft(img.mode, (max(DRAFT_GAP * tw, DRAFT_MIN_SIDE), max(DRAFT_GAP * th, DRAFT_MIN_SIDE)))


def decode(data: bytes, contract: InputContract, max_pixels: int, draft: bool = True) -> np.ndarray:
    """Decode one image to float32 (channels, image_size, image_size), normalised by the
    checkpoint's input contract (:mod:`model.transforms`: resize, crop, mean/std).
    ``draft``: large JPEGs decode at a reduced scale first (module docstring).

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
        known = _known_format(data)
        if known is not None:
            raise UnsupportedMedia(f"image format {known} is not supported", supported_formats=supported) from exc
        raise BadImage("not an image, or an image format that cannot be read",
                       supported_formats=supported) from exc
    except Exception as exc:  # Pillow raises many types on garbage headers
        raise BadImage(f"unreadable image header: {exc}", supported_formats=supported) from exc
    with img:
        if FORMAT_ALIASES.get(img.format, img.format) not in SUPPORTED_FORMATS:
            raise UnsupportedMedia(f"image format {img.format} is not supported", supported_formats=supported)
        w, h = img.size
        if w * h > max_pixels:
            raise TooLarge(f"image is {w}x{h} = {w * h} pixels, over the pixel limit of {max_pixels}",
                           max_pixels=max_pixels)
        if w < 1 or h < 1:
            raise BadImage(f"image has no pixels ({w}x{h})", supported_formats=supported)
        resized = resized_pixels(w, h, contract)
        if resized > max_pixels:  # a thin picture under the shorter-side rule: 100000x1 -> 25,600,000x256
            raise TooLarge(f"image is {w}x{h}: the input's resize rule ({contract.describe()}) would make it "
                           f"{resized} pixels, over the pixel limit of {max_pixels}", max_pixels=max_pixels)
        try:
            if draft:
                _draft(img, contract)
            img.load()
            img = upright(img)
            img = _to_8bit(img, contract.background)
            img = img.convert(contract.mode)
            return preprocess(img, contract)  # the checkpoint's resize, crop and normalisation
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadImage(f"truncated or corrupt {img.format} image: {exc}", supported_formats=supported) from exc


def pixel_count(data: bytes) -> int:
    """Width x height from the image's header alone (Pillow reads no pixel data
    here); 0 when the header cannot be read (decoding then gives the error)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return int(im.size[0]) * int(im.size[1])
    except Exception:  # noqa: BLE001 - any unreadable header: decided when decoding
        return 0
