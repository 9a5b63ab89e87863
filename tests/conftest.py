"""Shared fixtures: tiny configs and generated data files (no real training)."""

from __future__ import annotations

import gzip
import os
import secrets
import struct

import numpy as np
import pytest
import torch

from model.config import MSDNetConfig
from tests import leftovers

TINY = dict(n_blocks=3, base=1, step=1, step_mode="even", n_channels=4, growth_rate=4, gr_factor=[1, 2, 2],
            bn_factor=[1, 1, 2], prune="max", reduction=0.5, bottleneck=True, stem="cifar", in_channels=1,
            num_classes=10, image_size=28, classifier_channels=8)


def pytest_configure(config):
    # Every process the run starts inherits this mark; at the end none may be alive (tests/leftovers.py).
    os.environ.setdefault(leftovers.MARK, secrets.token_hex(8))


def pytest_sessionfinish(session, exitstatus):
    left = leftovers.collect(os.environ[leftovers.MARK])
    if left:
        print("\nprocesses left behind by the test run (now killed):\n  " + "\n  ".join(left))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def tiny_config() -> MSDNetConfig:
    return MSDNetConfig.from_dict(TINY)


def write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def make_fashion_dir(root, n_train: int = 400, n_test: int = 100, seed: int = 0):
    """Fashion-MNIST-shaped IDX files whose class is readable from the image
    (a bright bar at a class-dependent row), so a tiny model can learn it."""
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, y in enumerate(labels):
            images[i, 2 + 2 * y: 4 + 2 * y, 4:24] = 250
        write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture
def fashion_dir(tmp_path):
    return make_fashion_dir(tmp_path)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A calibrated checkpoint of an untrained tiny model (random but fixed
    weights, non-trivial BN statistics) and the generated data it was calibrated on."""
    from model import checkpoint as ckpt
    from model.evaluate import calibrate
    from model.network import MSDNet

    root = tmp_path_factory.mktemp("tiny")
    data_dir = root / "data"
    data_dir.mkdir()
    make_fashion_dir(data_dir)
    torch.manual_seed(0)
    model = MSDNet(MSDNetConfig.from_dict(TINY)).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
    from model.data import FASHION_MNIST_CLASSES, NORMALISATION

    mean, std = NORMALISATION["fashion-mnist"]
    ck = ckpt.build(model, FASHION_MNIST_CLASSES, mean, std, validation=ckpt.ValidationSplit("fashion-mnist", 0, 100))
    calibrate(ck, str(data_dir))
    path = root / "tiny.pt"
    ck.save(path)
    return path
