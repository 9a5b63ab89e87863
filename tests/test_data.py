"""Data readers on small generated files; the seeded validation split."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from model import data as D
from tests.conftest import write_idx


def test_fashion_mnist_idx_gz_and_plain(tmp_path, fashion_dir):
    train = D.load_fashion_mnist(fashion_dir, "train")
    assert train.images.shape == (400, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.shape == (400,) and train.classes[9] == "Ankle boot"
    plain = tmp_path / "plain"
    plain.mkdir()
    write_idx(plain / "t10k-images-idx3-ubyte", np.full((3, 28, 28), 7), gz=False)
    write_idx(plain / "t10k-labels-idx1-ubyte", np.array([1, 2, 3]), gz=False)
    test = D.load_fashion_mnist(plain, "test")
    assert test.labels.tolist() == [1, 2, 3] and int(test.images[0, 0, 5, 5]) == 7


def test_missing_fashion_mnist_says_where_to_get_it(tmp_path):
    with pytest.raises(D.DataError, match="apt-get install -y dataset-fashion-mnist.*--data-dir"):
        D.load_fashion_mnist(tmp_path, "train")


def test_truncated_idx_is_a_clear_error(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28)), gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3), gz=False)
    with pytest.raises(D.DataError, match="truncated"):
        D.load_fashion_mnist(tmp_path, "test")


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_cifar_python_batches(tmp_path, which):
    rng = np.random.default_rng(0)
    label_key = b"labels" if which == "cifar10" else b"fine_labels"
    names = [f"data_batch_{i}" for i in range(1, 6)] if which == "cifar10" else ["train"]
    for name in names + (["test_batch"] if which == "cifar10" else ["test"]):
        batch = {b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), label_key: [0, 1, 2, 3]}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    meta = {b"label_names": [b"a", b"b", b"c", b"d"]} if which == "cifar10" else {b"fine_label_names": [b"x"] * 100}
    (tmp_path / ("batches.meta" if which == "cifar10" else "meta")).write_bytes(pickle.dumps(meta))
    train = D.load(which, "train", str(tmp_path))
    assert train.images.shape == ((20 if which == "cifar10" else 4), 3, 32, 32)
    assert train.labels.tolist()[:4] == [0, 1, 2, 3]
    assert len(train.classes) == (4 if which == "cifar10" else 100)
    with pytest.raises(D.DataError, match="--data-dir"):
        D.load(which, "train", str(tmp_path / "nope"))


def test_image_folder(tmp_path):
    for split in ("train", "test"):
        for name, colour in (("cat", (200, 10, 10)), ("dog", (10, 10, 200))):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 30), colour).save(tmp_path / split / name / f"{i}.png")
    train = D.load("folder", "train", str(tmp_path), image_size=16, channels=3)
    assert train.images.shape == (6, 3, 16, 16) and train.classes == ["cat", "dog"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert int(train.images[0, 0, 8, 8]) == 200 and int(train.images[3, 2, 8, 8]) == 200
    mean, std = D.normalisation("folder", train)
    assert len(mean) == 3 and all(s > 0 for s in std)
    with pytest.raises(D.DataError, match="not found"):
        D.load("folder", "val", str(tmp_path), image_size=16, channels=3)


def test_validation_split_is_seeded_and_disjoint():
    tr, va = D.validation_split(60000, 5000, seed=0)
    tr2, va2 = D.validation_split(60000, 5000, seed=0)
    _, va3 = D.validation_split(60000, 5000, seed=1)
    assert len(va) == 5000 and len(tr) == 55000
    assert torch.equal(va, va2) and not torch.equal(va, va3)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0


def test_augment_crops_and_flips_within_bounds():
    x = torch.arange(28 * 28, dtype=torch.int64).view(1, 1, 28, 28).repeat(64, 1, 1, 1).to(torch.uint8)
    g = torch.Generator().manual_seed(0)
    y = D.augment(x, g, pad=2)
    assert y.shape == x.shape
    assert not torch.equal(y, x)  # some crop or flip happened
    flipped = D.augment(x, torch.Generator().manual_seed(0), pad=0)
    assert all(torch.equal(f, x[0]) or torch.equal(f, x[0].flip(-1)) for f in flipped)
