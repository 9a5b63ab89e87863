"""Peer 1: LitServe serving the checkpoint's whole network with its own dynamic batching.

A ``LitAPI`` (decode_request / batch / predict / unbatch / encode_response) on
``POST /classify``, ``max_batch_size=64``, ``batch_timeout=0.002`` s: LitServe's
API server processes (uvicorn + FastAPI) parse HTTP and hand requests over a
queue to its inference worker processes, which decode the images
(``server.images.decode``, as msdnet-serve), batch them and run all blocks
(answer: the last exit, 21.14 MFLOPs per image as multiply-accumulates of convs
and linears, MSDNet paper convention). Readiness: ``GET /health``.

LitServe parses a request body as JSON (or a form), so a raw ``image/*`` body is
wrapped as JSON ``{"image": base64}`` by a small ASGI middleware in the API
process (a few microseconds for a Fashion-MNIST PNG of about 400 bytes).

    python3 -m loadtest.peers.litserve_app --port 8002 --workers 1 --api-servers 2 --threads 1 [--runtime onnxruntime]

``--runtime onnxruntime``: each inference worker runs the whole network as one
ONNX Runtime graph (``loadtest.peers.WholeNetwork``), ``--threads`` intra-op threads.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys

import litserve as ls
import numpy as np
from fastapi import HTTPException

from model.checkpoint import DEFAULT_CHECKPOINT

from . import BadRequest, WholeNetwork, json_image

MAX_BATCH_SIZE = 64
BATCH_TIMEOUT_S = 0.002


class RawImageAsJSON:
    """ASGI middleware: a request whose content type is ``image/*`` reaches
    LitServe as ``application/json`` ``{"image": base64 of the body}``; other
    requests pass unchanged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers", [])
        ctype = next((v for k, v in headers if k == b"content-type"), b"").split(b";")[0].strip().lower()
        if not ctype.startswith(b"image/"):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = json.dumps({"image": base64.b64encode(b"".join(chunks)).decode("ascii")}).encode()
        new_headers = [(k, v) for k, v in headers if k not in (b"content-type", b"content-length")]
        new_headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app({**scope, "headers": new_headers}, replay, send)


class MSDNetLitAPI(ls.LitAPI):
    """The whole network behind LitServe (see the module docstring).

    decode_request: JSON ``{"image": base64}`` -> float32 (C, H, W) (400 on a bad
    image); batch: -> (N, C, H, W); predict: -> N answer dicts
    (:meth:`loadtest.peers.WholeNetwork.predict`); unbatch: the list itself.
    """

    def __init__(self, checkpoint: str = str(DEFAULT_CHECKPOINT), torch_threads: int = 1, runtime: str = "torch"):
        super().__init__(max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S, api_path="/classify")
        self.checkpoint, self.torch_threads, self.runtime = checkpoint, torch_threads, runtime

    def setup(self, device):
        self.net = WholeNetwork(self.checkpoint, self.torch_threads, self.runtime)

    def decode_request(self, request):
        try:
            return self.net.decode(json_image(request))
        except BadRequest as exc:
            raise HTTPException(400, str(exc)) from exc
        except Exception as exc:  # server.errors.ServiceError subclasses: bad, unsupported or huge images
            status = getattr(exc, "status", None)
            if status is None:
                raise
            raise HTTPException(status, str(exc)) from exc

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, x):
        return self.net.predict(x)

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return output


def build_server(checkpoint: str, workers: int, threads: int, fast_queue: bool = False,
                 runtime: str = "torch") -> ls.LitServer:
    """A LitServer on CPU with ``workers`` inference worker processes, each with
    ``threads`` intra-op threads of ``runtime`` (torch or onnxruntime)."""
    return ls.LitServer(MSDNetLitAPI(checkpoint, threads, runtime), accelerator="cpu", devices=1,
                        workers_per_device=workers, middlewares=[RawImageAsJSON], fast_queue=fast_queue,
                        timeout=30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m loadtest.peers.litserve_app", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8002)
    p.add_argument("--workers", type=int, default=1, help="inference worker processes (workers_per_device)")
    p.add_argument("--api-servers", type=int, default=1, help="HTTP API server processes (num_api_servers)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per inference worker")
    p.add_argument("--runtime", choices=["torch", "onnxruntime"], default="torch",
                   help="whole network in torch eager or as one ONNX Runtime graph")
    p.add_argument("--fast-queue", action="store_true", help="LitServe's ZeroMQ queue instead of multiprocessing's")
    args = p.parse_args(argv)
    server = build_server(args.checkpoint, args.workers, args.threads, args.fast_queue, args.runtime)
    server.run(host=args.host, port=args.port, num_api_servers=args.api_servers, log_level="warning",
               generate_client_file=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
