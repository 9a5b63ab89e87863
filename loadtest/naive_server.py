"""The baseline: a naive FastAPI handler that runs the whole network per request.

No batching, no early exit, no scheduler: each POST /classify decodes its image
(``server.images.decode``, the same decoding as the real server) and runs
``model(x)[-1]`` at batch size 1. The handler body runs in Starlette's thread
pool, as a plain ``def`` endpoint would. Cost per request: the last exit's FLOPs
(multiply-accumulates of convs and linears, MSDNet paper convention).

    python -m loadtest.naive_server --checkpoint model/weights/fashion-mnist.pt --port 8001

Accepts raw image bytes (``image/*``) or JSON ``{"image": base64}``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import sys
import threading
import time

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from model.checkpoint import DEFAULT_CHECKPOINT
from model.checkpoint import load as load_checkpoint
from server import errors
from server.images import decode

MAX_PIXELS = 4096 * 4096


def create_app(checkpoint=DEFAULT_CHECKPOINT, torch_threads: int = 1) -> FastAPI:
    state: dict = {}
    local = threading.local()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        ck = load_checkpoint(checkpoint)
        torch.set_num_threads(torch_threads)
        cal = ck.calibration
        state.update(model=ck.model.eval(), spec=ck.transforms, classes=ck.classes,
                     temperature=cal.temperatures[-1] if cal is not None else 1.0,
                     flops=int(ck.exit_flops(lazy=True)[-1]), num_exits=ck.model.num_exits)
        with torch.inference_mode():  # warm-up
            ck.model(torch.zeros(1, ck.config.in_channels, ck.config.image_size, ck.config.image_size))
        state["ready"] = True
        yield

    def infer(data: bytes) -> dict:
        started = time.monotonic()
        if not getattr(local, "threads_set", False):  # each pool thread: the same torch threads
            torch.set_num_threads(torch_threads)
            local.threads_set = True
        x = torch.from_numpy(decode(data, state["spec"], MAX_PIXELS))[None]
        with torch.inference_mode():
            logits = state["model"](x)[-1][0]
        probs = torch.softmax(logits.double() / state["temperature"], dim=0).numpy()
        k = int(np.argmax(probs))
        return {"class_id": k, "label": state["classes"][k], "confidence": float(probs[k]),
                "exit": state["num_exits"], "num_exits": state["num_exits"], "flops": state["flops"],
                "latency_ms": round((time.monotonic() - started) * 1e3, 3)}

    app = FastAPI(title="msdnet naive baseline", lifespan=lifespan)

    @app.post("/classify")
    async def classify(request: Request):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await request.body()
        try:
            if ctype == "application/json":
                try:
                    data = base64.b64decode(json.loads(body)["image"], validate=True)
                except (ValueError, KeyError, TypeError, binascii.Error) as exc:
                    raise errors.BadRequest(f"expected JSON {{'image': base64}}: {exc}") from exc
            else:
                data = body
            return await run_in_threadpool(infer, data)
        except errors.ServiceError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not state.get("ready"):
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready"}

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m loadtest.naive_server", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--torch-threads", type=int, default=1)
    args = p.parse_args(argv)
    uvicorn.run(create_app(args.checkpoint, args.torch_threads), host=args.host, port=args.port,
                log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
