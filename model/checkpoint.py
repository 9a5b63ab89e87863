"""The checkpoint: one file that carries everything needed to serve a model.

In memory a :class:`Checkpoint` is typed throughout: the model, class names,
:class:`~model.transforms.InputContract`, per-exit :class:`~model.costs.ExitCost`,
the :class:`ValidationSplit`, the :class:`Calibration` and the :class:`ModelCard`.
On disk it is a plain dict of strings, numbers, lists and tensors, so it loads
with ``torch.load(path, weights_only=True)`` (no pickled code). The two meet in
this module only: each part's ``from_dict``/``to_dict`` (the contract's
``from_transforms``/``to_transforms``), :meth:`Checkpoint.to_dict` and :func:`load`.
The dict's fields:

- ``format`` / ``version``: ``"msdnet-serve-checkpoint"`` / 1.
- ``config``: :class:`~model.config.MSDNetConfig` fields.
- ``state_dict``: the weights.
- ``classes``: class names, indexed by label.
- ``transforms``: the input contract (:class:`model.transforms.InputContract`):
  ``channels``, ``resize_rule``, ``resize_size``, ``interpolation``, ``crop_size``,
  ``mean``, ``std`` (pixel values in [0, 1]), ``background``; plus ``image_size``
  and ``resize`` (the Pillow filter), the only fields of older checkpoints.
- ``costs``: per exit, ``exit``, cumulative ``flops``, ``flops_lazy`` and
  ``flops_official`` (multiply-accumulates of convs and linears at batch 1, as the
  MSDNet paper counts them) and ``params``.
- ``validation``: the data set, ``seed`` and ``size`` of the held-out split.
- ``calibration``: per-exit ``temperatures`` and ``thresholds`` (or None before
  ``msdnet calibrate``), how they were chosen, the curve (each point with its
  per-exit agreement with the last exit and top-1) and the mean confidence per exit.
- ``card``: where the weights came from: ``training`` (the command, options, wall
  time and per-epoch history) and ``metrics``, or the official file and arguments.

Fields this code does not know are ignored when reading and not written back.
"""

# long file: the checkpoint's typed parts and the one conversion between them and the file's dict
# (issue 23: no other module reads the dict by key), kept together so the format reads in one place.
from __future__ import annotations

from dataclasses import dataclass, field
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
FOLDER = "folder"  # ValidationSplit.dataset of a model whose validation images are the user's class folders


class CheckpointError(Exception):
    """A checkpoint file is missing, corrupt, foreign, not calibrated when it must
    be, or does not match its model."""


def _floats(values) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _optional(values) -> tuple[float, ...] | None:
    return None if values is None else tuple(values)


@dataclass(frozen=True)
class ValidationSplit:
    """The held-out images that ``msdnet calibrate`` uses by default (never the test split).

    Attributes:
        dataset: a data set of :data:`model.data.DATASETS` whose training split was cut,
            or :data:`FOLDER`: the user's class folders (``--data-dir``; imported models).
        seed: seed of the random cut (:func:`model.data.validation_split`); None for a folder.
        size: images held out of the training split; None for a folder.
    """

    dataset: str
    seed: int | None = None
    size: int | None = None

    @property
    def from_folder(self) -> bool:
        """Whether the validation images are the user's class folders."""
        return self.dataset == FOLDER

    @classmethod
    def from_dict(cls, d: dict) -> ValidationSplit:
        """Raises KeyError (no ``dataset``) or TypeError on a malformed dict."""
        return cls(d["dataset"], d.get("seed"), d.get("size"))

    def to_dict(self) -> dict:
        """The file's ``validation`` dict."""
        return {"dataset": self.dataset, "seed": self.seed, "size": self.size}


@dataclass(frozen=True)
class EpochRecord:
    """One training epoch (``msdnet train``).

    Attributes:
        epoch: 1-based.
        train_loss, train_top1: per exit, means over the epoch's training batches
            (cross-entropy in nats; top-1 a fraction).
        val_top1: per exit, top-1 fraction on the validation split after the epoch.
        seconds: wall time of the epoch.
    """

    epoch: int
    train_loss: tuple[float, ...]
    train_top1: tuple[float, ...]
    val_top1: tuple[float, ...]
    seconds: float

    @classmethod
    def from_dict(cls, d: dict) -> EpochRecord:
        """Raises KeyError or TypeError on a malformed dict."""
        return cls(d["epoch"], tuple(d["train_loss"]), tuple(d["train_top1"]), tuple(d["val_top1"]), d["seconds"])

    def to_dict(self) -> dict:
        """One entry of the file's ``card.training.history``."""
        return {"epoch": self.epoch, "train_loss": list(self.train_loss), "train_top1": list(self.train_top1),
                "val_top1": list(self.val_top1), "seconds": self.seconds}


@dataclass(frozen=True)
class TrainingRecord:
    """How ``msdnet train`` made the weights: the exact command and its options.

    Attributes:
        command: the command line as typed ("" when trained from Python).
        wall_time_s: seconds of training, summed over resumed runs.
        epochs, batch_size, lr, schedule, seed: the options (``lr`` the initial rate;
            ``schedule`` "cosine" or "step").
        gradient_equilibrium: IMTA gradient equilibrium on or off.
        distill: IMTA distillation weight in [0, 1].
        threads: torch CPU threads.
        history: one record per epoch, in order.
    """

    command: str
    wall_time_s: float
    epochs: int
    batch_size: int
    lr: float
    schedule: str
    seed: int
    gradient_equilibrium: bool
    distill: float
    threads: int
    history: tuple[EpochRecord, ...]

    @classmethod
    def from_dict(cls, d: dict) -> TrainingRecord:
        """Raises KeyError or TypeError on a malformed dict."""
        return cls(d["command"], d["wall_time_s"], d["epochs"], d["batch_size"], d["lr"], d["schedule"], d["seed"],
                   d["gradient_equilibrium"], d["distill"], d["threads"],
                   tuple(EpochRecord.from_dict(h) for h in d["history"]))

    def to_dict(self) -> dict:
        """The file's ``card.training`` dict."""
        return {"command": self.command, "wall_time_s": self.wall_time_s, "epochs": self.epochs,
                "batch_size": self.batch_size, "lr": self.lr, "schedule": self.schedule, "seed": self.seed,
                "gradient_equilibrium": self.gradient_equilibrium, "distill": self.distill, "threads": self.threads,
                "history": [h.to_dict() for h in self.history]}


@dataclass(frozen=True)
class ModelCard:
    """Where the weights came from (torchvision's weights ``meta``); every field optional.

    Attributes:
        source: one line for people (e.g. "official MSDNet-PyTorch checkpoint").
        official_file, official_args: the imported file and the official code's
            training arguments (``msdnet import-official``, ``loadtest.realsize``).
        command: the command that imported the weights.
        name: a short name (``loadtest.realsize``'s size, e.g. "cifar100-7").
        speed_only: random weights, for timing only: answers are meaningless.
        logit_scales: per exit, the factor applied to the last linear of a speed-only
            network; ``logit_max`` the largest logit it was scaled to.
        training: how ``msdnet train`` made the weights.
        val_top1: per exit, validation top-1 fraction of the weights kept (the best
            epoch at the last exit); ``metrics.val_top1`` on disk.
    """

    source: str | None = None
    official_file: str | None = None
    official_args: str | None = None
    command: str | None = None
    name: str | None = None
    speed_only: bool = False
    logit_scales: tuple[float, ...] | None = None
    logit_max: float | None = None
    training: TrainingRecord | None = None
    val_top1: tuple[float, ...] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> ModelCard:
        """Raises KeyError or TypeError on a malformed dict."""
        training, metrics = d.get("training"), d.get("metrics") or {}
        return cls(d.get("source"), d.get("official_file"), d.get("official_args"), d.get("command"), d.get("name"),
                   bool(d.get("speed_only", False)), _optional(d.get("logit_scales")), d.get("logit_max"),
                   None if training is None else TrainingRecord.from_dict(training), _optional(metrics.get("val_top1")))

    def to_dict(self) -> dict:
        """Only the fields that are set (an empty card is ``{}``)."""
        out: dict = {k: v for k, v in (("source", self.source), ("official_file", self.official_file),
                                       ("official_args", self.official_args), ("command", self.command),
                                       ("name", self.name)) if v is not None}
        if self.speed_only:
            out["speed_only"] = True
        if self.logit_scales is not None:
            out["logit_scales"] = list(self.logit_scales)
        if self.logit_max is not None:
            out["logit_max"] = self.logit_max
        if self.training is not None:
            out["training"] = self.training.to_dict()
        if self.val_top1 is not None:
            out["metrics"] = {"val_top1": list(self.val_top1)}
        return out


@dataclass(frozen=True)
class Calibration:
    """What ``msdnet calibrate`` fitted on the validation split (paper §5.2).

    FLOPs are mean multiply-accumulates of convs and linears per image (MSDNet paper
    convention), cumulative to each image's exit, with lazy evaluation.

    Attributes:
        temperatures: one per exit; confidence = max softmax(logits / T_k).
        thresholds: the default confidence threshold per exit (the last 0.0).
        target_flops: mean FLOPs per image of the default thresholds on the validation split.
        curve: the budgeted-batch curve (Pareto front), by increasing cost.
        p: the geometric prior's parameter of the default thresholds.
        val_top1: validation top-1 fraction at the default thresholds.
        val_exit_shares: fraction of validation images leaving at each exit there.
        cost: the per-exit cost the figures use (``"flops_lazy"``).
        rule: how the default was chosen, for people.
        images_source, images_count: where the calibration images came from (data set
            name or folder) and how many (``images`` on disk).
        mean_confidence: per exit, the mean temperature-scaled confidence of every
            calibration image there (each image evaluated at every exit); the live
            figure at exit 1, which every image reaches, is comparable to it.
        The optional fields are None in calibrations written before they existed; the
        curve's points carry per-exit agreement and accuracy (:class:`model.curve.OperatingPoint`).
    """

    temperatures: tuple[float, ...]
    thresholds: tuple[float, ...]
    target_flops: float
    curve: tuple[OperatingPoint, ...]
    p: float | None = None
    val_top1: float | None = None
    val_exit_shares: tuple[float, ...] | None = None
    cost: str | None = None
    rule: str | None = None
    images_source: str | None = None
    images_count: int | None = None
    mean_confidence: tuple[float, ...] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        """Raises KeyError, TypeError or ValueError on a malformed dict."""
        images = d.get("images") or {}
        return cls(_floats(d["temperatures"]), _floats(d["thresholds"]), float(d["target_flops"]),
                   tuple(OperatingPoint.from_dict(p) for p in d["curve"]), d.get("p"), d.get("val_top1"),
                   _optional(d.get("val_exit_shares")), d.get("cost"), d.get("rule"), images.get("source"),
                   images.get("count"), _optional(d.get("mean_confidence")))

    def to_dict(self) -> dict:
        """The optional fields only when set."""
        out = {"temperatures": list(self.temperatures), "thresholds": list(self.thresholds)}
        extra = {"p": self.p, "target_flops": self.target_flops, "val_top1": self.val_top1,
                 "val_exit_shares": None if self.val_exit_shares is None else list(self.val_exit_shares),
                 "cost": self.cost, "rule": self.rule,
                 "mean_confidence": None if self.mean_confidence is None else list(self.mean_confidence)}
        out.update((k, v) for k, v in extra.items() if v is not None)
        if self.images_source is not None or self.images_count is not None:
            out["images"] = {"source": self.images_source, "count": self.images_count}
        out["curve"] = [p.to_dict() for p in self.curve]
        return out


def _cost_from_dict(c: dict) -> ExitCost:
    return ExitCost(c["exit"], c["flops"], c["flops_lazy"], c["flops_official"], c["params"])


def costs_table(costs) -> list[dict]:
    """Per-exit costs as the checkpoint (and JSON reports) write them: ``exit``, cumulative
    ``flops``, ``flops_lazy``, ``flops_official`` (multiply-accumulates, batch 1) and ``params``."""
    return [{"exit": c.exit, "flops": c.flops, "flops_lazy": c.flops_lazy,
             "flops_official": c.flops_official, "params": c.params} for c in costs]


@dataclass
class Checkpoint:
    """A loaded (or built) checkpoint: the model in eval mode and its typed metadata.

    Attributes:
        model: the network; takes (N, C, H, W) float32 images normalised by ``transforms``.
        classes: class names, indexed by label (``config.num_classes`` of them).
        transforms: what an image goes through before the network.
        costs: per exit, cumulative cost at batch 1 (FLOPs = multiply-accumulates of
            convs and linears, MSDNet paper convention).
        validation: the held-out split (None only in a file that never recorded one).
        calibration: None before ``msdnet calibrate``.
        card: where the weights came from.
        path: the file it was loaded from or last saved to.
    """

    model: MSDNet
    classes: tuple[str, ...]
    transforms: InputContract
    costs: tuple[ExitCost, ...]
    validation: ValidationSplit | None = None
    calibration: Calibration | None = None
    card: ModelCard = field(default_factory=ModelCard)
    path: Path | None = None

    @property
    def config(self) -> MSDNetConfig:
        """The network's architecture (``model.cfg``)."""
        return self.model.cfg

    def exit_flops(self, lazy: bool = True) -> list[int]:
        """Cumulative FLOPs per exit (multiply-accumulates, batch 1), with or without lazy evaluation."""
        return [c.flops_lazy if lazy else c.flops for c in self.costs]

    def check_target(self, target: float | None) -> None:
        """Refuse a FLOPs target (per request, multiply-accumulates, lazy evaluation) this
        network cannot hold on average; None (the calibration's own) passes.

        Raises:
            CheckpointError: ``target`` is below exit 1's cost or above the last exit's.
        """
        lo, hi = self.exit_flops()[0], self.exit_flops()[-1]
        if target is not None and not lo <= target <= hi:
            raise CheckpointError(f"target_flops {target:.6g} is outside what this network "
                                  f"can spend per request: between exit 1's cost ({lo} FLOPs) and the last exit's "
                                  f"({hi} FLOPs; multiply-accumulates, lazy evaluation)")

    def to_dict(self) -> dict:
        """The file's dict (module docstring), weights included: what :meth:`save` writes."""
        out = {"format": FORMAT, "version": VERSION, "config": self.config.to_dict(), "classes": list(self.classes),
               "transforms": self.transforms.to_transforms(), "costs": costs_table(self.costs)}
        if self.validation is not None:
            out["validation"] = self.validation.to_dict()
        out["calibration"] = None if self.calibration is None else self.calibration.to_dict()
        out["card"] = self.card.to_dict()
        out["state_dict"] = self.model.state_dict()
        return out

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_dict` atomically (a temporary file, then a rename); sets :attr:`path`.

        Raises:
            OSError: when the folder or file cannot be written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.to_dict(), tmp)
        tmp.replace(path)
        self.path = path


def build(model: MSDNet, classes: list[str], mean: list[float], std: list[float], *,
          validation: ValidationSplit, card: ModelCard | None = None,
          calibration: Calibration | None = None) -> Checkpoint:
    """A checkpoint for a trained model; measures the per-exit costs (:func:`model.costs.exit_costs`).

    The input contract resizes to the config's ``image_size`` exactly (bilinear, no
    crop) and normalises by ``mean``/``std`` (per channel, pixel values in [0, 1]);
    assign ``transforms`` afterwards for another contract.

    Raises:
        ValueError: ``mean``/``std`` do not give one value per input channel, or a
            class name appears twice (labels by name and folders would be ambiguous).
    """
    twice = sorted({c for c in classes if list(classes).count(c) > 1})
    if twice:
        raise ValueError(f"class names must be distinct; given more than once: {twice[:10]}")
    cfg = model.cfg
    contract = InputContract.exact(cfg.image_size, cfg.in_channels, mean, std)
    return Checkpoint(model.eval(), tuple(classes), contract, tuple(exit_costs(model)), validation, calibration,
                      card or ModelCard())


def from_dict(data: dict, where: str = "checkpoint") -> Checkpoint:
    """The reading half of the file format: a :class:`Checkpoint` (model in eval mode,
    on the CPU as the tensors are) from a loaded file's dict; ``data`` is not changed.

    Raises:
        CheckpointError: naming ``where`` and the problem: not this program's dict, another
            version, a missing field, a bad config, weights that do not match it, class names
            or costs not one per class or exit, bad transforms, or a malformed part.
    """
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        hint = ""
        official = ("module.", "blocks.", "classifier")  # the official code's keys (DataParallel or not)
        if isinstance(data, dict) and ("state_dict" in data or any(str(k).startswith(official) for k in data)):
            hint = ("; a checkpoint of the official MSDNet-PyTorch code? import it first: msdnet import-official "
                    f"{where} --official-args '<its main.py arguments>' --out model.pt (docs/BRING_YOUR_OWN.md)")
        raise CheckpointError(f"{where} is not an msdnet-serve checkpoint (no '{FORMAT}' format tag){hint}")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{where} has checkpoint version {data.get('version')}; this code reads {VERSION}")
    missing = [k for k in ("config", "state_dict", "classes", "transforms", "costs") if k not in data]
    if missing:
        raise CheckpointError(f"{where} lacks the field(s) {missing}")
    try:
        cfg = MSDNetConfig.from_dict(data["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where} holds a bad config: {exc}") from exc
    model = MSDNet(cfg)
    try:
        model.load_state_dict(data["state_dict"])
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise CheckpointError(f"{where}: weights do not match the config ({'; '.join(lines[1:3])[:300]})") from exc
    if len(data["classes"]) != cfg.num_classes or len(data["costs"]) != cfg.n_blocks:
        raise CheckpointError(f"{where}: {len(data['classes'])} class names and {len(data['costs'])} exit costs "
                              f"for a config of {cfg.num_classes} classes and {cfg.n_blocks} exits")
    try:
        contract = InputContract.from_transforms(data["transforms"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where} holds bad transforms: {exc}") from exc
    if contract.image_size != cfg.image_size or contract.channels != cfg.in_channels:
        raise CheckpointError(f"{where}: transforms give {contract.channels}x{contract.image_size}x"
                              f"{contract.image_size} inputs, the network takes {cfg.in_channels}x"
                              f"{cfg.image_size}x{cfg.image_size}")
    calibration = None
    if data.get("calibration") is not None:
        try:
            calibration = Calibration.from_dict(data["calibration"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where} holds a malformed calibration ({type(exc).__name__}: {exc})") from exc
        if len(calibration.temperatures) != cfg.n_blocks or len(calibration.thresholds) != cfg.n_blocks:
            raise CheckpointError(f"{where}: calibration does not have one temperature and threshold per exit")
    parts = {}
    for name, read in (("costs", lambda d: tuple(_cost_from_dict(c) for c in d)),
                       ("validation", ValidationSplit.from_dict), ("card", ModelCard.from_dict)):
        try:
            parts[name] = None if data.get(name) is None else read(data[name])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{where} holds a malformed {name} field ({type(exc).__name__}: {exc})") from exc
    return Checkpoint(model.eval(), tuple(data["classes"]), contract, parts["costs"], parts["validation"],
                      calibration, parts["card"] or ModelCard())


def load(path: str | Path = DEFAULT_CHECKPOINT, calibrated: bool = False) -> Checkpoint:
    """Load and check a checkpoint file; the model is returned in eval mode on the CPU
    (a backend for another device moves its own copy: ``server.engine.backends``).

    Args:
        calibrated: require a calibration (serving needs one).

    Raises:
        CheckpointError: naming the problem when the file is missing, not a torch
            file, corrupt, another program's file, its weights do not match
            its config, a part is malformed (:func:`from_dict`), or (``calibrated``) it has no calibration.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types on foreign bytes (KeyError, EOFError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        first = f"{type(exc).__name__}: {first}" if first else type(exc).__name__  # a bare '101' said nothing
        raise CheckpointError(f"{path} is not a readable torch checkpoint (corrupt or truncated?): {first}") from exc
    ck = from_dict(data, str(path))
    if ck.calibration is None and calibrated:
        raise CheckpointError(f"{path} is not calibrated: run 'msdnet calibrate --checkpoint {path} --data folder "
                              "--data-dir DIR' (held-out images in DIR/val/<class>/) first")
    ck.path = path
    return ck
