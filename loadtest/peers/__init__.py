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
"""

from __future__ import annotations

import base64
import binascii
import json

import numpy as np

MAX_PIXELS = 4096 * 4096  # as loadtest.naive_server; msdnet-serve's default limit


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


class WholeNetwork:
    """The checkpoint's model run through all its blocks; answers from the last exit.

    ``decode(data)`` -> float32 (C, H, W); ``predict(x)`` with x float32
    (N, C, H, W) -> N dicts ``class_id``, ``label``, ``confidence`` (softmax of
    the last exit's logits / its calibrated temperature, as msdnet-serve's runner
    computes it), ``exit`` and ``num_exits`` (both the last exit), ``flops``
    (the last exit's cumulative lazy FLOPs).

    Raises (decode): ``server.errors.ServiceError`` subclasses for bad images.
    """

    def __init__(self, checkpoint: str, torch_threads: int = 1):
        import torch

        from model.checkpoint import load

        torch.set_num_threads(torch_threads)
        ck = load(checkpoint)
        self.torch = torch
        self.model = ck.model.eval()
        self.spec = ck.transforms
        self.classes = list(ck.classes)
        self.num_exits = ck.model.num_exits
        cal = ck.calibration
        self.temperature = cal.temperatures[-1] if cal is not None else 1.0
        self.flops = int(ck.exit_flops(lazy=True)[-1])
        self.warmup()

    def warmup(self, max_batch_size: int = 64) -> None:
        """One forward pass at every batch size 1..max_batch_size: torch's CPU
        convolutions set up their kernels on the first call with a new input
        shape (tens of ms each here), which a dynamic batcher would otherwise pay
        while serving (msdnet-serve warms its block steps likewise)."""
        torch = self.torch
        with torch.inference_mode():
            for n in range(1, max_batch_size + 1):
                self.model(torch.zeros(n, self.spec.channels, self.spec.image_size, self.spec.image_size))

    def decode(self, data: bytes) -> np.ndarray:
        from server.images import decode

        return decode(data, self.spec, MAX_PIXELS)

    def predict(self, x: np.ndarray) -> list[dict]:
        torch = self.torch
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))[-1]
        probs = torch.softmax(logits.double() / self.temperature, dim=1).numpy()
        ks = probs.argmax(axis=1)
        return [{"class_id": int(k), "label": self.classes[int(k)], "confidence": float(p[k]),
                 "exit": self.num_exits, "num_exits": self.num_exits, "flops": self.flops}
                for k, p in zip(ks, probs)]
