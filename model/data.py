"""Datasets as uint8 tensors in memory, a seeded validation split, and batches.

Readers: Fashion-MNIST IDX files (Debian's ``dataset-fashion-mnist``), CIFAR-10/100
python batches, and an image folder (``root/<split>/<class>/*.png``). Images stay
uint8 (N, C, H, W) until a batch is drawn; :func:`batches` converts to float,
normalises, and (training only) augments with a random padded crop and a
horizontal flip.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Per-channel mean and std of the 60,000 training images, pixel values in [0, 1].
NORMALISATION = {
    "fashion-mnist": ([0.2860], [0.3530]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
}
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "folder")


class DataError(Exception):
    """A data set is missing or malformed; the message says what to do."""


@dataclass
class ImageSet:
    """Images and labels of one split.

    Attributes:
        images: uint8 (N, C, H, W).
        labels: int64 (N,).
        classes: class names, indexed by label.
    """

    images: Tensor
    labels: Tensor
    classes: list[str]

    def subset(self, index: Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.classes)

    def __len__(self) -> int:
        return len(self.labels)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated IDX file ({body.size} bytes for shape {dims})")
    return body.reshape(dims)


def load_fashion_mnist(data_dir: str | Path = FASHION_MNIST_DIR, split: str = "train") -> ImageSet:
    """Fashion-MNIST from its IDX files (``.gz`` or plain).

    Returns images uint8 (N, 1, 28, 28): N = 60,000 (train) or 10,000 (test).

    Raises:
        DataError: when the files are missing, naming where to get them.
    """
    prefix = {"train": "train", "test": "t10k"}[split]
    data_dir = Path(data_dir)
    found = {}
    for kind, suffix in (("images", "idx3-ubyte"), ("labels", "idx1-ubyte")):
        candidates = [data_dir / f"{prefix}-{kind}-{suffix}{ext}" for ext in (".gz", "")]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            raise DataError(
                f"Fashion-MNIST file {candidates[0].name} not found in {data_dir}. Install Debian's "
                f"package with 'apt-get install -y dataset-fashion-mnist' (files land in "
                f"{FASHION_MNIST_DIR}) or pass --data-dir to a folder holding the IDX files.")
        found[kind] = _read_idx(path)
    images = torch.from_numpy(found["images"].copy()).unsqueeze(1)
    labels = torch.from_numpy(found["labels"].astype(np.int64))
    return ImageSet(images, labels, list(FASHION_MNIST_CLASSES))


def load_cifar(data_dir: str | Path, which: str = "cifar10", split: str = "train") -> ImageSet:
    """CIFAR-10 or CIFAR-100 from the python batches (``data_batch_1..5`` and
    ``test_batch``, or ``train`` and ``test``, with ``batches.meta`` / ``meta``).

    Returns images uint8 (N, 3, 32, 32).

    Raises:
        DataError: when the files are missing or malformed.
    """
    data_dir = Path(data_dir)
    if which == "cifar10":
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta_name, label_key, class_key = "batches.meta", b"labels", b"label_names"
    else:
        names = ["train" if split == "train" else "test"]
        meta_name, label_key, class_key = "meta", b"fine_labels", b"fine_label_names"
    xs, ys = [], []
    try:
        for name in names:
            with open(data_dir / name, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[label_key], dtype=np.int64))
        with open(data_dir / meta_name, "rb") as f:
            classes = [c.decode() for c in pickle.load(f, encoding="bytes")[class_key]]
    except FileNotFoundError as exc:
        raise DataError(f"{which} python batch {exc.filename} not found; pass --data-dir to the "
                        f"folder of the extracted 'python version' archive") from exc
    except (KeyError, ValueError, pickle.UnpicklingError) as exc:
        raise DataError(f"{data_dir}: malformed {which} batch ({exc})") from exc
    return ImageSet(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), classes)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def folder_name(class_name: str) -> str:
    """The folder that holds a class's images: its name, with ``/`` (no folder name can
    hold one: Fashion-MNIST's "T-shirt/top") written as ``_``."""
    return class_name.replace("/", "_")


def load_folder(root: str | Path, split: str, image_size: int, channels: int, *, contract=None,
                classes: list[str] | None = None, progress: bool = False) -> ImageSet:
    """An image-folder layout: ``root/<split>/<class name>/<image file>``.

    Without ``contract``, every file is converted to ``channels`` (1: "L", 3: "RGB")
    and resized to ``image_size`` x ``image_size`` (bilinear), and the classes are
    the sorted folder names (training). With a :class:`model.transforms.InputContract`,
    image files (PNG, JPEG, ... of any size and mode) go through the contract's
    mode rule and geometry (:func:`model.transforms.geometry`, what the server
    applies); with ``classes`` (a checkpoint's names) the folders must be exactly
    those classes (:func:`folder_name`: ``/`` as ``_``) and labels index ``classes``. ``progress`` shows a tqdm bar.

    Returns uint8 images (N, C, H, W).

    Raises:
        DataError: when the split folder is missing, holds no images, holds a file
            that is no readable image (naming it), or its class folders differ from
            ``classes`` (naming the missing and extra ones).
    """
    from PIL import Image
    from tqdm import tqdm

    base = Path(root) / split
    if not base.is_dir():
        raise DataError(f"image folder {base} not found (expected {root}/{split}/<class>/<images>)")
    found = sorted(p.name for p in base.iterdir() if p.is_dir())
    folders = None if classes is None else [folder_name(c) for c in classes]
    if folders is not None and set(found) != set(folders):
        missing, extra = sorted(set(folders) - set(found)), sorted(set(found) - set(folders))
        raise DataError(f"the class folders of {base} do not match the checkpoint's {len(classes)} classes: "
                        f"missing {missing[:10]}, not in the checkpoint {extra[:10]}; name one folder per "
                        "class exactly as the checkpoint's class names, a / written as _ "
                        "(msdnet info --checkpoint FILE --json)")
    names = list(classes) if classes is not None else found
    files = [(path, label) for label, name in enumerate(folders or found) if (base / name).is_dir()
             for path in sorted((base / name).iterdir())
             if contract is None or path.suffix.lower() in IMAGE_SUFFIXES]
    from .transforms import geometry, to_contract_mode, upright

    xs, ys = [], []
    for path, label in tqdm(files, desc=f"reading {base}", unit="img", disable=not progress):
        try:
            with Image.open(path) as stored:
                img = upright(stored)  # as the server does: a phone photo's EXIF rotation applied
                if contract is not None:
                    xs.append(geometry(to_contract_mode(img, contract), contract))
                else:
                    img = img.convert("L" if channels == 1 else "RGB").resize((image_size, image_size),
                                                                               Image.BILINEAR)
                    arr = np.asarray(img, dtype=np.uint8)
                    xs.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
        except (OSError, ValueError, SyntaxError) as exc:  # Pillow: unidentified, truncated, corrupt
            raise DataError(f"{path} is not a readable image ({exc}); remove or replace it") from exc
        ys.append(label)
    if not xs:
        raise DataError(f"image folder {base} holds no images")
    return ImageSet(torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.int64), names)


def load(name: str, split: str, data_dir: str | None = None, image_size: int = 32, channels: int = 3) -> ImageSet:
    """Dispatch on a data set name in :data:`DATASETS`.

    Raises:
        DataError: on an unknown name or missing files.
    """
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir or FASHION_MNIST_DIR, split)
    if name in ("cifar10", "cifar100"):
        if data_dir is None:
            raise DataError(f"{name} needs --data-dir (the extracted python batches)")
        return load_cifar(data_dir, name, split)
    if name == "folder":
        if data_dir is None:
            raise DataError("folder data needs --data-dir")
        return load_folder(data_dir, split, image_size, channels)
    raise DataError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")


def normalisation(name: str, train: ImageSet) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) in [0, 1] units: the table above, or measured on
    the training images for an image folder."""
    if name in NORMALISATION:
        return NORMALISATION[name]
    x = train.images.float() / 255.0
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def validation_split(n: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded held-out split of ``n`` training indices: (train_idx, val_idx).

    Raises:
        ValueError: when ``size`` is not in [1, n).
    """
    if not 0 < size < n:
        raise ValueError(f"validation size must lie in [1, {n}), got {size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[size:].sort().values, perm[:size].sort().values


def normalise(images: Tensor, mean: list[float], std: list[float]) -> Tensor:
    """uint8 (N, C, H, W) -> float32 (N, C, H, W), ``(x / 255 - mean) / std``."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def augment(images: Tensor, generator: torch.Generator, pad: int) -> Tensor:
    """Random crop after zero padding by ``pad`` pixels, and a random horizontal
    flip, per image: uint8 (N, C, H, W) -> uint8 (N, C, H, W)."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip[:, None, None], cols.flip(-1), cols)
    out = padded[torch.arange(n)[:, None, None], :, rows, cols]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def batches(data: ImageSet, batch_size: int, mean: list[float], std: list[float], *,
            shuffle: bool = False, generator: torch.Generator | None = None, pad: int = 0):
    """Yield (x float32 (B, C, H, W), y int64 (B,)). With ``shuffle`` the order
    and (when ``pad`` > 0) the augmentation come from ``generator``."""
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        x = data.images[idx]
        if pad > 0:
            x = augment(x, generator, pad)
        yield normalise(x, mean, std), data.labels[idx]
