"""Parity of a backend with torch eager: are two exits' logits the same answer?

Used by :func:`server.engine.backends.check_parity`, which a backend other than
torch eager runs at load (a disagreeing export stops the server from starting),
and by tests. Figures are relative to the logits' size, so the rule holds for
float32 at any logit scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Parity is judged relative to the logits' size: float32 rounding of another conv
# algorithm moves a logit by about 1e-6 of the exit's largest one (measured: 3-7e-7
# on CIFAR-100 MSDNet-7, 0.8-1.1e-6 on ImageNet MSDNet-5, at largest logits 1 to
# 130), whatever the scale, while a wrong export (concat order, BN eps, a lost
# weight) moves them by 1e-2 to 1 of it. An absolute bound refused correct exports
# of confident networks (issue 22: 1.14e-5 at logits of 40).
PARITY_RTOL = 2e-5
PARITY_FLOOR = 1e-6  # absolute slack for exits whose logits are all near 0
PARITY_PROB_ATOL = 1e-4  # softmax probabilities (measured differences: up to 5.5e-6)


@dataclass(frozen=True)
class ParityFigures:
    """How far one backend's logits are from the reference's.

    Attributes:
        relative: max |difference| / max(|reference logit|) over the batch (NaN if not finite).
        absolute: max |difference| of the logits.
        probability: max |difference| of the softmax probabilities.
        top1_mismatches: images whose top-1 class differs although the reference's
            top-2 gap exceeds the allowed logit difference (a near-tie may flip).
    """

    relative: float
    absolute: float
    probability: float
    top1_mismatches: int

    @property
    def ok(self) -> bool:
        """Within ``PARITY_RTOL`` and ``PARITY_PROB_ATOL`` with no top-1 mismatch (False on NaN)."""
        return (self.relative <= PARITY_RTOL and self.probability <= PARITY_PROB_ATOL
                and self.top1_mismatches == 0)

    def describe(self) -> str:
        return (f"logits {self.relative:.3g} of the largest (allowed {PARITY_RTOL:g}; {self.absolute:.3g} absolute), "
                f"probabilities {self.probability:.3g} (allowed {PARITY_PROB_ATOL:g}), "
                f"{self.top1_mismatches} top-1 mismatches")


def compare_logits(ref: Tensor, got: Tensor) -> ParityFigures:
    """Compare logits (N, num_classes) of one exit against the reference's.

    The allowed logit difference is ``PARITY_RTOL`` x the largest |reference logit|
    (+ ``PARITY_FLOOR``): float32 rounding scales with the logits, a wrong export
    does not hide behind it.

    Raises:
        ValueError: when the shapes differ.
    """
    if ref.shape != got.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref.shape)} and {tuple(got.shape)}")
    ref, got = ref.double(), got.double()
    absolute = float((ref - got).abs().max())
    scale = max(float(ref.abs().max()), PARITY_FLOOR / PARITY_RTOL)
    if not (absolute == absolute and scale == scale):  # NaN anywhere
        return ParityFigures(float("nan"), float("nan"), float("nan"), 0)
    probability = float((ref.softmax(1) - got.softmax(1)).abs().max())
    allowed = PARITY_RTOL * scale
    top2 = ref.topk(min(2, ref.shape[1]), dim=1).values
    clear = (top2[:, 0] - top2[:, -1]) > 2 * allowed if ref.shape[1] > 1 else torch.ones(len(ref), dtype=torch.bool)
    mismatches = int(((ref.argmax(1) != got.argmax(1)) & clear).sum())
    return ParityFigures(absolute / scale, absolute, probability, mismatches)
