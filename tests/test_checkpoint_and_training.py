"""Training on generated data, resuming, calibration, and checkpoint safety."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from model import checkpoint as ckpt
from model.evaluate import calibrate, evaluate
from model.network import MSDNet
from model.train import TrainOptions, exit_loss, forward_train, train
from tests.conftest import TINY


def _opts(tiny_config, fashion_dir, tmp_path, **kw) -> TrainOptions:
    base = dict(config=tiny_config, data="fashion-mnist", data_dir=str(fashion_dir), epochs=2, batch_size=50,
                val_size=100, threads=1, out=str(tmp_path / "tiny.pt"))
    base.update(kw)
    return TrainOptions(**base)


def test_train_calibrate_evaluate_round_trip(tiny_config, fashion_dir, tmp_path):
    ck = train(_opts(tiny_config, fashion_dir, tmp_path, epochs=4, batch_size=25, pad=0), command="msdnet train --test")
    loaded = ckpt.load(tmp_path / "tiny.pt")
    raw = torch.load(tmp_path / "tiny.pt", weights_only=True)  # no pickled code
    assert raw["format"] == ckpt.FORMAT and raw["validation"] == {"dataset": "fashion-mnist", "seed": 0, "size": 100}
    assert loaded.card.training.command == "msdnet train --test"
    assert [h.epoch for h in loaded.card.training.history] == [1, 2, 3, 4]
    assert loaded.card == ck.card and loaded.validation == ckpt.ValidationSplit("fashion-mnist", 0, 100)
    assert loaded.transforms.image_size == 28 and loaded.transforms.channels == 1
    assert [c.exit for c in loaded.costs] == [1, 2, 3]
    for a, b in zip(ck.model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)
    cal = calibrate(loaded, str(fashion_dir))
    assert len(cal.temperatures) == 3 and cal.thresholds[-1] == 0.0
    assert all(t > 0 for t in cal.temperatures)
    assert cal.target_flops <= loaded.exit_flops()[-1]
    loaded.save(tmp_path / "cal.pt")
    result = evaluate(ckpt.load(tmp_path / "cal.pt"), str(fashion_dir), latency_repeats=1)
    assert [r["exit"] for r in result["anytime"]] == [1, 2, 3]
    assert all(0.0 <= r["top1"] <= 1.0 for r in result["anytime"])
    # The generated classes are easy: the last exit learns them in four short epochs.
    assert result["anytime"][-1]["top1"] > 0.5
    assert all(r["mean_flops"] <= loaded.exit_flops()[-1] for r in result["budgeted"])


def test_resume_continues_from_the_state_file(tiny_config, fashion_dir, tmp_path):
    train(_opts(tiny_config, fashion_dir, tmp_path, epochs=1))
    resumed = train(_opts(tiny_config, fashion_dir, tmp_path, epochs=2, resume=True))
    history = resumed.card.training.history
    assert [h.epoch for h in history] == [1, 2]
    state = torch.load(tmp_path / "tiny.pt.state", weights_only=True)
    assert state["epoch"] == 2


def test_gradient_equilibrium_keeps_outputs_and_rescales_gradients(tiny_config):
    model = MSDNet(tiny_config)
    x = torch.randn(4, 1, 28, 28)
    y = torch.randint(0, 10, (4,))
    plain = forward_train(model, x, False)
    ge = forward_train(model, x, True)
    assert all(torch.allclose(a, b) for a, b in zip(plain, ge))
    grads = []
    for logits in (plain, ge):
        model.zero_grad()
        exit_loss(logits, y, 0.0, 4.0)[0].backward(retain_graph=True)
        grads.append(model.stem.convs[0][0].weight.grad.norm().item())
    assert grads[1] < grads[0]  # the stem no longer sums K gradients
    loss, per_exit = exit_loss(plain, y, 0.5, 4.0)
    assert len(per_exit) == 3 and torch.isfinite(loss)


def test_checkpoint_errors_name_the_problem(tiny_config, tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ckpt.CheckpointError, match="not a readable torch checkpoint"):
        ckpt.load(tmp_path / "text.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ckpt.CheckpointError, match="not an msdnet-serve checkpoint"):
        ckpt.load(tmp_path / "foreign.pt")
    good = ckpt.build(MSDNet(tiny_config), [str(i) for i in range(10)], [0.5], [0.5],
                      validation=ckpt.ValidationSplit("fashion-mnist", 0, 100))
    good.save(tmp_path / "good.pt")
    blob = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated"):
        ckpt.load(tmp_path / "cut.pt")
    data = torch.load(tmp_path / "good.pt", weights_only=True)
    data["config"] = {**TINY, "growth_rate": 6}
    torch.save(data, tmp_path / "mismatch.pt")
    with pytest.raises(ckpt.CheckpointError, match="weights do not match the config"):
        ckpt.load(tmp_path / "mismatch.pt")
    out = subprocess.run([sys.executable, "-m", "model.cli", "info", "--checkpoint", str(tmp_path / "foreign.pt")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "not an msdnet-serve" in out.stderr


def test_train_cli_runs_and_reports(tiny_config, fashion_dir, tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    out = subprocess.run([sys.executable, "-m", "model.cli", "train", "--config", str(cfg), "--data-dir",
                          str(fashion_dir), "--epochs", "1", "--val-size", "100", "--batch-size", "100",
                          "--threads", "1", "--gradient-equilibrium", "--distill", "0.5",
                          "--out", str(tmp_path / "cli.pt")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "epoch 1: val top-1 per exit" in out.stderr
    training = ckpt.load(tmp_path / "cli.pt").card.training
    assert training.gradient_equilibrium is True and training.distill == 0.5
    assert training.command.startswith("msdnet train --config")


# ---- the typed checkpoint and its one conversion to and from the file's dict (issue 23) ----------------------


def _every_field_set(tiny_config) -> ckpt.Checkpoint:
    """A checkpoint with every typed field away from its default."""
    from model.curve import OperatingPoint
    from model.transforms import InputContract

    epochs = tuple(ckpt.EpochRecord(e, (2.5 - e, 2.0 - e, 1.5 - e), (0.1 * e, 0.2 * e, 0.3 * e),
                                    (0.15 * e, 0.25 * e, 0.35 * e), 12.5 * e) for e in (1, 2))
    card = ckpt.ModelCard(source="a test", official_file="/x/model_best.pth.tar", official_args="--data cifar10",
                          command="msdnet import-official", name="tiny", speed_only=True,
                          logit_scales=(0.5, 1.5, 2.5), logit_max=40.0,
                          training=ckpt.TrainingRecord("msdnet train --test", 25.0, 2, 50, 0.1, "step", 3, True,
                                                       0.5, 2, epochs),
                          val_top1=(0.3, 0.5, 0.7))
    curve = (OperatingPoint(1000.0, (0.9, 0.8, 0.0), 0.5, 0.25, (0.5, 0.25, 0.25)),
             OperatingPoint(2000.0, (0.95, 0.85, 0.0), 0.6, 0.5, (0.25, 0.25, 0.5)))
    cal = ckpt.Calibration((1.1, 1.2, 1.3), (0.95, 0.85, 0.0), 2000.0, curve, p=0.5, val_top1=0.6,
                           val_exit_shares=(0.25, 0.25, 0.5), cost="flops_lazy", rule="a rule",
                           images_source="/data/val", images_count=40)
    ck = ckpt.build(MSDNet(tiny_config), [f"c{i}" for i in range(10)], [0.5], [0.25],
                    validation=ckpt.ValidationSplit("fashion-mnist", 7, 123), card=card, calibration=cal)
    ck.transforms = InputContract(1, "shorter", 32, "bicubic", 28, (0.5,), (0.25,), 7).validate()
    return ck


def test_a_checkpoint_round_trip_keeps_every_typed_field(tiny_config, tmp_path):
    ck = _every_field_set(tiny_config)
    ck.save(tmp_path / "all.pt")
    loaded = ckpt.load(tmp_path / "all.pt", calibrated=True)
    assert loaded.path == tmp_path / "all.pt" and ck.path == tmp_path / "all.pt"
    assert loaded.classes == tuple(f"c{i}" for i in range(10))
    assert loaded.transforms == ck.transforms and loaded.transforms.crop_size == 28
    assert loaded.costs == ck.costs and [c.exit for c in loaded.costs] == [1, 2, 3]
    assert loaded.exit_flops(lazy=True) == [c.flops_lazy for c in ck.costs]
    assert loaded.exit_flops(lazy=False) == [c.flops for c in ck.costs]
    assert loaded.validation == ckpt.ValidationSplit("fashion-mnist", 7, 123) and not loaded.validation.from_folder
    assert loaded.calibration == ck.calibration and loaded.calibration.images_count == 40
    assert loaded.calibration.curve[1].exit_shares == (0.25, 0.25, 0.5)
    assert loaded.card == ck.card
    assert loaded.card.training.history[1] == ckpt.EpochRecord(2, (0.5, 0.0, -0.5), (0.2, 0.4, 0.6),
                                                               (0.3, 0.5, 0.7), 25.0)
    assert loaded.config == ck.config
    assert all(torch.equal(a, b) for a, b in zip(ck.model.state_dict().values(), loaded.model.state_dict().values()))
    # the file is the documented plain dict (no pickled code), in the format older code reads
    raw = torch.load(tmp_path / "all.pt", weights_only=True)
    assert set(raw) == {"format", "version", "config", "state_dict", "classes", "transforms", "costs",
                        "validation", "calibration", "card"}
    assert raw["classes"] == [f"c{i}" for i in range(10)]
    assert raw["validation"] == {"dataset": "fashion-mnist", "seed": 7, "size": 123}
    assert raw["costs"][0] == {"exit": 1, "flops": ck.costs[0].flops, "flops_lazy": ck.costs[0].flops_lazy,
                               "flops_official": ck.costs[0].flops_official, "params": ck.costs[0].params}
    assert raw["calibration"]["images"] == {"source": "/data/val", "count": 40}
    assert raw["calibration"]["temperatures"] == [1.1, 1.2, 1.3] and raw["calibration"]["p"] == 0.5
    assert raw["card"]["metrics"] == {"val_top1": [0.3, 0.5, 0.7]} and raw["card"]["speed_only"] is True
    assert raw["card"]["training"]["history"][0] == {"epoch": 1, "train_loss": [1.5, 1.0, 0.5],
                                                     "train_top1": [0.1, 0.2, 0.3], "val_top1": [0.15, 0.25, 0.35],
                                                     "seconds": 12.5}
    assert raw["transforms"]["image_size"] == 28 and raw["transforms"]["resize"] == "bicubic"  # older readers' keys
    assert ckpt.from_dict(raw).card == ck.card  # the reading half alone, on the dict


def test_an_empty_card_and_no_calibration_write_what_they_always_did(tiny_config, tmp_path):
    ck = ckpt.build(MSDNet(tiny_config), [str(i) for i in range(10)], [0.5], [0.5],
                    validation=ckpt.ValidationSplit(ckpt.FOLDER))
    ck.save(tmp_path / "bare.pt")
    raw = torch.load(tmp_path / "bare.pt", weights_only=True)
    assert raw["card"] == {} and raw["calibration"] is None
    assert raw["validation"] == {"dataset": "folder", "seed": None, "size": None}
    loaded = ckpt.load(tmp_path / "bare.pt")
    assert loaded.card == ckpt.ModelCard() and loaded.calibration is None and loaded.validation.from_folder
    with pytest.raises(ckpt.CheckpointError, match="is not calibrated"):
        ckpt.load(tmp_path / "bare.pt", calibrated=True)


def test_resaving_the_shipped_checkpoint_changes_only_its_transforms_keys(tmp_path):
    """The shipped file predates the input contract and the calibration's ``images``: it loads, and saved
    again it is the same dict, but for the contract's fields added beside the old ones."""
    old = torch.load(ckpt.DEFAULT_CHECKPOINT, weights_only=True)
    ck = ckpt.load()
    assert ck.calibration.images_count is None and ck.calibration.images_source is None
    assert ck.calibration.rule == old["calibration"]["rule"] and ck.calibration.val_top1 == 0.931
    assert ck.card.val_top1 == tuple(old["card"]["metrics"]["val_top1"])
    assert len(ck.card.training.history) == 15 and ck.card.training.epochs == 15
    ck.save(tmp_path / "again.pt")
    new = torch.load(tmp_path / "again.pt", weights_only=True)
    assert set(new) == set(old)
    for key in set(old) - {"state_dict", "transforms"}:
        assert new[key] == old[key], key
    assert {k: new["transforms"][k] for k in old["transforms"]} == old["transforms"]
    assert all(torch.equal(old["state_dict"][k], new["state_dict"][k]) for k in old["state_dict"])


def test_a_malformed_part_is_a_checkpoint_error_naming_it(tiny_config, tmp_path):
    _every_field_set(tiny_config).save(tmp_path / "all.pt")
    for key, bad in (("card", {"training": {"command": "x"}}), ("validation", {"seed": 0}),
                     ("costs", [{"exit": 1}] * 3)):
        raw = torch.load(tmp_path / "all.pt", weights_only=True)
        raw[key] = bad
        torch.save(raw, tmp_path / "bad.pt")
        with pytest.raises(ckpt.CheckpointError, match=f"malformed {key} field"):
            ckpt.load(tmp_path / "bad.pt")
