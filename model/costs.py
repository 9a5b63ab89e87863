"""Per-exit cost accounting with torch's own flop counter.

Unit: FLOPs = multiply-accumulate operations of convolutions and linear layers,
as the MSDNet paper counts them. ``torch.utils.flop_counter`` counts two FLOPs
per multiply-accumulate, so its totals are halved. Figures are cumulative (exit
k includes blocks 1..k and classifiers 1..k) and at batch size 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .network import MSDNet, exit_params

aten = torch.ops.aten


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# The official MSDNet counter (op_counter.py) also counts one op per ReLU output
# element, one per pooled input element (kernel x output) and the linear bias.
# Registered on torch's counter as 2 per op, since totals are halved.
def _relu_ops(*args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(out_shape)


def _pool_ops(x_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    # max_pool2d_with_indices returns (values, indices): count the values only.
    out = out_shape[0] if isinstance(out_shape[0], (tuple, list, torch.Size)) else out_shape
    kh, kw = (kernel_size * 2)[:2] if len(kernel_size) == 1 else kernel_size
    return 2 * _numel(out) * kh * kw


def _adaptive_pool_ops(x_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(x_shape)


def _addmm_ops(bias_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    m, k = a_shape
    n = b_shape[1]
    return 2 * (m * k * n + m * n)


OFFICIAL_CONVENTION = {
    aten.relu: _relu_ops, aten.relu_: _relu_ops,
    aten.max_pool2d_with_indices: _pool_ops, aten.avg_pool2d: _pool_ops,
    aten._adaptive_avg_pool2d: _adaptive_pool_ops, aten.addmm: _addmm_ops,
    # A global average pool (output 1x1) runs as aten.mean; the official
    # AvgPool2d(2) on the head's 2x2 map counts the same 4 ops per channel.
    aten.mean: _adaptive_pool_ops,
}


@dataclass(frozen=True)
class ExitCost:
    """Cumulative cost of reaching one exit at batch size 1.

    Attributes:
        exit: 1-based exit index.
        flops: multiply-accumulates, all nodes of blocks 1..k (the official counter's figure).
        flops_lazy: multiply-accumulates with lazy evaluation (paper §4): finer-scale
            work that only later exits need is deferred.
        flops_official: the official MSDNet counter's figure, which adds ReLU,
            pooling and linear-bias ops to ``flops`` (about 1% more).
        params: parameters of the stem, blocks 1..k and classifiers 1..k.
    """

    exit: int
    flops: int
    flops_lazy: int
    flops_official: int
    params: int


def _staged_macs(model: MSDNet, lazy: bool, official: bool = False) -> list[int]:
    cfg = model.cfg
    x = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size)
    state = model.start(x, lazy=lazy)
    total, out = 0, []
    with torch.no_grad():
        for _ in range(model.num_exits):
            counter = FlopCounterMode(display=False, custom_mapping=OFFICIAL_CONVENTION if official else None)
            with counter:
                _, state = model.advance(state)
            total += counter.get_total_flops() // 2
            out.append(total)
    return out


def exit_costs(model: MSDNet) -> list[ExitCost]:
    """Measure every exit's cumulative FLOPs (with and without lazy evaluation)
    and parameters by running the staged forward under ``FlopCounterMode``."""
    was_training = model.training
    model.eval()
    try:
        eager, lazy = _staged_macs(model, False), _staged_macs(model, True)
        official = _staged_macs(model, False, official=True)
    finally:
        model.train(was_training)
    params = exit_params(model)
    return [ExitCost(k + 1, eager[k], lazy[k], official[k], params[k]) for k in range(model.num_exits)]
