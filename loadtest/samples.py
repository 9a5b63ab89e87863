"""Real Fashion-MNIST test images as PNG bytes, with their labels."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from model.data import FASHION_MNIST_DIR, ImageSet, load_fashion_mnist


@dataclass(frozen=True)
class Sample:
    """One test image: its index in the test split, its label and its PNG file."""

    index: int
    label: int
    png: bytes


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
    """Shortcut: :func:`load_test_set` then :func:`to_samples`."""
    return to_samples(load_test_set(data_dir), classes, limit, seed)
