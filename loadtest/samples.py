"""Request images for benchmarks, at a checkpoint's input contract.

- The shipped 28 x 28 grey model: real Fashion-MNIST test images as PNG bytes,
  with their labels (:func:`load_samples`).
- Any checkpoint (:func:`samples_for`): the files of a folder of real images
  when one is given (``DIR/<class>/<file>`` or ``DIR/<split>/<class>/<file>``,
  labelled by the checkpoint's class names), otherwise generated images
  (:mod:`loadtest.imagegen`: photo-like JPEGs for ImageNet-size contracts,
  32 x 32 PNGs and JPEGs for CIFAR-size ones), **speed-only**: their label is
  None, so no accuracy is scored from them.

A :class:`Sample` carries the file's bytes and content type, sent as they are
(raw body) or as JSON base64 (``loadtest.capacity.make_requests``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from model.data import FASHION_MNIST_DIR, IMAGE_SUFFIXES, ImageSet, load_fashion_mnist

CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp",
                 ".gif": "image/gif", ".tif": "image/tiff", ".tiff": "image/tiff", ".webp": "image/webp",
                 ".ppm": "image/x-portable-pixmap"}


@dataclass(frozen=True)
class Sample:
    """One request image: an index (in its source), its label (None: unknown,
    speed-only), the file's bytes and their content type."""

    index: int
    label: int | None
    data: bytes
    content_type: str = "image/png"

    @property
    def png(self) -> bytes:
        """The file's bytes (the older name, from when every sample was a PNG)."""
        return self.data


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W) or (1, H, W) -> PNG bytes (grey)."""
    a = np.asarray(image, dtype=np.uint8)
    if a.ndim == 3:
        a = a[0]
    buf = io.BytesIO()
    Image.fromarray(a, mode="L").save(buf, "PNG")
    return buf.getvalue()


def load_test_set(data_dir: str | Path | None = None) -> ImageSet:
    """The Fashion-MNIST test split (10,000 images) from ``data_dir`` (default:
    Debian's /usr/share/datasets/fashion-mnist)."""
    return load_fashion_mnist(data_dir or FASHION_MNIST_DIR, "test")


def to_samples(images: ImageSet, classes: list[int] | None = None, limit: int | None = None,
               seed: int | None = 0) -> list[Sample]:
    """PNG samples of ``images``, optionally only ``classes``, shuffled with
    ``seed`` (None: test-split order), at most ``limit``."""
    labels = images.labels.numpy()
    idx = np.arange(len(labels))
    if classes is not None:
        idx = idx[np.isin(labels[idx], classes)]
    if seed is not None:
        idx = np.random.default_rng(seed).permutation(idx)
    if limit is not None:
        idx = idx[:limit]
    arr = images.images.numpy()
    return [Sample(int(i), int(labels[i]), encode_png(arr[i])) for i in idx]


def load_samples(data_dir: str | Path | None = None, classes: list[int] | None = None,
                 limit: int | None = None, seed: int | None = 0) -> list[Sample]:
    """Shortcut: :func:`load_test_set` then :func:`to_samples` (Fashion-MNIST PNGs)."""
    return to_samples(load_test_set(data_dir), classes, limit, seed)


def folder_samples(root: str | Path, classes: list[str], limit: int | None = None,
                   seed: int | None = 0) -> list[Sample]:
    """The image files under ``root/<class>/`` (or ``root/val/<class>/`` when
    ``root`` has no class folder but a ``val`` one), sent as they are; label =
    the index of the folder's name in ``classes`` (None for a folder not among them).

    Raises:
        FileNotFoundError: when no image file is found.
    """
    root = Path(root)
    if not any((root / c).is_dir() for c in classes) and (root / "val").is_dir():
        root = root / "val"
    index = {c: i for i, c in enumerate(classes)}
    files = sorted(p for p in root.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no image files under {root}/<class>/")
    order = np.arange(len(files)) if seed is None else np.random.default_rng(seed).permutation(len(files))
    order = order[:limit] if limit is not None else order
    return [Sample(int(i), index.get(files[i].parent.name), files[i].read_bytes(),
                   CONTENT_TYPES.get(files[i].suffix.lower(), "application/octet-stream")) for i in order]


def generated_samples(contract, n: int, seed: int = 0, camera_share: float = 0.01) -> list[Sample]:
    """``n`` generated images at ``contract`` (:func:`loadtest.imagegen.generate`),
    label None (speed-only)."""
    from .imagegen import generate

    return [Sample(i, None, data, ctype) for i, (data, ctype, _) in
            enumerate(generate(contract, n, seed, camera_share))]


def is_shipped_kind(contract) -> bool:
    """True for a 1-channel 28 x 28 contract (the shipped Fashion-MNIST model's kind)."""
    return contract.channels == 1 and contract.image_size == 28


def samples_for(checkpoint: str | Path, data_dir: str | Path | None = None, limit: int = 2000, seed: int = 0,
                camera_share: float = 0.01) -> tuple[list[Sample], str]:
    """Request images for ``checkpoint``: ``(samples, source)``, ``source`` a phrase
    for reports. 1-channel 28 x 28 contract: Fashion-MNIST test images (``data_dir``:
    its IDX folder; generated grey images when it is absent). Otherwise: the
    files of the folder ``data_dir`` (:func:`folder_samples`), or, without one,
    ``min(limit, 200 for photo contracts)`` generated images (speed-only).

    Raises:
        FileNotFoundError: a ``data_dir`` folder without image files.
    """
    from model.checkpoint import load

    ck = load(checkpoint)
    contract = ck.transforms
    if is_shipped_kind(contract):
        try:
            return load_samples(data_dir, limit=limit, seed=seed), "Fashion-MNIST test images (labelled)"
        except Exception:  # noqa: BLE001 - no data set on this machine: generated images
            if data_dir is not None:
                raise
    elif data_dir is not None:
        return folder_samples(data_dir, ck.classes, limit, seed), f"image files of {data_dir} (labelled)"
    from .imagegen import is_photo_contract

    n = min(limit, 200) if is_photo_contract(contract) else limit
    what = ("photo-like JPEGs, ~500x375" + (f", {camera_share:.0%} at 4000x3000" if camera_share else "")
            if is_photo_contract(contract) else f"{contract.image_size}x{contract.image_size} PNGs and JPEGs")
    return generated_samples(contract, n, seed, camera_share), f"generated {what} (speed-only: no labels)"
