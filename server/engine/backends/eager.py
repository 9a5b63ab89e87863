"""The ``torch`` backend: torch eager, :meth:`MSDNet.advance` itself (the reference)."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from model.network import MSDNet, MSDState

from ..parity import ParityFigures
from . import check_parity, register_backend


class TorchBackend:
    """Torch eager on the model's own device (the CPU as loaded): the reference
    every other backend is checked against.

    Attributes:
        device: the device of the model's parameters.
    """

    name = "torch"

    def __init__(self, model: MSDNet):
        self.model = model.eval()
        self.device = next(model.parameters()).device

    def start(self, x: Tensor, lazy: bool = True) -> MSDState:
        """The state before exit 1 of ``x`` (N, C, H, W) on :attr:`device`."""
        return self.model.start(x, lazy)

    def advance(self, state: MSDState) -> tuple[Tensor, MSDState]:
        """Logits (N, num_classes) of exit ``state.exits_done + 1`` and the new state.

        Raises:
            ValueError: when every exit has already run.
        """
        return self.model.advance(state)

    def check_parity(self, batch_size: int = 3, seed: int = 0) -> ParityFigures:
        """Against itself: all figures 0 (see :func:`server.engine.backends.check_parity`)."""
        return check_parity(self, self.model, batch_size=batch_size, seed=seed)


@register_backend("torch")
def build(model: MSDNet, *, threads: int, cache_dir: str | Path | None) -> TorchBackend:
    """The reference needs no parity check; ``threads`` are set by the runner
    (``torch.set_num_threads`` on each model thread), ``cache_dir`` is unused."""
    return TorchBackend(model)

