"""What the command-line tools say when a newcomer's input is off: one line naming the
problem and a non-zero status, never a traceback; and what they say of a checkpoint.
From a new user's trial of the README (an official MSDNet imported, calibrated on a
folder, served)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import checkpoint as ckpt
from model.calibration import NEVER
from model.cli import _calibration_warnings
from model.cli import main as msdnet
from model.official import parse_official_args
from tests.test_official import REF, needs_ref


def run(*args: str, tmp_path: Path, workers: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "MSDNET_WORKERS": str(workers), "MSDNET_TORCH_THREADS": "1", "MSDNET_BACKEND": "torch",
           "TMPDIR": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "server.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_target_outside_the_exits_is_one_line_and_status_2(tiny_checkpoint, tmp_path, workers):
    done = run("serve", "--checkpoint", str(tiny_checkpoint), "--port", "0", "--target-flops", "1e3",
               tmp_path=tmp_path, workers=workers)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    line = next(ln for ln in done.stderr.splitlines() if ln.startswith("msdnet serve: error:"))
    assert "target_flops 1000 is outside" in line and "exit 1's cost" in line and "lazy evaluation" in line


def test_an_unreadable_image_in_the_calibration_folder_is_named_in_one_line(tiny_checkpoint, tmp_path, capsys):
    ck = ckpt.load(tiny_checkpoint)
    assert ck.classes[0] == "T-shirt/top"  # its folder: T-shirt_top
    for k, name in enumerate(ck.classes):
        folder = tmp_path / "data" / "val" / name.replace("/", "_")
        folder.mkdir(parents=True)
        Image.fromarray(np.full((28, 28), 20 * k, np.uint8)).save(folder / "a.png")
    bad = tmp_path / "data" / "val" / ck.classes[3] / "bad.png"
    bad.write_bytes(b"junk")
    code = msdnet(["calibrate", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "c.pt"),
                   "--data", "folder", "--data-dir", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert f"{bad} is not a readable image" in err
    assert not (tmp_path / "c.pt").exists()
    bad.unlink()  # the same folder without it calibrates, "T-shirt/top" read from T-shirt_top/
    assert msdnet(["calibrate", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "c.pt"),
                   "--data", "folder", "--data-dir", str(tmp_path / "data")]) == 0
    assert ckpt.load(tmp_path / "c.pt").calibration.images_count == len(ck.classes)


def test_calibration_warns_of_what_deserves_a_second_look():
    cal = ckpt.Calibration(temperatures=(20.0, 1.3, 0.05), thresholds=(NEVER, 0.7, 0.0), target_flops=5e6,
                           curve=(), images_count=9, images_source="folder")
    warnings = _calibration_warnings(cal)
    assert any("exit(s) [1, 3] hit the fitting bound" in w for w in warnings)
    assert any("calibrated on 9 images" in w for w in warnings)
    assert any("no image leaves at exit(s) [1]" in w for w in warnings)
    assert any("0 point(s)" in w for w in warnings)


def test_class_names_given_twice_are_refused(tiny_checkpoint):
    ck = ckpt.load(tiny_checkpoint)
    names = list(ck.classes)
    with pytest.raises(ValueError, match=r"given more than once: \['a'\]"):
        ckpt.build(ck.model, ["a", "a", *names[2:]], [0.5], [0.5], validation=ck.validation)


def test_the_official_args_options_that_shape_no_msdnet_are_ignored():
    # from the official args.py: evaluation, its DenseNet/ResNet options, optimisers
    a = parse_official_args("--data cifar10 --nBlocks 3 --eval anytime --depth 56 --drop-rate 0 --death-mode none "
                            "--growth-rate 12 --bn-size 4 --trainer train --patience 0 --alpha 0.99 --beta1 0.9 "
                            "--evaluate=dynamic -d 10")
    assert (a.nBlocks, a.growthRate) == (3, 6)  # --growth-rate is DenseNet's, not MSDNet's --growthRate


@needs_ref
def test_a_checkpoint_of_the_official_code_read_as_ours_says_to_import_it(tmp_path):
    for name in ("checkpoint_main.pth.tar", "state_dict.pt"):
        with pytest.raises(ckpt.CheckpointError, match="import it first: msdnet import-official"):
            ckpt.load(REF / "cifar-tiny" / name)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(ckpt.CheckpointError, match=r"not a readable torch checkpoint .*: \w+Error"):
        ckpt.load(text)


def test_info_says_whether_and_how_a_checkpoint_is_calibrated(tiny_checkpoint, tmp_path, capsys):
    assert msdnet(["info", "--checkpoint", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    cal = ckpt.load(tiny_checkpoint).calibration
    assert f"default target {cal.target_flops / 1e6:.3f} MFLOPs per image" in out and "temperatures" in out
    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["calibration"] = None
    torch.save(raw, tmp_path / "bare.pt")
    assert msdnet(["info", "--checkpoint", str(tmp_path / "bare.pt")]) == 0
    assert "Calibration: none" in capsys.readouterr().out
