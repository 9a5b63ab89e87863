"""Speed-only checkpoints of the paper's real-size MSDNets, made on demand from the official arguments.

``python3 -m loadtest.realsize make NAME [--out PATH]`` builds the network of the
official MSDNet-PyTorch arguments of ``NAME`` (:data:`CONFIGS`) with this
project's own code (``model.official.parse_official_args`` +
``config_from_official``, ``model.network.MSDNet``, ``model.checkpoint.build``),
**random weights** (the project's initialiser), then:

1. scales each exit's final linear layer (weight and bias) so that the largest
   logit over a batch of random N(0, 1) input images is :data:`LOGIT_MAX` (40,
   a confident trained classifier's range);
2. writes the official test-time input contract of ``--data``
   (``model.official.OFFICIAL_TRANSFORMS``: CIFAR 32 x 32 and mean/std;
   ImageNet shorter side 256, centre crop 224, mean/std) and the official class
   names (CIFAR) or ``class_0000``.. (ImageNet);
3. calibrates it as ``msdnet calibrate --data folder --target-flops F`` does
   (``model.evaluate.calibrate``) on a generated folder
   (:mod:`loadtest.imagegen`: 32 x 32 PNGs for CIFAR, photo-like JPEGs for
   ImageNet), labelled with the network's own last-exit class (pseudo-labels:
   random weights have no true classes; this way an early exit is "right" when
   it agrees with the last one, and the curve behaves like a trained one's), at
   ``F`` = 40% of the last exit's lazy cost.

The file is cached (default ``build/realsize/NAME.pt``, gitignored) and remade
only when missing. Its card says ``speed-only: random weights``: answers from
it are meaningless; its speed is the real network's.

FLOPs = multiply-accumulates of convs and linears (MSDNet paper convention),
cumulative per exit, batch 1; ``lazy`` = what msdnet-serve spends (paper §4),
``official`` = the official counter's figure (adds ReLU and pooling).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "build" / "realsize"
LOGIT_MAX = 40.0
TARGET_SHARE = 0.4  # the calibrated default target: this share of the last exit's lazy FLOPs

_CIFAR = "--nChannels 16 --growthRate 6 --grFactor 1-2-4 --bnFactor 1-2-4"
_IMAGENET = "--data ImageNet --nBlocks 5 --stepmode even --nChannels 32 --growthRate 16 --grFactor 1-2-4-4 " \
            "--bnFactor 1-2-4-4"
# name -> official main.py arguments (the common --arch msdnet --prune max --reduction 0.5 are the defaults)
CONFIGS: dict[str, str] = {
    "cifar100-7": f"--data cifar100 --nBlocks 7 --stepmode even --step 2 --base 4 {_CIFAR}",
    "cifar100-10": f"--data cifar100 --nBlocks 10 --stepmode even --step 2 --base 4 {_CIFAR}",
    "cifar10-10": f"--data cifar10 --nBlocks 10 --stepmode even --step 2 --base 4 {_CIFAR}",
    "cifar100-lingrow-5": f"--data cifar100 --nBlocks 5 --stepmode lin_grow --step 1 --base 1 {_CIFAR}",
    "cifar100-lingrow-7": f"--data cifar100 --nBlocks 7 --stepmode lin_grow --step 1 --base 1 {_CIFAR}",
    "imagenet-5": f"{_IMAGENET} --step 4 --base 4",
    "imagenet-5-step6": f"{_IMAGENET} --step 6 --base 6",
    "imagenet-5-step7": f"{_IMAGENET} --step 7 --base 7",
}
# Calibration images per size (ImageNet: ~0.15 s per image on 2 cores for MSDNet-5, twice: labels + calibrate).
CALIBRATION_IMAGES = {"cifar": 1000, "ImageNet": 300}


def official_args(name: str) -> str:
    """The official arguments of ``name``.

    Raises:
        KeyError: for a name not in :data:`CONFIGS` (the message lists them).
    """
    if name not in CONFIGS:
        raise KeyError(f"unknown real-size configuration {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name]


def build_network(name: str, seed: int = 0):
    """The uncalibrated speed-only checkpoint of ``name`` (a ``model.checkpoint.Checkpoint``,
    not saved): random weights (``torch.manual_seed(seed)``), logits scaled
    (:func:`scale_logits`), official input contract and class names.

    Raises:
        KeyError: unknown name.
    """
    from model import checkpoint as ckpt
    from model.network import MSDNet
    from model.official import (
        CIFAR10_CLASSES,
        CIFAR100_CLASSES,
        OFFICIAL_TRANSFORMS,
        config_from_official,
        parse_official_args,
    )

    args = parse_official_args(official_args(name))
    cfg = config_from_official(args)
    torch.manual_seed(seed)
    model = MSDNet(cfg).eval()
    scales = scale_logits(model, LOGIT_MAX, seed=seed)
    classes = {"cifar10": CIFAR10_CLASSES, "cifar100": CIFAR100_CLASSES}.get(
        args.data, [f"class_{i:04d}" for i in range(cfg.num_classes)])
    contract = OFFICIAL_TRANSFORMS[args.data]
    ck = ckpt.build(model, classes, list(contract.mean), list(contract.std),
                    validation=ckpt.ValidationSplit(ckpt.FOLDER),
                    card=ckpt.ModelCard(source="speed-only: random weights (loadtest.realsize); answers are "
                                               "meaningless", speed_only=True, name=name,
                                        official_args=official_args(name), logit_scales=tuple(scales),
                                        logit_max=LOGIT_MAX))
    ck.transforms = contract
    return ck


@torch.inference_mode()
def exit_logits(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Every exit's logits for the normalised batch ``x`` (N, C, H, W): K tensors (N, classes)."""
    return list(model(x))


def random_inputs(cfg, n: int = 8, seed: int = 0) -> torch.Tensor:
    """``n`` random images (N(0, 1) after normalisation): float32 (n, C, H, W)."""
    return torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size,
                       generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def scale_logits(model, target: float = LOGIT_MAX, n: int = 8, seed: int = 0) -> list[float]:
    """Scale each exit's final linear (weight and bias) so that the largest logit on
    :func:`random_inputs` is ``target``; returns the factor per exit.

    Raises:
        ValueError: when an exit's largest logit is not positive (cannot be scaled to ``target``).
    """
    logits = exit_logits(model, random_inputs(model.cfg, n, seed))
    factors = []
    for head, lg in zip(model.classifiers, logits):
        top = float(lg.max())
        if not top > 0:
            raise ValueError(f"largest logit {top}: not positive, cannot scale to {target}")
        f = target / top
        head.linear.weight.mul_(f)
        head.linear.bias.mul_(f)
        factors.append(f)
    return factors


def _calibration_folder(ck, folder: Path, n: int, seed: int) -> None:
    """``n`` generated images in ``folder/val/<class>/``, each in the folder of the
    class its network gives at the last exit (every class folder exists)."""
    from PIL import Image

    from model.transforms import preprocess, to_contract_mode

    from .imagegen import generate

    contract = ck.transforms
    files = generate(contract, n, seed=seed, camera_share=0.0)
    labels = []
    for i in range(0, n, 32):
        xs = []
        for data, _, _ in files[i:i + 32]:
            with Image.open(io.BytesIO(data)) as img:
                xs.append(preprocess(to_contract_mode(img, contract), contract))
        labels += exit_logits(ck.model, torch.from_numpy(np.stack(xs)))[-1].argmax(1).tolist()
    if folder.exists():
        shutil.rmtree(folder)
    for c in ck.classes:
        (folder / "val" / c).mkdir(parents=True)
    for i, ((data, ctype, _), label) in enumerate(zip(files, labels)):
        suffix = ".jpg" if ctype == "image/jpeg" else ".png"
        (folder / "val" / ck.classes[label] / f"{i:05d}{suffix}").write_bytes(data)


def calibrate(ck, folder: Path, n: int, seed: int = 1, target_share: float = TARGET_SHARE):
    """Generate the calibration folder (:func:`_calibration_folder`) and run the
    project's calibration on it (``msdnet calibrate --data folder --target-flops``),
    target = ``target_share`` x the last exit's lazy FLOPs. Returns the
    ``model.checkpoint.Calibration`` (also stored in ``ck``)."""
    from model.evaluate import calibrate as project_calibrate

    _calibration_folder(ck, folder, n, seed)
    target = target_share * ck.exit_flops(lazy=True)[-1]
    return project_calibrate(ck, str(folder), target_flops=target, data="folder", split="val")


def default_path(name: str) -> Path:
    """Where :func:`make` caches ``name``: ``build/realsize/NAME.pt``."""
    return CACHE / f"{name}.pt"


def make(name: str, out: str | Path | None = None, images: int | None = None, force: bool = False,
         log=print) -> Path:
    """The calibrated speed-only checkpoint of ``name`` at ``out`` (default
    :func:`default_path`), made unless a file made from the same arguments is
    there (``force``: remade).
    ``images``: calibration images (default :data:`CALIBRATION_IMAGES` by size).

    Raises:
        KeyError: unknown name.
    """
    path = Path(out) if out else default_path(name)
    if path.is_file() and not force:
        try:
            d = describe(path)
            if d["official_args"] == official_args(name) and d["logit_max"] == LOGIT_MAX:
                return path
            log(f"{path} was made from other arguments ({d['official_args']}); remaking it")
        except Exception as exc:  # noqa: BLE001 - unreadable or foreign: remade
            log(f"{path} is not a usable checkpoint ({exc}); remaking it")
    t0 = time.perf_counter()
    ck = build_network(name)
    n = images or CALIBRATION_IMAGES["ImageNet" if ck.config.stem == "imagenet" else "cifar"]
    log(f"{name}: built in {time.perf_counter() - t0:.1f} s; calibrating on {n} generated images")
    cal = calibrate(ck, path.parent / f"{path.stem}-calibration", n)
    ck.save(path)
    log(f"{name}: calibrated (target {cal.target_flops / 1e6:.1f} MFLOPs), wrote {path} "
        f"in {time.perf_counter() - t0:.1f} s")
    return path


def describe(path: str | Path) -> dict:
    """Name, official arguments and per-exit costs of a saved checkpoint:
    ``{"name", "official_args", "speed_only", "logit_max", "exits": [{"exit", "flops",
    "flops_lazy", "flops_official", "params"}]}`` (FLOPs as multiply-accumulates, cumulative).

    Raises:
        model.checkpoint.CheckpointError: an unreadable or foreign file.
    """
    from model.checkpoint import costs_table, load

    ck = load(path)
    card = ck.card
    return {"name": card.name, "official_args": card.official_args, "speed_only": card.speed_only,
            "logit_max": card.logit_max, "exits": costs_table(ck.costs)}


def parity(name: str, seed: int = 0) -> dict:
    """Build ``name`` (random weights, logits scaled to :data:`LOGIT_MAX`) and the server's
    ONNX Runtime backend with its parity check, as ``msdnet serve`` does at start:
    ``{"name", "ok", "error", "relative", "absolute", "probability", "largest_logit"}``
    (the worst figures over all exits; ``error`` the refusal's message, else None)."""
    from server.engine.backends import BackendError
    from server.engine.backends.ort import OrtBackend

    ck = build_network(name, seed)
    top = max(float(z.abs().max()) for z in exit_logits(ck.model, random_inputs(ck.model.cfg, 3, 0)))
    try:
        fig = OrtBackend(ck.model, threads=1).parity
    except BackendError as exc:
        return {"name": name, "ok": False, "error": str(exc), "largest_logit": top}
    return {"name": name, "ok": fig.ok, "error": None, "relative": fig.relative, "absolute": fig.absolute,
            "probability": fig.probability, "largest_logit": top}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m loadtest.realsize", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="build (if not cached) and print per-exit FLOPs")
    m.add_argument("name", choices=list(CONFIGS))
    m.add_argument("--out", help=f"checkpoint path (default {CACHE.relative_to(ROOT)}/NAME.pt)")
    m.add_argument("--images", type=int, help="calibration images (default: 1000 CIFAR, 300 ImageNet)")
    m.add_argument("--force", action="store_true", help="remake even if the file exists")
    m.add_argument("--json", action="store_true")
    sub.add_parser("list", help="the configuration names and their official arguments")
    pa = sub.add_parser("parity", help="the server's ONNX Runtime parity check on each named network (random "
                        "weights, logits scaled to 40): does it start?")
    pa.add_argument("names", nargs="*", help=f"default: all of {', '.join(CONFIGS)}")
    a = p.parse_args(argv)
    if a.cmd == "parity":
        for n in a.names:
            official_args(n)  # an unknown name: KeyError listing the known ones
        results = [parity(n) for n in (a.names or list(CONFIGS))]
        for r in results:
            figures = ("refused: " + r["error"]) if r["error"] else (
                f"logits within {r['relative']:.2g} of the largest ({r['absolute']:.2g} absolute), "
                f"probabilities within {r['probability']:.2g}")
            print(f"{r['name']:20s} largest logit {r['largest_logit']:7.1f}  {'starts' if r['ok'] else 'REFUSED'}: "
                  f"{figures}")
        return 0 if all(r["ok"] for r in results) else 1
    if a.cmd == "list":
        for k, v in CONFIGS.items():
            print(f"{k:20s} {v}")
        return 0
    path = make(a.name, a.out, a.images, a.force)
    d = describe(path)
    if a.json:
        print(json.dumps({"path": str(path), **d}, indent=1))
        return 0
    print(f"{path}  ({a.name}, speed-only: random weights; FLOPs = multiply-accumulates of convs and linears, "
          "cumulative per exit, batch 1)")
    print(f"{'exit':>4} {'MFLOPs lazy':>12} {'MFLOPs':>10} {'official':>10} {'params M':>9}")
    for e in d["exits"]:
        print(f"{e['exit']:>4} {e['flops_lazy'] / 1e6:>12.2f} {e['flops'] / 1e6:>10.2f} "
              f"{e['flops_official'] / 1e6:>10.2f} {e['params'] / 1e6:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
