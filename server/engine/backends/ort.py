"""The ``onnxruntime`` backend: one ONNX Runtime CPU session per block and its classifier.

Each step is exported with ``torch.onnx`` with a dynamic batch axis. The multi-scale
state tensors are named inputs and outputs (``x`` for the images, ``s<scale>`` for
incoming feature maps, ``new_s<scale>`` for computed ones, ``logits``), and each
session reads and writes exactly the tensors the eager staged forward reads and
writes at that step (lazy evaluation included; :func:`step_io`). Maps a step neither
reads nor writes but a later step needs are carried past the session unchanged.

It works on eager's state representation, :class:`MSDState` with CPU float32 torch
tensors (handed to ONNX Runtime as numpy views without copying), so a state can go
on in either backend. At load it checks parity
(:func:`server.engine.backends.check_parity`: a random batch through every exit here
and in eager must agree, :func:`compare_logits`: logits within ``PARITY_RTOL`` of the
exit's largest logit, probabilities within ``PARITY_PROB_ATOL``, the same top-1
class), else :class:`BackendError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from model.network import MSDNet, MSDState

from ..parity import ParityFigures
from . import BackendError, check_parity, register_backend

log = logging.getLogger("msdnet.backends")

DEFAULT_CHUNK = 16  # rows per ORT run; see OrtBackend.advance
ONNX_OPSET = 17


@dataclass(frozen=True)
class StepIO:
    """What step k (block k+1 and its classifier) of the staged forward touches.

    Attributes:
        reads: scales read from the incoming state, ascending (-1 = the images).
        writes: scales computed in this step and kept in the outgoing state.
        carries: scales of the incoming state kept unchanged in the outgoing one.
    """

    reads: tuple[int, ...]
    writes: tuple[int, ...]
    carries: tuple[int, ...]


def step_io(model: MSDNet, k: int, lazy: bool) -> StepIO:
    """Inputs, outputs and pass-through maps of step ``k`` (0-based exit index),
    derived from the model's own plan (``MSDNet._steps`` and ``_keep``) so they
    are those of :meth:`MSDNet.advance`."""
    steps, keep = model._steps[lazy], model._keep[lazy]
    before = {-1} if k == 0 else set(keep[k - 1])
    reads: set[int] = set()
    produced: set[int] = set()
    for l, scales in steps[k]:
        if l == 0:
            reads.add(-1)
            produced |= set(range(model.cfg.n_scales))
            continue
        layer = model.layers[l - 1]
        for s in scales:
            reads |= ({s, s - 1} if layer.needs_finer[s] else {s}) - produced
        produced |= set(scales)  # a layer reads the previous layer's maps only
    top = model.cfg.n_scales - 1
    if top not in produced:
        reads.add(top)
    if not reads <= before:
        raise AssertionError(f"step {k} reads {sorted(reads - before)}, absent from the state")  # a plan bug
    return StepIO(tuple(sorted(reads)), tuple(sorted(produced & keep[k])),
                  tuple(sorted((before - produced) & keep[k])))


def _name(scale: int) -> str:
    return "x" if scale == -1 else f"s{scale}"


def _out_name(scale: int) -> str:
    return f"new_s{scale}"  # distinct from the input's name: ONNX names each value once


class _Step(nn.Module):
    """Step k of :meth:`MSDNet.advance` as a module with positional tensors, for
    export: inputs in ``io.reads`` order, outputs ``(logits, *io.writes)``."""

    def __init__(self, model: MSDNet, k: int, lazy: bool, io_: StepIO, pool_inputs: bool = True):
        super().__init__()
        self.model, self.k, self.lazy, self.io, self.pool_inputs = model, k, lazy, io_, pool_inputs

    def _blocked(self, scale: int, channels: int) -> bool:
        """Whether ORT can keep scale's map blocked: it and every piece a layer concatenates
        to it (half the growth at this scale) are multiples of 16 channels (AVX-512's block;
        AVX2's, 8, divides it)."""
        cfg = self.model.cfg
        return scale >= 0 and channels % 16 == 0 and (cfg.growth_rate * cfg.gr_factor[scale] // 2) % 16 == 0

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        if self.pool_inputs:
            # A 1x1 max-pool is the identity, bit for bit. ONNX Runtime's NCHWc layout pass
            # converts it and so tracks the map in its blocked layout, which lets the map's
            # Concat with this step's new channels run blocked too; fed straight from a graph
            # input, that Concat (and the chain after it) would run in NCHW with reorders.
            inputs = tuple(nn.functional.max_pool2d(t, 1, 1) if self._blocked(s, t.shape[1]) else t
                           for s, t in zip(self.io.reads, inputs))
        state = MSDState(dict(zip(self.io.reads, inputs)), self.k, self.lazy)
        logits, new = self.model.advance(state)
        return (logits, *(new.features[s] for s in self.io.writes))


def _model_digest(model: MSDNet, lazy: bool) -> str:
    """Hash of weights, config, plan, opset and the exporter's version: the key of cached ONNX files."""
    h = hashlib.sha256(repr((model.cfg, lazy, ONNX_OPSET, torch.__version__)).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def export_steps(model: MSDNet, directory: str | Path, lazy: bool = True) -> list[Path]:
    """Export one ONNX file per step (block k and its classifier) into ``directory``.

    Each graph has inputs ``x`` (N, C, H, W) or ``s<scale>`` (N, C_s, H_s, W_s) as
    :func:`step_io` lists them, outputs ``logits`` (N, num_classes) and the written
    ``new_s<scale>``; axis 0 (``n``) is dynamic. Uses the TorchScript exporter (opset 17).

    Raises:
        BackendError: when torch.onnx cannot export a step.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    cfg = model.cfg
    paths = []
    with torch.no_grad():
        state = model.start(torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size), lazy=lazy)
        for k in range(model.num_exits):
            io_ = step_io(model, k, lazy)
            args = tuple(state.features[s] for s in io_.reads)
            ins = [_name(s) for s in io_.reads]
            outs = ["logits"] + [_out_name(s) for s in io_.writes]
            path = directory / f"step{k + 1}.onnx"
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    # _Step in eval mode: the exporter restores the wrapper's mode onto the whole tree,
                    # and a model left in training mode would update BatchNorm statistics on the next run.
                    torch.onnx.export(_Step(model, k, lazy, io_).eval(), args, str(path), dynamo=False,
                                      opset_version=ONNX_OPSET, input_names=ins, output_names=outs,
                                      dynamic_axes={n: {0: "n"} for n in ins + outs})
            except Exception as exc:
                raise BackendError(f"ONNX export of step {k + 1} failed: {exc!r}") from exc
            paths.append(path)
            _, state = model.advance(state)
    return paths


def session_options(threads: int, level: str = "all"):
    """ORT session options for a model thread with ``threads`` intra-op threads:
    sequential execution, one inter-op thread, graph optimisation ``level``
    (``basic``, ``extended``, ``all``), no spinning (the runner's thread waits
    between steps; spinning threads would take cores from the event loop), no
    memory patterns and no arena (memory must not creep with varying batch sizes)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Batch sizes vary at every step: ORT's memory patterns (cached per input shape) and
    # its CPU arena (grows in powers of two, never shrinks) kept memory climbing under
    # long load (docs/SOAK.md). Plain malloc instead, which the runner's idle trim returns;
    # blocks ran as fast either way (790 vs 770-800 images/s through 4 blocks, mixed batches).
    so.enable_mem_pattern = False
    so.enable_cpu_mem_arena = False
    so.log_severity_level = 3
    return so


class OrtBackend:
    """ONNX Runtime, one CPU session per step (block k and its classifier).

    Args:
        model: the eager model (exported here, and the parity reference).
        threads: ORT intra-op threads (the runner's ``torch_threads``).
        cache_dir: where the ONNX files go; reused when their key (weights, config,
            opset, torch version) matches. None: a temporary directory, removed
            once the sessions are built.
        lazy: evaluation mode of the states it will be given (the runner: True).
        check: run the parity check (:meth:`check_parity`) at load.

    Attributes:
        device: the CPU (states, inputs and logits are CPU float32 tensors).
        export_s, load_s, check_s: seconds spent exporting (0 on a cache hit),
            building sessions and checking parity.
        parity: the parity check's worst figures (None when not checked).

    Raises:
        BackendError: export failed, or its logits disagree with eager's at some
            exit (:func:`compare_logits`).
    """

    name = "onnxruntime"
    device = torch.device("cpu")

    def __init__(self, model: MSDNet, *, threads: int = 1, cache_dir: str | Path | None = None,
                 lazy: bool = True, check: bool = True, level: str = "all", chunk: int = DEFAULT_CHUNK):
        import onnxruntime as ort

        self.model = model.eval()
        self.lazy = lazy
        self.io = [step_io(model, k, lazy) for k in range(model.num_exits)]
        self.export_s = 0.0
        with contextlib.ExitStack() as stack:
            if cache_dir is None:
                directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="msdnet-onnx-")))
            else:
                directory = Path(cache_dir) / f"onnx-{_model_digest(model, lazy)}"
            paths = [directory / f"step{k + 1}.onnx" for k in range(model.num_exits)]
            if not all(p.is_file() for p in paths):
                t0 = time.perf_counter()
                if cache_dir is None:
                    export_steps(model, directory, lazy)
                else:  # export beside, then rename: a reader never sees half a cache
                    tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
                    export_steps(model, tmp, lazy)
                    if directory.exists():  # another process finished first: use its files
                        shutil.rmtree(tmp)
                    else:
                        tmp.rename(directory)
                self.export_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            so = session_options(threads, level)
            self.sessions = [ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for p in paths]
            self.load_s = time.perf_counter() - t0
        self.inputs = [[_name(s) for s in io_.reads] for io_ in self.io]
        self.outputs = [["logits"] + [_out_name(s) for s in io_.writes] for io_ in self.io]
        self.out_shapes = _output_shapes(model, self.io, lazy)
        self.chunk = chunk
        self.check_s = 0.0
        self.parity: ParityFigures | None = None
        if check:
            t0 = time.perf_counter()
            self.parity = self.check_parity()
            self.check_s = time.perf_counter() - t0
        log.info("onnxruntime backend: export %.2f s, sessions %.2f s, parity check %.2f s",
                 self.export_s, self.load_s, self.check_s)

    def start(self, x: Tensor, lazy: bool = True) -> MSDState:
        """The state before exit 1 of ``x`` (N, C, H, W), CPU float32 (eager's state)."""
        return self.model.start(x, lazy)

    def advance(self, state: MSDState) -> tuple[Tensor, MSDState]:
        """Logits (N, num_classes) of exit ``state.exits_done + 1`` and the new state;
        the input state is left unchanged (outputs are new tensors).

        A batch larger than ``chunk`` runs as consecutive chunks of ``chunk`` rows
        (smaller working set, faster per MAC on CPU); ONNX Runtime reads and
        writes the rows in place through an I/O binding (rows of a C-contiguous
        (N, ...) tensor are contiguous), so nothing is copied or concatenated.

        Raises:
            ValueError: when every exit has already run, or the state's mode is not this backend's.
        """
        k = state.exits_done
        if k >= len(self.sessions):
            raise ValueError(f"state has already passed the last exit ({len(self.sessions)})")
        if state.lazy != self.lazy:
            raise ValueError(f"backend built for lazy={self.lazy}, state has lazy={state.lazy}")
        io_, sess = self.io[k], self.sessions[k]
        n = state.batch_size
        ins = [state.features[s].detach().to(torch.float32).contiguous() for s in io_.reads]
        if n <= self.chunk:  # one plain run: the fewest Python calls (about 100 us less than binding)
            arrays = sess.run(self.outputs[k], {name: t.numpy() for name, t in zip(self.inputs[k], ins)})
            outs = [torch.from_numpy(a) for a in arrays]
        else:
            outs = self._run_chunked(k, ins, n)
        feats = {s: state.features[s] for s in io_.carries}
        feats.update(zip(io_.writes, outs[1:]))
        return outs[0], MSDState(feats, k + 1, state.lazy)

    def _run_chunked(self, k: int, ins: list[Tensor], n: int) -> list[Tensor]:
        sess = self.sessions[k]
        outs = [torch.empty((n, *shape)) for shape in self.out_shapes[k]]
        for j in range(0, n, self.chunk):
            c = min(self.chunk, n - j)
            binding = sess.io_binding()
            for name, t in zip(self.inputs[k], ins):
                binding.bind_input(name, "cpu", 0, np.float32, (c, *t.shape[1:]), t[j].data_ptr())
            for name, t in zip(self.outputs[k], outs):
                binding.bind_output(name, "cpu", 0, np.float32, (c, *t.shape[1:]), t[j].data_ptr())
            sess.run_with_iobinding(binding)
        return outs

    def check_parity(self, batch_size: int = 3, seed: int = 0) -> ParityFigures:
        """Run a random batch (N(0, 1) images, (``batch_size``, C, H, W)) through every
        exit in eager and here and compare the logits
        (:func:`server.engine.backends.check_parity`).

        Returns:
            The worst figures over all exits.

        Raises:
            BackendError: when some exit's logits disagree, naming the exit and the figure.
        """
        return check_parity(self, self.model, lazy=self.lazy, batch_size=batch_size, seed=seed)


def _output_shapes(model: MSDNet, ios: list[StepIO], lazy: bool) -> list[list[tuple[int, ...]]]:
    """Per step, the shape of one sample of each output (logits first), from an eager batch-1 run."""
    cfg = model.cfg
    shapes = []
    with torch.inference_mode():
        state = model.start(torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size), lazy)
        for io_ in ios:
            logits, state = model.advance(state)
            shapes.append([tuple(logits.shape[1:])] + [tuple(state.features[s].shape[1:]) for s in io_.writes])
    return shapes


@register_backend("onnxruntime")
def build(model: MSDNet, *, threads: int, cache_dir: str | Path | None) -> OrtBackend:
    """An :class:`OrtBackend` with ``threads`` intra-op threads, lazy evaluation, checked for parity.

    Raises:
        BackendError: export failed or its logits disagree with eager's.
    """
    return OrtBackend(model, threads=threads, cache_dir=cache_dir)
