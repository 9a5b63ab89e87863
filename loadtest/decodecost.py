"""Decode + resize cost per image at a checkpoint's input contract: full JPEG decode against Pillow's draft mode.

``python3 -m loadtest.decodecost --checkpoint X [--json F]``

For each kind of request image (generated, :mod:`loadtest.imagegen`: photo-like
500 x 375-ish JPEGs, camera-sized 4000 x 3000 JPEGs, and for small contracts
their own 32 x 32 PNGs and JPEGs) it times, per image, on this process's CPU:

- **full**: ``server.images.decode`` with draft mode off (full-resolution JPEG
  decode, EXIF orientation, mode rule, then the contract's resize, crop and
  mean/std: for ImageNet, shorter side 256 bilinear, centre crop 224);
- **draft**: the same after ``Image.draft("RGB", size)`` with ``size`` the
  contract's resize target (libjpeg's DCT scaling decodes at 1/2, 1/4 or 1/8 of
  the stored size, never below the target), then the same resize and crop:
  msdnet-serve's own rule (``server.images.decode(draft=True)``, ``MSDNET_JPEG_DRAFT``)
  where the server has it, else done here.

and the difference draft - full of the preprocessed float32 tensor (normalised
units: (x / 255 - mean) / std): max and mean absolute, and the max in 8-bit
levels (difference x std x 255). PNGs have no draft mode (same figure twice).
Times are medians of ``repeats`` runs per image (wall and process CPU).
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from model.transforms import preprocess, resized_size

MAX_PIXELS = 4096 * 4096


def _server_decode():
    """msdnet-serve's ``decode`` and whether it takes ``draft`` (its own draft-mode switch)."""
    from server.images import decode

    return decode, "draft" in inspect.signature(decode).parameters


def decode_full(data: bytes, contract) -> np.ndarray:
    """msdnet-serve's decode (``server.images.decode``) with draft mode off where it has
    the switch: full-resolution JPEG decode. float32 (C, H, W).

    Raises:
        server.errors.ServiceError subclasses for bad images.
    """
    decode, has_draft = _server_decode()
    return decode(data, contract, MAX_PIXELS, draft=False) if has_draft else decode(data, contract, MAX_PIXELS)


def decode_draft(data: bytes, contract) -> np.ndarray:
    """A JPEG decoded in draft mode at the contract's resize target (DCT scaling), then
    msdnet-serve's preprocessing: ``server.images.decode(draft=True)`` where the server
    has draft mode, else the same done here; other formats as :func:`decode_full`.
    float32 (C, H, W). Raises what Pillow or the server raises on a bad image."""
    decode, has_draft = _server_decode()
    if has_draft:
        return decode(data, contract, MAX_PIXELS, draft=True)
    with Image.open(io.BytesIO(data)) as img:
        if img.format not in ("JPEG", "MPO"):
            return decode_full(data, contract)
        target = resized_size(img.width, img.height, contract.resize_rule, contract.resize_size)
        img.draft("RGB" if contract.channels == 3 else "L", target)
        img.load()
        img = ImageOps.exif_transpose(img)
        img = img.convert(contract.mode)
        return preprocess(img, contract)


def _median_time(fn, repeats: int) -> tuple[float, float]:
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return float(np.median(wall)), float(np.median(cpu))


def kinds(contract, n_photos: int = 12, n_camera: int = 2, seed: int = 0) -> dict[str, list[bytes]]:
    """The image files timed, by kind: ``{"photo JPEG ~500x375": [...], "camera JPEG
    4000x3000": [...]}`` plus, for a small contract (side <= 64), ``"WxH PNG"`` and
    ``"WxH JPEG"`` at its own size."""
    from .imagegen import CAMERA_SIZE, encode, is_photo_contract, photo_like, photo_size

    rng = np.random.default_rng(seed)
    out: dict[str, list[bytes]] = {}
    ch = contract.channels
    if not is_photo_contract(contract):
        s = contract.image_size
        imgs = [photo_like(rng, s, s, ch) for _ in range(n_photos)]
        out[f"{s}x{s} PNG"] = [encode(i, "png")[0] for i in imgs]
        out[f"{s}x{s} JPEG"] = [encode(i, "jpeg")[0] for i in imgs]
    out["photo JPEG ~500x375"] = [encode(photo_like(rng, *photo_size(rng, 0.0), ch), "jpeg")[0]
                                  for _ in range(n_photos)]
    out[f"camera JPEG {CAMERA_SIZE[0]}x{CAMERA_SIZE[1]}"] = [encode(photo_like(rng, *CAMERA_SIZE, ch), "jpeg")[0]
                                                            for _ in range(n_camera)]
    return out


def measure(checkpoint: str | Path, repeats: int = 5, n_photos: int = 12, n_camera: int = 2) -> dict:
    """Per kind of image: ``{"images", "mean_bytes", "full": {"wall_ms", "cpu_ms"},
    "draft": {...}, "speedup_cpu", "max_abs_diff", "mean_abs_diff", "max_diff_levels"}``
    (times: mean over images of the per-image medians, milliseconds) plus the contract."""
    from model.checkpoint import load

    contract = load(checkpoint).transforms
    res: dict = {"checkpoint": str(checkpoint), "contract": contract.describe(), "repeats": repeats, "kinds": {}}
    std = np.asarray(contract.std, dtype=np.float64).reshape(-1, 1, 1)
    for kind, files in kinds(contract, n_photos, n_camera).items():
        if not files:
            continue
        row: dict = {"images": len(files), "mean_bytes": float(np.mean([len(f) for f in files]))}
        reps = repeats if "camera" not in kind else max(2, repeats // 2)
        for name, fn in (("full", decode_full), ("draft", decode_draft)):
            ts = [_median_time(lambda f=f, fn=fn: fn(f, contract), reps) for f in files]
            row[name] = {"wall_ms": 1e3 * float(np.mean([t[0] for t in ts])),
                         "cpu_ms": 1e3 * float(np.mean([t[1] for t in ts]))}
        diffs = [decode_draft(f, contract).astype(np.float64) - decode_full(f, contract) for f in files]
        row["max_abs_diff"] = float(max(np.abs(d).max() for d in diffs))
        row["mean_abs_diff"] = float(np.mean([np.abs(d).mean() for d in diffs]))
        row["max_diff_levels"] = float(max((np.abs(d) * std * 255).max() for d in diffs))
        row["speedup_cpu"] = row["full"]["cpu_ms"] / max(row["draft"]["cpu_ms"], 1e-9)
        res["kinds"][kind] = row
    return res


def table(d: dict) -> str:
    """Markdown table of :func:`measure`'s result."""
    lines = ["| image | files (mean KB) | full decode + preprocess: ms wall / CPU | draft mode: ms wall / CPU | "
             "CPU speed-up | max abs diff (normalised) | mean abs diff | max diff (8-bit levels) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for kind, r in d["kinds"].items():
        lines.append(f"| {kind} | {r['images']} ({r['mean_bytes'] / 1024:.0f}) | {r['full']['wall_ms']:.2f} / "
                     f"{r['full']['cpu_ms']:.2f} | {r['draft']['wall_ms']:.2f} / {r['draft']['cpu_ms']:.2f} | "
                     f"{r['speedup_cpu']:.2f}x | {r['max_abs_diff']:.3g} | {r['mean_abs_diff']:.3g} | "
                     f"{r['max_diff_levels']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from model.checkpoint import DEFAULT_CHECKPOINT

    p = argparse.ArgumentParser(prog="python3 -m loadtest.decodecost", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args(argv)
    d = measure(a.checkpoint, a.repeats)
    print(table(d))
    if a.json:
        Path(a.json).write_text(json.dumps(d, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
