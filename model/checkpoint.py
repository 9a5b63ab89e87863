"""The checkpoint: one file that carries everything needed to serve a model.

A plain dict of strings, numbers, lists and tensors, so it loads with
``torch.load(path, weights_only=True)`` (no pickled code):

- ``format`` / ``version``: ``"msdnet-serve-checkpoint"`` / 1.
- ``config``: :class:`~model.config.MSDNetConfig` fields.
- ``state_dict``: the weights.
- ``classes``: class names, indexed by label.
- ``transforms``: the input contract (:class:`model.transforms.InputContract`):
  ``channels``, ``resize_rule``, ``resize_size``, ``interpolation``, ``crop_size``,
  ``mean``, ``std`` (pixel values in [0, 1]), ``background``; plus ``image_size``
  and ``resize`` (the Pillow filter), the only fields of older checkpoints.
- ``costs``: per exit, cumulative ``flops`` and ``flops_lazy`` (multiply-accumulates
  of convs and linears at batch 1, as the MSDNet paper counts them) and ``params``.
- ``validation``: the data set, ``seed`` and ``size`` of the held-out split.
- ``calibration``: per-exit ``temperatures`` and ``thresholds`` (or None before
  ``msdnet calibrate``), and how they were chosen.
- ``card``: metrics and the training command and wall time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import DEFAULT_CHECKPOINT
from .config import MSDNetConfig
from .costs import ExitCost, exit_costs
from .curve import OperatingPoint
from .network import MSDNet
from .transforms import InputContract

FORMAT = "msdnet-serve-checkpoint"
VERSION = 1


class CheckpointError(Exception):
    """A checkpoint file is missing, corrupt, foreign, not calibrated when it must
    be, or does not match its model."""


@dataclass(frozen=True)
class Calibration:
    """What ``msdnet calibrate`` fitted on the validation split (paper §5.2).

    Attributes:
        temperatures: one per exit; confidence = max softmax(logits / T_k).
        thresholds: the default confidence threshold per exit (the last 0.0).
        target_flops: mean FLOPs per image of the default thresholds on the
            validation split (multiply-accumulates, lazy evaluation).
        curve: the budgeted-batch curve (Pareto front), by increasing cost.
        info: everything else recorded (rule, p, images, validation top-1, ...).
    """

    temperatures: tuple[float, ...]
    thresholds: tuple[float, ...]
    target_flops: float
    curve: tuple[OperatingPoint, ...]
    info: dict

    KEYS = ("temperatures", "thresholds", "target_flops", "curve")

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        """Raises KeyError, TypeError or ValueError on a malformed dict."""
        return cls(tuple(float(t) for t in d["temperatures"]), tuple(float(t) for t in d["thresholds"]),
                   float(d["target_flops"]), tuple(OperatingPoint.from_dict(p) for p in d["curve"]),
                   {k: v for k, v in d.items() if k not in cls.KEYS})

    def to_dict(self) -> dict:
        return {**self.info, "temperatures": list(self.temperatures), "thresholds": list(self.thresholds),
                "target_flops": self.target_flops, "curve": [p.to_dict() for p in self.curve]}


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode) and its metadata dict."""

    model: MSDNet
    meta: dict
    path: Path | None = None

    @property
    def config(self) -> MSDNetConfig:
        return self.model.cfg

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def transforms(self) -> InputContract:
        """The input contract (defaults for fields an older checkpoint lacks)."""
        return InputContract.from_transforms(self.meta["transforms"])

    @property
    def calibration(self) -> Calibration | None:
        """The calibration, or None before ``msdnet calibrate``."""
        cal = self.meta.get("calibration")
        return None if cal is None else Calibration.from_dict(cal)

    @property
    def costs(self) -> list[ExitCost]:
        """Per-exit cumulative costs at batch 1 (FLOPs = multiply-accumulates)."""
        return [ExitCost(**c) for c in self.meta["costs"]]

    def exit_flops(self, lazy: bool = True) -> list[int]:
        """Cumulative FLOPs per exit (multiply-accumulates, batch 1)."""
        return [c["flops_lazy" if lazy else "flops"] for c in self.meta["costs"]]

    def save(self, path: str | Path) -> None:
        """Write the file atomically (a temporary file, then a rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save({**self.meta, "state_dict": self.model.state_dict()}, tmp)
        tmp.replace(path)
        self.path = path


def costs_table(costs: list[ExitCost]) -> list[dict]:
    return [{"exit": c.exit, "flops": c.flops, "flops_lazy": c.flops_lazy,
             "flops_official": c.flops_official, "params": c.params} for c in costs]


def build(model: MSDNet, classes: list[str], mean: list[float], std: list[float], *,
          validation: dict, card: dict, calibration: dict | None = None) -> Checkpoint:
    """A checkpoint for a trained model; measures the per-exit costs."""
    cfg = model.cfg
    meta = {
        "format": FORMAT, "version": VERSION,
        "config": cfg.to_dict(),
        "classes": list(classes),
        "transforms": InputContract(cfg.in_channels, "exact", cfg.image_size, "bilinear", None,
                                    tuple(mean), tuple(std)).validate().to_transforms(),
        "costs": costs_table(exit_costs(model)),
        "validation": validation,
        "calibration": calibration,
        "card": card,
    }
    return Checkpoint(model.eval(), meta)


def load(path: str | Path = DEFAULT_CHECKPOINT, calibrated: bool = False) -> Checkpoint:
    """Load and check a checkpoint; the model is returned in eval mode on the CPU.

    Args:
        calibrated: require a calibration (serving needs one).

    Raises:
        CheckpointError: naming the problem when the file is missing, not a torch
            file, corrupt, another program's file, its weights do not match
            its config, its calibration is malformed, or (``calibrated``) it has none.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types on foreign bytes (KeyError, EOFError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable torch checkpoint (corrupt or truncated?): {first}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an msdnet-serve checkpoint (no '{FORMAT}' format tag)")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {data.get('version')}; this code reads {VERSION}")
    missing = [k for k in ("config", "state_dict", "classes", "transforms", "costs") if k not in data]
    if missing:
        raise CheckpointError(f"{path} lacks the field(s) {missing}")
    try:
        cfg = MSDNetConfig.from_dict(data["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} holds a bad config: {exc}") from exc
    model = MSDNet(cfg)
    try:
        model.load_state_dict(data.pop("state_dict"))
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise CheckpointError(f"{path}: weights do not match the config ({'; '.join(lines[1:3])[:300]})") from exc
    if len(data["classes"]) != cfg.num_classes or len(data["costs"]) != cfg.n_blocks:
        raise CheckpointError(f"{path}: {len(data['classes'])} class names and {len(data['costs'])} exit costs "
                              f"for a config of {cfg.num_classes} classes and {cfg.n_blocks} exits")
    try:
        contract = InputContract.from_transforms(data["transforms"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} holds bad transforms: {exc}") from exc
    if contract.image_size != cfg.image_size or contract.channels != cfg.in_channels:
        raise CheckpointError(f"{path}: transforms give {contract.channels}x{contract.image_size}x"
                              f"{contract.image_size} inputs, the network takes {cfg.in_channels}x"
                              f"{cfg.image_size}x{cfg.image_size}")
    cal = data.get("calibration")
    if cal is None and calibrated:
        raise CheckpointError(f"{path} is not calibrated: run 'msdnet calibrate --checkpoint {path} --data folder "
                              "--data-dir DIR' (held-out images in DIR/val/<class>/) first")
    if cal is not None:
        try:
            typed = Calibration.from_dict(cal)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path} holds a malformed calibration ({type(exc).__name__}: {exc})") from exc
        if len(typed.temperatures) != cfg.n_blocks or len(typed.thresholds) != cfg.n_blocks:
            raise CheckpointError(f"{path}: calibration does not have one temperature and threshold per exit")
    return Checkpoint(model.eval(), data, path)
