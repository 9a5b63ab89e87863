"""MSDNet with a staged forward: real early exit and lazy evaluation.

Read beside Huang et al., ICLR 2018, Figure 2 and §4. The network is a grid of
feature maps: layer l (0 = the stem, 1..L = MSD layers across all blocks) at
scale s (0 = finest, S-1 = coarsest). Node (l, s) is computed from (l-1, s) by a
regular conv and, when it exists, from (l-1, s-1) by a strided conv; both
outputs are concatenated to the input (dense connectivity). Transition layers
and scale pruning reduce channels and drop the finest scale. Exit k's classifier
reads only the coarsest scale after block k.

:class:`MSDState` holds the newest feature map of each scale, so exit k+1
continues from exit k with nothing recomputed, and a batch of states can be split
or joined by sample. With ``lazy=True`` (paper §4, "lazy evaluation") a step
computes only the nodes that exit k's classifier depends on; the rest of block k
(the finer scales of its last layers) is computed when exit k+1 is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import LayerSpec, MSDNetConfig


class ConvBNReLU(nn.Sequential):
    """Conv (no bias), BatchNorm, ReLU: the official ``ConvBasic``."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class BottleneckConv(nn.Sequential):
    """Optional 1x1 bottleneck to ``min(c_in, bn_width * c_out)`` channels, then a
    3x3 conv with stride 1 (regular) or 2 (strided); the official ``ConvBN``."""

    def __init__(self, c_in: int, c_out: int, stride: int, bottleneck: bool, bn_width: int):
        layers: list[nn.Module] = []
        c_inner = c_in
        if bottleneck:
            c_inner = min(c_in, bn_width * c_out)
            layers += [nn.Conv2d(c_in, c_inner, 1, bias=False), nn.BatchNorm2d(c_inner), nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(c_inner, c_out, 3, stride, padding=1, bias=False),
                   nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        super().__init__(*layers)


class ScaleUnit(nn.Module):
    """Output of one MSD layer at one scale (paper Figure 2).

    ``forward(same, finer)``: ``same`` is (N, c_same, H, W) from the previous
    layer at this scale, ``finer`` is (N, c_finer, 2H, 2W) at the next finer scale
    or None. Returns (N, c_same + c_new, H, W): the input concatenated with a
    regular conv of ``same`` and, when ``finer`` is used, a strided conv of it
    (each then adds ``c_new / 2`` channels).
    """

    def __init__(self, c_same: int, c_finer: int | None, c_new: int, bottleneck: bool,
                 bn_same: int, bn_finer: int):
        super().__init__()
        if c_finer is None:
            self.strided = None
            self.regular = BottleneckConv(c_same, c_new, 1, bottleneck, bn_same)
        else:
            self.strided = BottleneckConv(c_finer, c_new // 2, 2, bottleneck, bn_finer)
            self.regular = BottleneckConv(c_same, c_new // 2, 1, bottleneck, bn_same)

    def forward(self, same: Tensor, finer: Tensor | None = None) -> Tensor:
        if self.strided is None:
            return torch.cat([same, self.regular(same)], dim=1)
        return torch.cat([same, self.strided(finer), self.regular(same)], dim=1)


class MSDLayer(nn.Module):
    """One MSD layer: a :class:`ScaleUnit` per output scale and, after a scale is
    pruned, a transition (1x1 ConvBNReLU per scale) compressing channels.

    ``scales`` lists the absolute output scales (0 = finest); ``needs_finer[s]``
    says whether scale s reads scale s-1 of the previous layer.
    """

    def __init__(self, cfg: MSDNetConfig, spec: LayerSpec):
        super().__init__()
        s_all, gr, bn = cfg.n_scales, cfg.gr_factor, cfg.bn_factor
        first = s_all - spec.out_scales
        discard = spec.in_scales > spec.out_scales
        self.scales = list(range(first, s_all))
        self.needs_finer = {s: (s > first or discard) for s in self.scales}
        c_in, c_new = spec.in_channels, cfg.growth_rate
        self.units = nn.ModuleList(
            ScaleUnit(c_in * gr[s], c_in * gr[s - 1] if self.needs_finer[s] else None, c_new * gr[s],
                      cfg.bottleneck, bn[s], bn[s - 1] if self.needs_finer[s] else bn[s])
            for s in self.scales)
        c_mid = c_in + c_new
        self.transition = nn.ModuleList(
            ConvBNReLU(c_mid * gr[s], spec.out_channels * gr[s], kernel=1) for s in self.scales
        ) if spec.transition else None

    def forward_scale(self, s: int, prev: dict[int, Tensor]) -> Tensor:
        """Node (l, s) from the previous layer's maps ``prev`` (scale -> tensor)."""
        i = s - self.scales[0]
        out = self.units[i](prev[s], prev[s - 1] if self.needs_finer[s] else None)
        return self.transition[i](out) if self.transition is not None else out


class Stem(nn.Module):
    """First layer: one map per scale (paper Figure 2, first column).

    CIFAR: 3x3 conv stride 1 at scale 0, then a 3x3 stride-2 conv per coarser
    scale. ImageNet: 7x7 stride-2 conv (with bias), BN, ReLU, 3x3 stride-2 max-pool,
    then 3x3 stride-2 convs.
    """

    def __init__(self, cfg: MSDNetConfig):
        super().__init__()
        widths = [cfg.n_channels * g for g in cfg.gr_factor]
        if cfg.stem == "cifar":
            first: nn.Module = ConvBNReLU(cfg.in_channels, widths[0])
        else:
            first = nn.Sequential(
                nn.Conv2d(cfg.in_channels, widths[0], 7, 2, 3), nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        self.convs = nn.ModuleList([first] + [ConvBNReLU(widths[s - 1], widths[s], stride=2)
                                              for s in range(1, cfg.n_scales)])

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        """(N, C_in, H, W) -> {scale: (N, n_channels * gr_factor[s], H_s, W_s)}."""
        out = {}
        for s, conv in enumerate(self.convs):
            x = conv(x)
            out[s] = x
        return out


class Classifier(nn.Module):
    """Exit head on the coarsest scale: two 3x3 stride-2 ConvBNReLU, average pool,
    linear. (N, c_in, H, W) -> logits (N, num_classes)."""

    def __init__(self, c_in: int, c_mid: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(ConvBNReLU(c_in, c_mid, stride=2), ConvBNReLU(c_mid, c_mid, stride=2),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.linear = nn.Linear(c_mid, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.features(x))


@dataclass
class MSDState:
    """Features of a batch part-way through the network.

    Attributes:
        features: scale -> (N, C_s, H_s, W_s), the newest computed map of each
            scale (finer scales may lag behind under lazy evaluation).
        exits_done: exits already evaluated (0 before the first block).
        lazy: whether the state was advanced with lazy evaluation.
    """

    features: dict[int, Tensor]
    exits_done: int
    lazy: bool

    @property
    def batch_size(self) -> int:
        return next(iter(self.features.values())).shape[0]

    def select(self, index: Tensor | list[int]) -> MSDState:
        """The samples at ``index`` (a list or 1-D long/bool tensor)."""
        if isinstance(index, list):
            index = torch.tensor(index, dtype=torch.long)
        return MSDState({s: f[index] for s, f in self.features.items()}, self.exits_done, self.lazy)

    @staticmethod
    def cat(states: list[MSDState]) -> MSDState:
        """Join states at the same exit and mode into one batch.

        Raises:
            ValueError: when the states are at different exits or modes.
        """
        first = states[0]
        if any(st.exits_done != first.exits_done or st.lazy != first.lazy for st in states):
            raise ValueError("can only join states at the same exit and evaluation mode")
        return MSDState({s: torch.cat([st.features[s] for st in states]) for s in first.features},
                        first.exits_done, first.lazy)


class MSDNet(nn.Module):
    """Multi-Scale Dense Network (Huang et al., ICLR 2018).

    ``forward(x)`` maps images (N, in_channels, image_size, image_size) to a list
    of ``n_blocks`` logits tensors (N, num_classes), one per exit. For real early
    exit use :meth:`start` and :meth:`advance`.
    """

    def __init__(self, cfg: MSDNetConfig):
        super().__init__()
        self.cfg = cfg.validate()
        plan = cfg.layer_plan()
        self.stem = Stem(cfg)
        self.blocks = nn.ModuleList(
            nn.ModuleList(MSDLayer(cfg, spec) for spec in plan if spec.block == b) for b in range(cfg.n_blocks))
        c_mid_default = 128 if cfg.stem == "cifar" else None
        self.classifiers = nn.ModuleList()
        for b in range(cfg.n_blocks):
            last = [spec for spec in plan if spec.block == b][-1]
            c_in = last.out_channels * cfg.gr_factor[-1]
            c_mid = cfg.classifier_channels or c_mid_default or c_in
            self.classifiers.append(Classifier(c_in, c_mid, cfg.num_classes))
        self.layers: list[MSDLayer] = [layer for block in self.blocks for layer in block]
        self.last_layer = [sum(cfg.layers_per_block()[: b + 1]) for b in range(cfg.n_blocks)]
        self._steps = {lazy: self._build_steps(lazy) for lazy in (False, True)}
        self._keep = {lazy: self._scales_kept(self._steps[lazy]) for lazy in (False, True)}
        self.reset_parameters()

    @property
    def num_exits(self) -> int:
        return self.cfg.n_blocks

    def reset_parameters(self) -> None:
        """He initialisation as the paper intends (the official code's
        ``_init_weights`` never reaches the modules inside a block): conv weights
        ~ N(0, 2 / (k*k*c_out)), BN weight 1 and bias 0, linear bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def _build_steps(self, lazy: bool) -> list[list[tuple[int, list[int]]]]:
        """For each exit k, the nodes to compute when advancing from exit k-1:
        a list of (layer index, scales), layers ascending (layer 0 = stem)."""
        s_top = self.cfg.n_scales - 1
        done: set[tuple[int, int]] = set()
        steps = []
        for last in self.last_layer:
            needed = {(0, s) for s in range(s_top + 1)}
            for l in range(1, last + 1):
                scales = self.layers[l - 1].scales
                # Lazy: only ancestors of the coarsest map of layer `last`.
                keep = [s for s in scales if not lazy or s >= s_top - (last - l)]
                needed |= {(l, s) for s in keep}
            new = sorted(needed - done)
            done |= needed
            by_layer: dict[int, list[int]] = {}
            for l, s in new:
                by_layer.setdefault(l, []).append(s)
            steps.append(sorted(by_layer.items()))
        return steps

    def _scales_kept(self, steps: list[list[tuple[int, list[int]]]]) -> list[set[int]]:
        """For each exit k, the scales a later step still reads or writes; the
        state after exit k drops the others to free memory."""
        keep = []
        for k in range(len(steps)):
            used: set[int] = {self.cfg.n_scales - 1}
            for later in steps[k + 1:]:
                for l, scales in later:
                    for s in scales:
                        used |= {s, s - 1} if self.layers[l - 1].needs_finer[s] else {s}
            keep.append(used)
        return keep

    def start(self, x: Tensor, lazy: bool = True) -> MSDState:
        """A state before block 1 for images ``x`` (N, in_channels, H, W)."""
        return MSDState({-1: x}, 0, lazy)

    def advance(self, state: MSDState) -> tuple[Tensor, MSDState]:
        """Run the next block and its classifier.

        Returns logits (N, num_classes) of exit ``state.exits_done + 1`` and the
        new state; the input state is left unchanged.

        Raises:
            ValueError: when every exit has already run.
        """
        k = state.exits_done
        if k >= self.num_exits:
            raise ValueError(f"state has already passed the last exit ({self.num_exits})")
        feats = dict(state.features)
        for l, scales in self._steps[state.lazy][k]:
            if l == 0:
                feats.update(self.stem(feats.pop(-1)))
                continue
            layer = self.layers[l - 1]
            new = {s: layer.forward_scale(s, feats) for s in scales}
            feats.update(new)
        feats = {s: f for s, f in feats.items() if s in self._keep[state.lazy][k]}
        logits = self.classifiers[k](feats[self.cfg.n_scales - 1])
        return logits, MSDState(feats, k + 1, state.lazy)

    def forward(self, x: Tensor) -> list[Tensor]:
        """All exits, block by block (training and reference path): (N, C, H, W)
        -> list of ``n_blocks`` tensors (N, num_classes)."""
        feats = self.stem(x)
        out = []
        for block, head in zip(self.blocks, self.classifiers):
            for layer in block:
                feats = {s: layer.forward_scale(s, feats) for s in layer.scales}
            out.append(head(feats[self.cfg.n_scales - 1]))
        return out


def count_params(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def exit_params(model: MSDNet) -> list[int]:
    """Cumulative parameters per exit: stem, blocks 1..k and classifiers 1..k."""
    total, out = count_params(model.stem), []
    for block, head in zip(model.blocks, model.classifiers):
        total += count_params(block) + count_params(head)
        out.append(total)
    return out
