"""MSDNet: multi-scale dense network with real early exit (Huang et al., ICLR 2018).

Submodules: ``config`` (hyper-parameters, presets), ``network`` (the modules and
the staged forward), ``costs`` (per-exit FLOPs), ``data``, ``train``,
``calibration`` (temperatures and thresholds; numpy only), ``evaluate``,
``checkpoint``. The names below are imported on first use, so that numpy-only
parts (``calibration``) load without torch.
"""

from importlib import import_module
from pathlib import Path

# The shipped Fashion-MNIST checkpoint; here, not in ``checkpoint``, so that the
# server's torch-free processes (HTTP workers) can name it.
DEFAULT_CHECKPOINT = Path(__file__).parent / "weights" / "fashion-mnist.pt"

_EXPORTS = {"MSDNetConfig": "config", "PRESETS": "config", "preset": "config", "MSDNet": "network",
            "MSDState": "network"}
__all__ = [*_EXPORTS, "DEFAULT_CHECKPOINT"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
