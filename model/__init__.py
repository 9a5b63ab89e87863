"""MSDNet: multi-scale dense network with real early exit (Huang et al., ICLR 2018)."""

from .config import PRESETS, MSDNetConfig, preset
from .network import MSDNet, MSDState

__all__ = ["PRESETS", "MSDNet", "MSDNetConfig", "MSDState", "preset"]
