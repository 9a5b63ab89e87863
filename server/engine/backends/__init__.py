"""Block backends: what runs one step of the staged forward, behind one interface.

The runner advances a batch of images one exit at a time (``model.network``:
:meth:`MSDNet.start` and :meth:`MSDNet.advance` on an :class:`MSDState`). A
:class:`Backend` does those two things on its device, and can check that it
gives torch eager's answers (:func:`check_parity`). The runner knows nothing
else about it: it puts the input batch on :attr:`Backend.device`, keeps the
states there (selecting and joining their rows between steps), and brings each
exit's logits back to host numpy with :func:`to_host`.

Backends register themselves by name (:func:`register_backend`); every module of
this package is imported with it, so a new backend (say CUDA) is one new file
here whose factory carries ``@register_backend("cuda")``. The built-in ones:

- ``torch`` (:mod:`.eager`): torch eager, ``MSDNet.advance`` itself (the reference).
- ``onnxruntime`` (:mod:`.ort`): one ONNX Runtime CPU session per block and its
  classifier, checked against eager when built (a disagreeing export stops the
  server from starting).

FLOPs (multiply-accumulates of convs and linears, MSDNet paper convention) are
not counted here: a backend runs the same nodes as eager, so the checkpoint's
per-exit costs hold for every backend.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from model.network import MSDNet, MSDState

from ..parity import ParityFigures, compare_logits

log = logging.getLogger("msdnet.backends")


class BackendError(Exception):
    """A backend cannot be built or disagrees with torch eager at load."""


@runtime_checkable
class Backend(Protocol):
    """What the runner needs of a block backend.

    Attributes:
        name: the name it is registered under (``MSDNET_BACKEND``).
        device: where its states and logits live; the runner puts input batches here.
    """

    name: str
    device: torch.device

    def start(self, x: Tensor, lazy: bool = True) -> MSDState:
        """The state before exit 1 of a batch ``x`` (N, C, H, W), float32 images
        normalised by the checkpoint's contract, on :attr:`device`; ``lazy``: lazy
        evaluation (paper §4), which the runner always uses."""
        ...

    def advance(self, state: MSDState) -> tuple[Tensor, MSDState]:
        """Run the next block and its classifier: logits (N, num_classes) of exit
        ``state.exits_done + 1`` and the new state, both on :attr:`device`; the input
        state is left unchanged.

        Raises:
            ValueError: when every exit has already run (or the state is not one it can advance).
        """
        ...

    def check_parity(self, batch_size: int = 3, seed: int = 0) -> ParityFigures:
        """Compare a random batch's logits at every exit with torch eager's
        (:func:`check_parity`); the worst figures over the exits.

        Raises:
            BackendError: when some exit disagrees, naming it.
        """
        ...


BackendFactory = Callable[..., Backend]
"""``factory(model, *, threads, cache_dir) -> Backend``: ``model`` the eager network (eval
mode, on the CPU as :func:`model.checkpoint.load` gives it, and the parity reference: a
backend for another device moves a copy); ``threads`` intra-op threads of each model
thread; ``cache_dir`` a folder for compiled artefacts or None. It returns a backend
ready to serve: one that is not torch eager has passed :func:`check_parity`, else
raises :class:`BackendError`."""

F = TypeVar("F", bound=BackendFactory)
_FACTORIES: dict[str, BackendFactory] = {}


def register_backend(name: str) -> Callable[[F], F]:
    """Decorator: register ``factory`` (a :data:`BackendFactory`) under ``name``.

    Raises:
        ValueError: when ``name`` is already registered.
    """
    def register(factory: F) -> F:
        if name in _FACTORIES:
            raise ValueError(f"backend {name!r} is already registered (by {_FACTORIES[name].__module__})")
        _FACTORIES[name] = factory
        return factory
    return register


def unregister_backend(name: str) -> None:
    """Forget the backend ``name`` (a no-op when it is not registered)."""
    _FACTORIES.pop(name, None)


def backend_names() -> tuple[str, ...]:
    """The registered names, sorted."""
    return tuple(sorted(_FACTORIES))


def make_backend(name: str, model: MSDNet, *, threads: int = 1, cache_dir: str | Path | None = None) -> Backend:
    """The backend ``name`` for ``model`` (see :data:`BackendFactory`).

    Raises:
        ValueError: for an unknown name, naming the registered ones.
        BackendError: when the backend cannot be built or fails its parity check.
    """
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown backend {name!r}; one of {', '.join(backend_names())}")
    return factory(model, threads=threads, cache_dir=cache_dir)


def to_host(t: Tensor) -> np.ndarray:
    """A backend's output (e.g. logits (N, num_classes)) as a host numpy array of the
    same shape and dtype: a view of a CPU tensor, a copy from another device."""
    return t.detach().cpu().numpy()


def check_parity(backend: Backend, reference: MSDNet, *, lazy: bool = True, batch_size: int = 3,
                 seed: int = 0) -> ParityFigures:
    """Run a random batch (N(0, 1) images of shape (``batch_size``, C, H, W), seeded)
    through every exit in ``reference`` (torch eager, on its own device) and in
    ``backend`` (on :attr:`Backend.device`), and compare each exit's logits on the
    host with :func:`server.engine.parity.compare_logits`. Logs one line with the worst
    figures ("<name> parity with torch eager over K exits: ...").

    Returns:
        The worst figures over all exits.

    Raises:
        BackendError: when some exit's logits disagree, naming the exit and the figure.
    """
    cfg = reference.cfg
    x = torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size,
                    generator=torch.Generator().manual_seed(seed))
    home = next(reference.parameters()).device
    figures = []
    with torch.inference_mode():
        ref, mine = reference.start(x.to(home), lazy), backend.start(x.to(backend.device), lazy)
        for k in range(reference.num_exits):
            a, ref = reference.advance(ref)
            b, mine = backend.advance(mine)
            fig = compare_logits(a.cpu(), b.cpu())
            if not fig.ok:
                raise BackendError(f"{backend.name} disagrees with torch eager at exit {k + 1}: {fig.describe()}; "
                                   f"refusing to serve with this backend")
            figures.append(fig)
    worst = ParityFigures(max(f.relative for f in figures), max(f.absolute for f in figures),
                          max(f.probability for f in figures), 0)
    log.info("%s parity with torch eager over %d exits: %s", backend.name, len(figures), worst.describe())
    return worst


def _import_all() -> None:
    """Import every module of this package: each registers its backends."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_import_all()
