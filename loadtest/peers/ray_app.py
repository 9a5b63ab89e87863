"""Peer 2: Ray Serve serving the checkpoint's whole network with its own dynamic batching.

One deployment (``replicas`` copies, each an actor with ``threads`` torch
threads) behind Ray Serve's HTTP proxy on ``host:port`` (loopback). A request's
body is read in the replica (raw ``image/*`` or JSON ``{"image": base64}``),
then ``@serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)`` gathers
image files, the batch is decoded (``server.images.decode``, as msdnet-serve)
and run through all blocks (answer: the last exit, 21.14 MFLOPs per image as
multiply-accumulates of convs and linears, MSDNet paper convention).
``GET /readyz`` answers 200 once a replica has loaded the model.

A local Ray instance only: started by this process on 127.0.0.1, dashboard off,
usage statistics off (``RAY_USAGE_STATS_ENABLED=0``), stopped on SIGTERM/SIGINT.
Ray's own daemons (GCS, raylet, workers) run on the same cores and count as
server CPU in the benchmark.

    python3 -m loadtest.peers.ray_app --port 8003 --replicas 1 --threads 1 [--runtime onnxruntime]

``--runtime onnxruntime``: each replica runs the whole network as one ONNX
Runtime graph (``loadtest.peers.WholeNetwork``), ``--threads`` intra-op threads.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from model.checkpoint import DEFAULT_CHECKPOINT  # noqa: E402

MAX_BATCH_SIZE = 64
BATCH_WAIT_TIMEOUT_S = 0.002
MAX_ONGOING_REQUESTS = 256  # per replica; Ray's default (5) would cap a batch at 5


def build_app(checkpoint: str, replicas: int, threads: int, runtime: str = "torch"):
    """The bound Ray Serve application (see the module docstring)."""
    import numpy as np
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from . import BadRequest, WholeNetwork, image_bytes

    @serve.deployment(num_replicas=replicas, max_ongoing_requests=MAX_ONGOING_REQUESTS,
                      ray_actor_options={"num_cpus": 0})  # CPUs are shared; Ray must not refuse a replica
    class Classifier:
        def __init__(self, checkpoint: str, threads: int, runtime: str):
            self.net = WholeNetwork(checkpoint, threads, runtime)

        @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
        async def classify(self, files: list[bytes]) -> list[dict | Exception]:
            arrays, out = [], []
            for data in files:
                try:
                    arrays.append(self.net.decode(data))
                    out.append(None)
                except Exception as exc:  # a bad image fails its own request, not the batch
                    out.append(exc)
            answers = iter(self.net.predict(np.stack(arrays)) if arrays else [])
            return [next(answers) if o is None else o for o in out]

        async def __call__(self, request: Request):
            if request.method == "GET" and request.url.path.rstrip("/") in ("/readyz", "/healthz"):
                return JSONResponse({"status": "ready"})
            if request.method != "POST" or request.url.path.rstrip("/") != "/classify":
                return JSONResponse({"detail": "not found"}, status_code=404)
            try:
                data = image_bytes(await request.body(), request.headers.get("content-type", ""))
            except BadRequest as exc:
                return JSONResponse({"detail": str(exc)}, status_code=400)
            result = await self.classify(data)
            if isinstance(result, Exception):
                return JSONResponse({"detail": str(result)}, status_code=getattr(result, "status", 500))
            return JSONResponse(result)

    return Classifier.bind(checkpoint, threads, runtime)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m loadtest.peers.ray_app", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8003)
    p.add_argument("--replicas", type=int, default=1, help="deployment replicas (one actor process each)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per replica")
    p.add_argument("--runtime", choices=["torch", "onnxruntime"], default="torch",
                   help="whole network in torch eager or as one ONNX Runtime graph")
    args = p.parse_args(argv)
    import ray
    from ray import serve

    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", num_cpus=os.cpu_count(),
             object_store_memory=200 * 1024 * 1024, log_to_driver=False, configure_logging=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port}, logging_config={"log_level": "WARNING"})
        serve.run(build_app(args.checkpoint, args.replicas, args.threads, args.runtime), name="msdnet",
                  route_prefix="/", blocking=False)
        print(f"ray serve ready on http://{args.host}:{args.port}", flush=True)
        stop.wait()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
