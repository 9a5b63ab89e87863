"""The model's input contract and the preprocessing that applies it (no torch).

In the style of torchvision's weight metadata (``weights.transforms()``): the
checkpoint says what an image must go through before the network sees it, and
the server and the offline tools apply exactly that. Pillow and numpy only, so
the server's decoder can use it without importing torch.

The contract (checkpoint field ``transforms``):

- ``channels``: 1 (grey, Pillow mode "L") or 3 ("RGB");
- ``resize_rule``: ``"exact"`` (both sides to ``resize_size``, aspect ratio not
  kept) or ``"shorter"`` (shorter side to ``resize_size``, longer side
  ``int(resize_size * long / short)``, as torchvision's ``Resize(int)``);
- ``interpolation``: Pillow filter name (``nearest``, ``bilinear``, ``bicubic``,
  ``lanczos``); Pillow's resize filters with antialiasing when shrinking, as
  torchvision does on PIL images;
- ``crop_size``: center crop to this square (torchvision's ``CenterCrop``: offset
  ``int(round((size - crop) / 2))``, zero padding when the image is smaller) or
  None;
- ``mean``, ``std``: per channel, pixel values in [0, 1]: ``(x / 255 - mean) / std``;
- ``background``: grey level (0-255) that transparent pixels are composited onto.

``image_size`` (the network's input side) and ``resize`` (the filter name) are
kept in the dict for checkpoints written before the contract existed; such a
checkpoint reads as ``exact`` resize to ``image_size``, ``resize`` filter
(bilinear), no crop, background 0: the shipped Fashion-MNIST model's behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# Bound on the resized image (before the crop): 4x the server's default pixel limit.
MAX_RESIZED_PIXELS = 1 << 26
INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                  "lanczos": Image.LANCZOS}
RESIZE_RULES = ("exact", "shorter")


@dataclass(frozen=True)
class InputContract:
    """What an image goes through before the network (see the module docstring).

    Raises:
        ValueError: from :meth:`validate` naming the first bad field.
    """

    channels: int
    resize_rule: str
    resize_size: int
    interpolation: str
    crop_size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    background: int = 0

    @classmethod
    def exact(cls, size: int, channels: int, mean, std, background: int = 0) -> InputContract:
        """A contract that resizes to ``size`` x ``size`` (bilinear), no crop."""
        return cls(channels, "exact", size, "bilinear", None, tuple(mean), tuple(std), background).validate()

    @property
    def image_size(self) -> int:
        """Side of the square the network receives, in pixels."""
        if self.crop_size is not None:
            return self.crop_size
        if self.resize_rule != "exact":
            raise ValueError("a 'shorter' resize without a center crop gives no fixed input size")
        return self.resize_size

    @property
    def mode(self) -> str:
        """Pillow mode of the contract's channels: "L" or "RGB"."""
        return "L" if self.channels == 1 else "RGB"

    def validate(self) -> InputContract:
        """Check every field; returns self.

        Raises:
            ValueError: naming the first field that is out of range.
        """
        if self.channels not in (1, 3):
            raise ValueError(f"transforms 'channels' must be 1 or 3, got {self.channels!r}")
        if self.resize_rule not in RESIZE_RULES:
            raise ValueError(f"transforms 'resize_rule' must be one of {RESIZE_RULES}, got {self.resize_rule!r}")
        if not isinstance(self.resize_size, int) or self.resize_size < 1:
            raise ValueError(f"transforms 'resize_size' must be a positive integer, got {self.resize_size!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"transforms 'interpolation' must be one of {sorted(INTERPOLATIONS)}, "
                             f"got {self.interpolation!r}")
        if self.crop_size is not None and (not isinstance(self.crop_size, int) or self.crop_size < 1):
            raise ValueError(f"transforms 'crop_size' must be a positive integer or null, got {self.crop_size!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"transforms 'mean' and 'std' need {self.channels} value(s) each")
        if any(s <= 0 for s in self.std):
            raise ValueError("transforms 'std' values must be positive")
        if not 0 <= self.background <= 255:
            raise ValueError(f"transforms 'background' must lie in [0, 255], got {self.background!r}")
        self.image_size  # noqa: B018 -- raises when the contract gives no fixed size
        return self

    @classmethod
    def from_transforms(cls, t: dict) -> InputContract:
        """Read a checkpoint's ``transforms`` dict; fields missing in an older
        checkpoint get the shipped model's behaviour (module docstring).

        Raises:
            ValueError: on a bad field; KeyError when ``channels``, ``mean`` or
            ``std`` is missing.
        """
        size = t.get("resize_size", t.get("image_size"))
        return cls(int(t["channels"]), t.get("resize_rule", "exact"), size,
                   t.get("interpolation", t.get("resize", "bilinear")), t.get("crop_size"),
                   tuple(float(m) for m in t["mean"]), tuple(float(s) for s in t["std"]),
                   int(t.get("background", 0))).validate()

    def to_transforms(self) -> dict:
        """The checkpoint's ``transforms`` dict (old keys ``image_size`` and
        ``resize`` included, so older readers still work)."""
        return {"channels": self.channels, "resize_rule": self.resize_rule, "resize_size": self.resize_size,
                "interpolation": self.interpolation, "crop_size": self.crop_size, "mean": list(self.mean),
                "std": list(self.std), "background": self.background, "image_size": self.image_size,
                "resize": self.interpolation}

    def describe(self) -> str:
        """One line for people, e.g. "RGB, shorter side to 256 (bilinear), center crop 224, mean/std ..."."""
        what = "exact size" if self.resize_rule == "exact" else "shorter side to"
        crop = f", center crop {self.crop_size}" if self.crop_size is not None else ""
        return (f"{self.mode}, {what} {self.resize_size} ({self.interpolation}){crop}, "
                f"mean {list(self.mean)}, std {list(self.std)}, transparency onto grey {self.background}")


def resized_size(width: int, height: int, rule: str, size: int) -> tuple[int, int]:
    """(width, height) after the resize rule; torchvision's ``Resize`` arithmetic
    for ``"shorter"`` (the longer side is truncated, not rounded)."""
    if rule == "exact":
        return size, size
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resized_pixels(width: int, height: int, contract: InputContract) -> int:
    """Pixels of the image after the contract's resize (before the crop): what resizing
    materialises. A thin picture under the shorter-side rule grows enormous (100000 x 1 ->
    25,600,000 x 256), so callers bound this, not only the stored size."""
    w, h = resized_size(width, height, contract.resize_rule, contract.resize_size)
    return w * h


def upright(img: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: its EXIF orientation tag (2-8) applied; a
    missing, invalid or corrupt tag leaves it as stored. Used by the server and by
    calibration/evaluation on image folders alike."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - Pillow raises many types on malformed EXIF data
        return img


def center_crop(a: np.ndarray, size: int) -> np.ndarray:
    """(H, W[, C]) -> (size, size[, C]): torchvision's ``CenterCrop`` (zero padding
    first when a side is smaller than ``size``)."""
    h, w = a.shape[:2]
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        pad = [(ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2)] + [(0, 0)] * (a.ndim - 2)
        a = np.pad(a, pad)
        h, w = a.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return a[top:top + size, left:left + size]


def to_contract_mode(img: Image.Image, contract: InputContract) -> Image.Image:
    """Any Pillow image -> mode "L" or "RGB": transparency composited onto the
    contract's background, then Pillow's ``convert``. The server's decoder has its
    own, finer rule for 16-bit and float modes (``server/images.py``: they are
    scaled there, clipped by Pillow here); for 8-bit images both agree."""
    if img.mode in ("LA", "RGBA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        g = contract.background
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (g, g, g, 255)), rgba).convert("RGB")
    return img if img.mode == contract.mode else img.convert(contract.mode)


def geometry(img: Image.Image, contract: InputContract) -> np.ndarray:
    """Resize and crop: a mode "L" or "RGB" image -> uint8 (C, image_size, image_size).

    Raises:
        ValueError: when the image's mode is not the contract's, or its resize would exceed
            ``MAX_RESIZED_PIXELS`` (:func:`resized_pixels`).
    """
    if img.mode != contract.mode:
        raise ValueError(f"image mode {img.mode!r}, the contract needs {contract.mode!r}")
    if resized_pixels(img.width, img.height, contract) > MAX_RESIZED_PIXELS:
        raise ValueError(f"a {img.width}x{img.height} image would be {resized_pixels(img.width, img.height, contract)}"
                         f" pixels after the resize rule ({contract.describe()}): aspect ratio too extreme")
    target = resized_size(img.width, img.height, contract.resize_rule, contract.resize_size)
    if img.size != target:
        img = img.resize(target, INTERPOLATIONS[contract.interpolation])
    a = np.asarray(img, dtype=np.uint8)
    if contract.crop_size is not None:
        a = center_crop(a, contract.crop_size)
    return np.ascontiguousarray(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))


def normalise(a: np.ndarray, contract: InputContract) -> np.ndarray:
    """uint8 (C, H, W) -> float32 (C, H, W): ``(x / 255 - mean) / std`` in float32."""
    x = a.astype(np.float32) / 255.0
    mean = np.asarray(contract.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(contract.std, dtype=np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def preprocess(img: Image.Image, contract: InputContract) -> np.ndarray:
    """A mode "L"/"RGB" Pillow image -> the network's input, float32
    (channels, image_size, image_size), normalised.

    Raises:
        ValueError: when the image's mode is not the contract's.
    """
    return normalise(geometry(img, contract), contract)
