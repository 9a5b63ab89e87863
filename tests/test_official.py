"""Official MSDNet checkpoints (kalviny/MSDNet-PyTorch): import, exactness, refusals,
the input contract, calibration on a class folder, and serving an imported model.

Reference: ``/work/shared/reference/official`` (tiny official MSDNets with their
official logits; see its README). FLOPs = multiply-accumulates of convs and linears
(MSDNet paper), cumulative per exit; ``flops_official`` is the official counter's.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import checkpoint as ckpt
from model.cli import main as msdnet
from model.network import MSDNet
from model.official import (
    OfficialImportError,
    config_from_official,
    import_official,
    official_key_map,
    parse_official_args,
    to_official,
)
from model.transforms import InputContract, preprocess
from server.images import decode

# The fixtures live beside the repository (../shared/reference/official); override with MSDNET_OFFICIAL_REF.
REF = Path(os.environ.get("MSDNET_OFFICIAL_REF", Path(__file__).resolve().parents[2] / "shared/reference/official"))
needs_ref = pytest.mark.skipif(not REF.is_dir(), reason="official reference fixtures not found")
CASES = [("cifar-tiny", "state_dict.pt"), ("cifar-tiny", "checkpoint_main.pth.tar"),
         ("cifar-lingrow", "checkpoint_main.pth.tar")]


def fixture(name: str) -> tuple[dict, str]:
    cfg = json.loads((REF / name / "config.json").read_text())
    return cfg, " ".join(cfg["argv"])


def imported(tmp_path, name: str, file: str = "checkpoint_main.pth.tar") -> Path:
    _, args = fixture(name)
    out = tmp_path / f"{name}.pt"
    assert msdnet(["import-official", str(REF / name / file), "--official-args", args, "--out", str(out)]) == 0
    return out


@needs_ref
@pytest.mark.parametrize("name,file", CASES)
def test_fixture_logits_match_at_every_exit(tmp_path, name, file, capsys):
    out = imported(tmp_path, name, file)
    model = ckpt.load(out).model
    x = torch.load(REF / name / "input.pt", weights_only=True)
    ref = torch.load(REF / name / "logits.pt", weights_only=True)
    assert ref.shape[0] == model.num_exits
    with torch.no_grad():
        for lazy in (True, False):
            state, diffs = model.start(x, lazy=lazy), []
            for k in range(model.num_exits):
                logits, state = model.advance(state)
                diffs.append((logits - ref[k]).abs().max().item())
            with capsys.disabled():
                print(f"\n{name}/{file} lazy={lazy}: max |ours - official| per exit "
                      + ", ".join(f"{d:.2e}" for d in diffs))
            assert max(diffs) < 1e-5, diffs
        # BN eps, concat order or unloaded stats would move logits by >= 0.03 (fixture README).
        assert all((a - b).abs().max() < 1e-5 for a, b in zip(model(x), ref, strict=True))


@needs_ref
@pytest.mark.parametrize("name", ["cifar-tiny", "cifar-lingrow"])
def test_info_reproduces_official_flops_and_params(tmp_path, name, capsys):
    cfg, _ = fixture(name)
    out = imported(tmp_path, name)
    capsys.readouterr()
    assert msdnet(["info", "--checkpoint", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [e["flops_official"] for e in info["exits"]] == [int(f) for f in cfg["flops_official_counter"]]
    assert [e["params"] for e in info["exits"]] == cfg["params_official_counter"]
    assert [e["flops"] for e in info["exits"]] == cfg["macs_conv_linear"]
    assert info["classes"][:2] == (["airplane", "automobile"] if name == "cifar-tiny" else ["apple", "aquarium_fish"])
    t = info["transforms"]  # the official loader's CIFAR test transforms
    assert (t["resize_rule"], t["resize_size"], t["crop_size"], t["channels"]) == ("exact", 32, None, 3)
    assert t["mean"] == ([0.4914, 0.4824, 0.4467] if name == "cifar-tiny" else [0.5071, 0.4867, 0.4408])


def test_official_args_spellings_and_defaults():
    a = parse_official_args("--arch msdnet --data cifar100 --nBlocks 5 --save x --lr 0.1 --bnFactor 1-2-4")
    assert (a.nBlocks, a.base, a.step, a.nChannels, a.growthRate, a.prune, a.reduction) == (5, 4, 1, 32, 6, "max", 0.5)
    assert (a.grFactor, a.nScales, a.num_classes, a.bottleneck) == ([1, 2, 4], 3, 100, True)
    cfg = config_from_official(a)
    # --stepmode left out: the official code's "not even" branch, lin_grow.
    assert cfg.layers_per_block() == [4, 2, 3, 4, 5]
    with pytest.raises(OfficialImportError, match="unknown official argument"):
        parse_official_args("--nblocks 3")


@needs_ref
@pytest.mark.parametrize("change,expected", [
    ("--nChannels 16", "blocks.0.0.layers.0.net.0.weight has shape (8, 3, 3, 3), the arguments give (16, 3, 3, 3)"),
    ("--data cifar100", "classifier.0.linear.weight has shape (10, 128), the arguments give (100, 128)"),
    # 4 blocks prune later: block 2 layer 1 keeps scale 0 (ConvNormal, 16 -> 4 channels)
    # where the weights drop it (scale 1 regular conv: 32 -> bottleneck 8).
    ("--nBlocks 4",
     "blocks.1.0.layers.0.conv_normal.net.0.weight has shape (8, 32, 1, 1), the arguments give (4, 16, 1, 1)"),
])
def test_wrong_arguments_refused_and_nothing_written(tmp_path, capsys, change, expected):
    _, args = fixture("cifar-tiny")
    opt = change.split()[0]
    args = " ".join(a for i, a in enumerate(args.split()) if a != opt and args.split()[i - 1] != opt) + " " + change
    out = tmp_path / "out.pt"
    rc = msdnet(["import-official", str(REF / "cifar-tiny/checkpoint_main.pth.tar"), "--official-args", args,
                 "--out", str(out)])
    assert rc == 2
    assert expected in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@needs_ref
def test_missing_key_refused(tmp_path):
    data = torch.load(REF / "cifar-tiny/state_dict.pt", weights_only=True)
    del data["classifier.2.linear.bias"]
    torch.save(data, tmp_path / "partial.pt")
    with pytest.raises(OfficialImportError, match=r"1 key\(s\) missing, 0 unexpected \(first: missing "
                                                  r"classifier.2.linear.bias\)"):
        import_official(tmp_path / "partial.pt", fixture("cifar-tiny")[1])


class Booby:
    """Unpickling this would create a file (proves whether unpickling ran code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@needs_ref
@pytest.mark.parametrize("extra,named", [("booby", "io.open"), ("namespace", "argparse.Namespace")])
def test_pickled_object_refused_without_running_it(tmp_path, capsys, extra, named):
    marker = tmp_path / "unpickled-code-ran"
    data = torch.load(REF / "cifar-tiny/checkpoint_main.pth.tar", weights_only=True)
    data["args"] = Booby(marker) if extra == "booby" else argparse.Namespace(nBlocks=3)
    path = tmp_path / "with_object.pth.tar"
    torch.save(data, path)
    assert not marker.exists()
    out = tmp_path / "out.pt"
    _, args = fixture("cifar-tiny")
    rc = msdnet(["import-official", str(path), "--official-args", args, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "pickled Python objects" in err and named in err, err
    assert not marker.exists(), "unpickling ran code from the file"
    assert not out.exists()


def _randomise(model: MSDNet, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def test_imagenet_variant_round_trips(tmp_path):
    args = ("--data ImageNet --nBlocks 2 --base 2 --step 2 --stepmode even --nChannels 4 --growthRate 4 "
            "--grFactor 1-2-4-4 --bnFactor 1-2-4-4")
    cfg = config_from_official(parse_official_args(args))
    assert (cfg.stem, cfg.n_scales, cfg.image_size, cfg.num_classes) == ("imagenet", 4, 224, 1000)
    ours = MSDNet(cfg).eval()
    _randomise(ours, 5)
    official = to_official(ours.state_dict(), cfg)
    # Facts of the official ImageNet network: the 7x7 stem conv has a bias and is a
    # plain Sequential (conv, BN, ReLU, max pool); classifiers keep their input width.
    assert official["blocks.0.0.layers.0.0.weight"].shape == (4, 3, 7, 7)
    assert official["blocks.0.0.layers.0.0.bias"].shape == (4,)
    assert official["blocks.0.0.layers.0.1.running_var"].shape == (4,)
    c_in = official["classifier.0.linear.weight"].shape[1]
    assert official["classifier.0.m.0.net.0.weight"].shape == (c_in, c_in, 3, 3)
    assert set(official) == set(official_key_map(cfg).values())
    path = tmp_path / "imagenet_main.pth.tar"
    torch.save({"epoch": 90, "arch": "msdnet", "best_prec1": 1.0,
                "state_dict": {"module." + k: v for k, v in official.items()}}, path)
    ck = import_official(path, args)
    assert ck.transforms.describe().startswith("RGB, shorter side to 256 (bilinear), center crop 224")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = ours(x)
        state = ck.model.start(x, lazy=True)
        for k in range(cfg.n_blocks):
            logits, state = ck.model.advance(state)
            assert torch.equal(logits, want[k])


# --- the input contract ----------------------------------------------------------

def _rng_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_server_applies_shorter_side_resize_and_center_crop():
    c = InputContract(3, "shorter", 40, "bicubic", 32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)).validate()
    img = _rng_image("RGB", (57, 43), 1)
    got = decode(_png(img), c, 10**6)
    # Reference by hand: shorter side 43 -> 40, longer int(40 * 57 / 43) = 53;
    # crop offsets round((40 - 32) / 2) = 4 and round((53 - 32) / 2) = round(10.5) = 10.
    r = np.asarray(img.resize((53, 40), Image.BICUBIC), dtype=np.float64)[4:36, 10:42]
    want = ((r / 255 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.3])).transpose(2, 0, 1)
    assert got.shape == (3, 32, 32) and got.dtype == np.float32
    assert np.abs(got - want).max() < 1e-5


def test_server_grey_non_square_exact_resize_and_small_image_padding():
    c = InputContract(1, "exact", 28, "bilinear", None, (0.286,), (0.353,)).validate()
    img = _rng_image("L", (30, 50), 2)
    got = decode(_png(img), c, 10**6)
    r = np.asarray(img.resize((28, 28), Image.BILINEAR), dtype=np.float64)
    assert np.abs(got[0] - (r / 255 - 0.286) / 0.353).max() < 1e-5
    # An image smaller than the crop is zero padded first (torchvision CenterCrop).
    c = InputContract(1, "shorter", 6, "nearest", 8, (0.0,), (1.0,)).validate()
    small = _rng_image("L", (6, 9), 3)
    got = preprocess(small, c)[0]
    want = np.zeros((8, 8))
    want[:, 1:7] = np.asarray(small, dtype=np.float64)[0:8] / 255  # rows: round((9 - 8) / 2) = 0
    assert np.abs(got - want).max() < 1e-6


def test_shipped_checkpoint_keeps_its_preprocessing():
    ck = ckpt.load()
    raw = torch.load(ckpt.DEFAULT_CHECKPOINT, weights_only=True)
    # First written before the input contract existed; re-saved since (the accuracy watch's calibration
    # figures) with the contract's fields spelled out: the same preprocessing either way.
    assert raw["transforms"].get("resize_rule", "exact") == "exact" and raw["transforms"]["image_size"] == 28
    c = ck.transforms
    assert (c.resize_rule, c.resize_size, c.interpolation, c.crop_size, c.background) == (
        "exact", 28, "bilinear", None, 0)
    data = Path("server/samples/shirt.png").read_bytes()
    got = decode(data, ck.transforms, 10**6)
    with Image.open(io.BytesIO(data)) as img:
        a = np.asarray(img.convert("L").resize((28, 28), Image.BILINEAR) if img.size != (28, 28)
                       else img.convert("L"), dtype=np.float32) / 255.0
    assert np.array_equal(got, ((a - np.float32(0.286)) / np.float32(0.353))[None])


# --- calibration on a class folder, evaluation, and serving -------------------------

def _make_folder(root: Path, classes: list[str], split: str, per_class: int, seed: int) -> None:
    sizes = [(40, 30), (32, 32), (50, 64), (21, 35)]
    for ci, name in enumerate(classes):
        d = root / split / name
        d.mkdir(parents=True)
        for i in range(per_class):
            img = _rng_image("RGB", sizes[(ci + i) % len(sizes)], seed + 100 * ci + i)
            if i % 3 == 0:
                img.save(d / f"{i}.jpg", "JPEG", quality=90)
            elif i % 3 == 1:
                img.save(d / f"{i}.png", "PNG")
            else:
                img.convert("RGBA").save(d / f"{i}.png", "PNG")


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    return subprocess.run([sys.executable, "-m", "server.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=600)


def _offline_probs(model, contract, data: bytes, temperatures) -> list[np.ndarray]:
    with Image.open(io.BytesIO(data)) as img:
        x = torch.from_numpy(preprocess(img.convert("RGB"), contract))[None]
    with torch.no_grad():
        return [torch.softmax(lo[0] / t, 0).numpy() for lo, t in zip(model(x), temperatures, strict=True)]


@needs_ref
def test_calibrate_evaluate_and_serve_imported_model(tmp_path):
    from tests.live import LiveServer

    out = tmp_path / "tiny.pt"
    _, args = fixture("cifar-tiny")
    r = _cli("import-official", str(REF / "cifar-tiny/state_dict.pt"), "--official-args", args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    classes = list(ckpt.load(out).classes)
    data_dir = tmp_path / "data"
    _make_folder(data_dir, classes, "val", 4, 0)

    # A folder whose classes differ is refused, and the checkpoint is left as it was.
    bad = tmp_path / "bad"
    _make_folder(bad, classes[:-1] + ["zebra"], "val", 1, 0)
    r = _cli("calibrate", "--checkpoint", str(out), "--data", "folder", "--data-dir", str(bad))
    assert r.returncode == 2 and "missing ['truck'], not in the checkpoint ['zebra']" in r.stderr, r.stderr
    assert ckpt.load(out).calibration is None

    r = _cli("calibrate", "--checkpoint", str(out), "--data", "folder", "--data-dir", str(data_dir))
    assert r.returncode == 0, r.stderr
    assert "40/40" in r.stderr  # tqdm's bar over the 40 images
    ck = ckpt.load(out)
    cal = ck.calibration
    assert cal.images_count == 40 and len(cal.temperatures) == 3

    # Evaluate on the same folder: accuracy per exit equals an offline computation
    # on the reference preprocessing (Pillow + the contract).
    r = _cli("evaluate", "--checkpoint", str(out), "--data", "folder", "--data-dir", str(data_dir), "--split",
             "val", "--json", str(tmp_path / "ev.json"), "--plot", str(tmp_path / "ev.png"), "--latency-repeats", "2")
    assert r.returncode == 0, r.stderr
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert (tmp_path / "ev.png").stat().st_size > 1000 and ev["budgeted"]
    correct = np.zeros(3)
    for label, name in enumerate(classes):
        for f in sorted((data_dir / "val" / name).iterdir()):
            with Image.open(f) as img:
                rgb = img.convert("RGBA") if img.mode == "RGBA" else img
                if rgb.mode == "RGBA":
                    rgb = Image.alpha_composite(Image.new("RGBA", rgb.size, (0, 0, 0, 255)), rgb)
                x = torch.from_numpy(preprocess(rgb.convert("RGB"), ck.transforms))[None]
            with torch.no_grad():
                correct += [int(lo.argmax(1).item() == label) for lo in ck.model(x)]
    assert [r["top1"] for r in ev["anytime"]] == pytest.approx(list(correct / 40), abs=1e-9)

    # Serve it: /classify an RGB JPEG, /batch, v2.
    jpeg = io.BytesIO()
    _rng_image("RGB", (45, 61), 99).save(jpeg, "JPEG", quality=85)
    jpeg = jpeg.getvalue()
    probs = _offline_probs(ck.model, ck.transforms, jpeg, cal.temperatures)
    with LiveServer(out, args=["--no-controller"]) as srv:
        import httpx

        got = httpx.post(srv.url + "/classify", files={"file": ("x.jpg", jpeg, "image/jpeg")}, timeout=60).json()
        k = got["exit"] - 1
        p = probs[k]
        # The exit taken is the first whose confidence reaches its threshold.
        first = next(i for i, q in enumerate(probs) if q.max() >= cal.thresholds[i] or i == 2)
        assert k == first
        assert got["class_id"] == int(p.argmax()) and got["label"] == classes[int(p.argmax())]
        assert math.isclose(got["confidence"], float(p.max()), abs_tol=1e-4)
        for entry in got["top_k"]:
            assert math.isclose(entry["probability"], float(p[classes.index(entry["label"])]), abs_tol=1e-4)

        b = httpx.post(srv.url + "/batch", json={"images": [base64.b64encode(jpeg).decode()] * 2,
                                                 "flops_budget": 1e9}, timeout=60).json()
        assert [res["class_id"] for res in b["results"]] == [int(probs[res["exit"] - 1].argmax())
                                                             for res in b["results"]]
        meta = httpx.get(srv.url + "/v2/models/msdnet", timeout=30).json()["parameters"]
        assert (meta["resize_rule"], meta["resize_size"], meta["image_size"]) == ("exact", 32, 32)
        inf = httpx.post(srv.url + "/v2/models/msdnet/infer", json={"inputs": [
            {"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(jpeg).decode()]}]},
            timeout=60).json()
        outs = {o["name"]: o["data"] for o in inf["outputs"]}
        assert outs["class_id"] == [got["class_id"]] and outs["exit"] == [got["exit"]]
        assert np.allclose(outs["probabilities"], probs[k], atol=1e-4)

        # The fixture's input through the server: probabilities at the exit taken
        # equal softmax(official logits / T) of that exit.
        x = torch.load(REF / "cifar-tiny/input.pt", weights_only=True)
        ref = torch.load(REF / "cifar-tiny/logits.pt", weights_only=True)
        inf = httpx.post(srv.url + "/v2/models/msdnet/infer", json={"inputs": [
            {"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.flatten().tolist()}]},
            timeout=60).json()
        outs = {o["name"]: o["data"] for o in inf["outputs"]}
        p = np.asarray(outs["probabilities"]).reshape(4, 10)
        for i, e in enumerate(outs["exit"]):
            want = torch.softmax(ref[e - 1, i] / cal.temperatures[e - 1], 0).numpy()
            assert np.abs(p[i] - want).max() < 1e-5
