"""Peer servers for the capacity comparison of issue 12: the same checkpoint's
whole network behind general-purpose serving stacks (LitServe, Ray Serve).

Both peers use :class:`WholeNetwork` for everything but the serving stack: the
image decoding of msdnet-serve (``server.images.decode`` with the checkpoint's
input contract), all blocks of the model, the last exit's answer with that
exit's calibrated temperature. Cost per image: the last exit's FLOPs
(multiply-accumulates of convs and linears, MSDNet paper convention, cumulative,
21.14 MFLOPs for the shipped Fashion-MNIST model).

Both accept what msdnet-serve's ``POST /classify`` accepts for one image: a raw
``image/*`` body, or JSON ``{"image": base64}``.

Runtime (``runtime``): ``torch`` (eager, the reference) or ``onnxruntime``: the
whole network as one ONNX graph (``MSDNet.forward``'s last exit, exported at
start, dynamic batch), ONNX Runtime's default CPU session with ``threads``
intra-op threads, what a speed-minded user deploys.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np

MAX_PIXELS = 4096 * 4096  # as loadtest.naive_server; msdnet-serve's default limit
RUNTIMES = ("torch", "onnxruntime")
WARMUP_MACS = 20e9  # torch warm-up: every batch size 1..64 while the whole pass costs less than this


class BadRequest(ValueError):
    """The body is not an image msdnet-serve would accept (maps to HTTP 400)."""


def image_bytes(body: bytes, content_type: str) -> bytes:
    """The image file in a request body: ``body`` itself for ``image/*``, the
    base64 ``image`` field for ``application/json``.

    Raises:
        BadRequest: JSON without a valid base64 ``image``, or another content type.
    """
    ctype = content_type.split(";")[0].strip().lower()
    if ctype.startswith("image/"):
        return body
    if ctype == "application/json":
        try:
            return json_image(json.loads(body))
        except ValueError as exc:
            raise BadRequest(f"expected JSON {{'image': base64}}: {exc}") from exc
    raise BadRequest(f"content type {ctype or '(none)'!r} is not accepted; send image/* or application/json")


def json_image(obj) -> bytes:
    """The image file in a parsed JSON body ``{"image": base64}``.

    Raises:
        BadRequest: not an object, no ``image`` field, or not valid base64.
    """
    try:
        return base64.b64decode(obj["image"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise BadRequest(f"expected JSON {{'image': base64}}: {exc!r}") from exc


def export_onnx(model, path: str | Path, last_only: bool = True) -> list[str]:
    """Export ``model``'s forward (every block) as one ONNX graph at ``path``: input
    ``x`` float32 (N, C, H, W), outputs ``exit<K>`` (``last_only``) or ``exit1..exitK``
    logits (N, classes), N dynamic; opset 17, TorchScript exporter. Returns the output names."""
    import torch

    class _Last(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)[-1]

    cfg = model.cfg
    k = model.num_exits
    names = [f"exit{k}"] if last_only else [f"exit{i + 1}" for i in range(k)]
    net = _Last(model) if last_only else model
    x = torch.randn(1, cfg.in_channels, cfg.image_size, cfg.image_size)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=names, dynamic_axes={"x": {0: "n"}, **{n: {0: "n"} for n in names}})
    model.eval()
    return names


def ort_session(path: str | Path, threads: int):
    """ONNX Runtime's default CPU session for ``path`` with ``threads`` intra-op
    threads and one inter-op thread (memory arena and patterns at their defaults)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class WholeNetwork:
    """The checkpoint's model run through all its blocks; answers from the last exit.

    ``decode(data)`` -> float32 (C, H, W); ``predict(x)`` with x float32
    (N, C, H, W) -> N dicts ``class_id``, ``label``, ``confidence`` (softmax of
    the last exit's logits / its calibrated temperature, as msdnet-serve's runner
    computes it), ``exit`` and ``num_exits`` (both the last exit), ``flops``
    (the last exit's cumulative lazy FLOPs).

    Raises (decode): ``server.errors.ServiceError`` subclasses for bad images.
    """

    def __init__(self, checkpoint: str, torch_threads: int = 1, runtime: str = "torch"):
        import torch

        from model.checkpoint import load

        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, not {runtime!r}")
        torch.set_num_threads(torch_threads)
        ck = load(checkpoint)
        self.runtime = runtime
        self.torch = torch
        self.model = ck.model.eval()
        self.spec = ck.transforms
        self.classes = list(ck.classes)
        self.num_exits = ck.model.num_exits
        cal = ck.calibration
        self.temperature = cal.temperatures[-1] if cal is not None else 1.0
        self.flops = int(ck.exit_flops(lazy=True)[-1])
        self.session = None
        if runtime == "onnxruntime":
            with tempfile.TemporaryDirectory(prefix="msdnet-peer-onnx-") as tmp:
                path = Path(tmp) / "msdnet.onnx"
                self.output = export_onnx(self.model, path)[0]
                self.session = ort_session(path, torch_threads)
        self.warmup()

    def warmup(self, max_batch_size: int = 64) -> None:
        """One forward pass at batch sizes 1..max_batch_size: torch's CPU
        convolutions set up their kernels on the first call with a new input
        shape (tens of ms each here), which a dynamic batcher would otherwise pay
        while serving (msdnet-serve warms its block steps likewise). A network
        whose pass over all sizes would cost more than :data:`WARMUP_MACS`
        multiply-accumulates (ImageNet size) is warmed at powers of two only."""
        sizes = range(1, max_batch_size + 1)
        if self.flops * max_batch_size * (max_batch_size + 1) / 2 > WARMUP_MACS:
            sizes = [n for n in (1, 2, 4, 8, 16) if n <= max_batch_size]
        for n in sizes:
            self.logits(np.zeros((n, self.spec.channels, self.spec.image_size, self.spec.image_size), np.float32))

    def logits(self, x: np.ndarray):
        """The last exit's logits of ``x`` float32 (N, C, H, W): a torch tensor (N, classes)."""
        torch = self.torch
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.session is not None:
            return torch.from_numpy(self.session.run([self.output], {"x": x})[0])
        with torch.inference_mode():
            return self.model(torch.from_numpy(x))[-1]

    def decode(self, data: bytes) -> np.ndarray:
        from server.images import decode

        return decode(data, self.spec, MAX_PIXELS)

    def predict(self, x: np.ndarray) -> list[dict]:
        torch = self.torch
        logits = self.logits(x)
        probs = torch.softmax(logits.double() / self.temperature, dim=1).numpy()
        ks = probs.argmax(axis=1)
        return [{"class_id": int(k), "label": self.classes[int(k)], "confidence": float(p[k]),
                 "exit": self.num_exits, "num_exits": self.num_exits, "flops": self.flops}
                for k, p in zip(ks, probs)]
