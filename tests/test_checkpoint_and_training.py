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
    assert loaded.meta["card"]["training"]["command"] == "msdnet train --test"
    assert len(loaded.meta["card"]["training"]["history"]) == 4
    assert loaded.transforms.image_size == 28 and loaded.transforms.channels == 1
    assert [c["exit"] for c in loaded.meta["costs"]] == [1, 2, 3]
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
    history = resumed.meta["card"]["training"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]
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
                      validation={"dataset": "fashion-mnist", "seed": 0, "size": 100}, card={})
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
    card = ckpt.load(tmp_path / "cli.pt").meta["card"]["training"]
    assert card["gradient_equilibrium"] is True and card["distill"] == 0.5
    assert card["command"].startswith("msdnet train --config")
