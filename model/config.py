"""MSDNet hyper-parameters, named after the paper and the official code.

Source: Huang et al., "Multi-Scale Dense Networks for Resource Efficient Image
Classification", ICLR 2018, §4 and Appendix A; the official PyTorch code's
argument names (nBlocks, base, step, stepmode, nChannels, growthRate, grFactor,
bnFactor, prune, reduction, bottleneck), written here in snake_case.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class LayerSpec:
    """One MSD layer of the network, counted across blocks.

    Attributes:
        index: 1-based position among all MSD layers (the stem is layer 0).
        block: 0-based block the layer belongs to.
        in_scales: number of scales the layer reads (the coarsest ones).
        out_scales: number of scales it writes; ``in_scales - out_scales`` is 0 or 1.
        in_channels: channel unit on input (multiplied by ``gr_factor[s]`` at scale s).
        out_channels: channel unit after the layer and its transition, if any.
        transition: whether a transition layer (1x1 conv compressing by
            ``reduction``) follows this layer.
    """

    index: int
    block: int
    in_scales: int
    out_scales: int
    in_channels: int
    out_channels: int
    transition: bool


@dataclass
class MSDNetConfig:
    """Architecture of one MSDNet.

    Field names follow the paper's hyper-parameters (official code's names in
    snake_case). ``classifier_channels`` is the one addition: the width of the
    two convolutions in each classifier (None: 128 with the CIFAR stem, the
    input width with the ImageNet stem, as in the official code).

    Raises:
        ValueError: from :meth:`validate` when a field is out of range.
    """

    n_blocks: int = 5
    base: int = 4
    step: int = 4
    step_mode: str = "even"
    n_channels: int = 32
    growth_rate: int = 16
    gr_factor: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    bn_factor: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    prune: str = "max"
    reduction: float = 0.5
    bottleneck: bool = True
    stem: str = "imagenet"
    in_channels: int = 3
    num_classes: int = 1000
    image_size: int = 224
    classifier_channels: int | None = None

    @property
    def n_scales(self) -> int:
        """Number of scales S (the length of ``gr_factor``)."""
        return len(self.gr_factor)

    def layers_per_block(self) -> list[int]:
        """MSD layers in each block: ``base``, then ``step`` ("even") or
        ``step * i + 1`` ("lin_grow", i = 1 for block 2), as in the official code."""
        steps = [self.base]
        for i in range(1, self.n_blocks):
            steps.append(self.step if self.step_mode == "even" else self.step * i + 1)
        return steps

    def layer_plan(self) -> list[LayerSpec]:
        """Scales and channels of every MSD layer, with scale pruning (paper §4,
        "network reduction"; the official code's ``prune`` rules)."""
        steps = self.layers_per_block()
        n_all, s = sum(steps), self.n_scales
        plan: list[LayerSpec] = []
        n_in, l = self.n_channels, 0
        for block, n_layers in enumerate(steps):
            for _ in range(n_layers):
                l += 1
                if self.prune == "min":
                    in_sc = min(s, n_all - l + 2)
                    out_sc = min(s, n_all - l + 1)
                else:
                    interval = math.ceil(n_all / s)
                    in_sc = s - (max(0, l - 2) // interval)
                    out_sc = s - ((l - 1) // interval)
                n_out = n_in + self.growth_rate
                if self.prune == "max":
                    transition = in_sc > out_sc and self.reduction > 0
                else:
                    transition = self.reduction > 0 and l in (n_all // 3, 2 * n_all // 3)
                if transition:
                    n_out = math.floor(self.reduction * n_out)
                plan.append(LayerSpec(l, block, in_sc, out_sc, n_in, n_out, transition))
                n_in = n_out
        return plan

    def validate(self) -> MSDNetConfig:
        """Check every field; returns self.

        Raises:
            ValueError: naming the first field that is out of range.
        """
        positive = ("n_blocks", "base", "n_channels", "growth_rate", "in_channels",
                    "num_classes", "image_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config field {name!r} must be a positive integer, got {value!r}")
        if not isinstance(self.step, int) or self.step < (1 if self.n_blocks > 1 else 0):
            raise ValueError(f"config field 'step' must be a positive integer, got {self.step!r}")
        if self.step_mode not in ("even", "lin_grow"):
            raise ValueError(f"config field 'step_mode' must be 'even' or 'lin_grow', got {self.step_mode!r}")
        if self.prune not in ("max", "min"):
            raise ValueError(f"config field 'prune' must be 'max' or 'min', got {self.prune!r}")
        if self.stem not in ("cifar", "imagenet"):
            raise ValueError(f"config field 'stem' must be 'cifar' or 'imagenet', got {self.stem!r}")
        if not self.gr_factor or len(self.bn_factor) != len(self.gr_factor):
            raise ValueError("config fields 'gr_factor' and 'bn_factor' must be non-empty lists of equal length")
        if any((not isinstance(f, int)) or f < 1 for f in [*self.gr_factor, *self.bn_factor]):
            raise ValueError("config fields 'gr_factor' and 'bn_factor' must hold positive integers")
        if not 0.0 <= self.reduction <= 1.0:
            raise ValueError(f"config field 'reduction' must lie in [0, 1], got {self.reduction!r}")
        if self.classifier_channels is not None and self.classifier_channels < 1:
            raise ValueError("config field 'classifier_channels' must be a positive integer or null")
        return self

    def to_dict(self) -> dict:
        """Plain dict of the fields (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MSDNetConfig:
        """Build and validate a config from a dict of field names.

        Raises:
            ValueError: on an unknown field or a value out of range.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        data = dict(data)
        for name in ("gr_factor", "bn_factor"):
            if name in data:
                data[name] = list(data[name])
        return cls(**data).validate()

    @classmethod
    def from_json(cls, path: str | Path) -> MSDNetConfig:
        """Read a config from a JSON file holding an object of field names.

        Raises:
            ValueError: when the file is not JSON or holds a bad config.
            FileNotFoundError: when the file does not exist.
        """
        text = Path(path).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of config fields")
        return cls.from_dict(data)


def _cifar(**kw) -> MSDNetConfig:
    base = dict(n_channels=16, growth_rate=6, gr_factor=[1, 2, 4], bn_factor=[1, 2, 4],
                stem="cifar", image_size=32, in_channels=3)
    base.update(kw)
    return MSDNetConfig(**base)


def _imagenet(step: int) -> MSDNetConfig:
    return MSDNetConfig(n_blocks=5, base=step, step=step, step_mode="even", n_channels=32,
                        growth_rate=16, gr_factor=[1, 2, 4, 4], bn_factor=[1, 2, 4, 4],
                        stem="imagenet", num_classes=1000, image_size=224)


PRESETS: dict[str, MSDNetConfig] = {
    # Paper §5.1 / official README: CIFAR-10 anytime prediction.
    "cifar10-anytime": _cifar(n_blocks=10, step_mode="even", step=2, base=4, num_classes=10),
    # Paper §5.2: CIFAR-100 budgeted batch classification.
    "cifar100-budgeted": _cifar(n_blocks=5, step_mode="lin_grow", step=1, base=1, num_classes=100),
    # Paper §5.1: ImageNet, the two step sizes of the official README.
    "imagenet-step4": _imagenet(4),
    "imagenet-step7": _imagenet(7),
    # Ours: 28x28 grey images at scales 28/14/7; 4 exits; narrow bottlenecks and
    # 64-channel classifiers keep training within 90 minutes on 2 CPU cores.
    "fashion-mnist": MSDNetConfig(
        n_blocks=4, base=2, step=2, step_mode="even", n_channels=16, growth_rate=8,
        gr_factor=[1, 2, 4], bn_factor=[1, 1, 2], prune="max", reduction=0.5,
        bottleneck=True, stem="cifar", in_channels=1, num_classes=10, image_size=28,
        classifier_channels=64),
}


def preset(name: str) -> MSDNetConfig:
    """A fresh copy of a named preset.

    Raises:
        KeyError: naming the known presets when ``name`` is not one.
    """
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return MSDNetConfig.from_dict(PRESETS[name].to_dict())
