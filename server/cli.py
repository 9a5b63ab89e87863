"""The ``msdnet`` console script: the model's sub-commands plus ``serve``."""

from __future__ import annotations

import argparse
import signal
import sys

from model.cli import add_commands, run


def cmd_serve(args) -> int:
    import uvicorn
    from pydantic import ValidationError

    from . import logs
    from .app import create_app
    from .settings import Settings

    overrides = {k: v for k, v in {
        "checkpoint": args.checkpoint, "host": args.host, "port": args.port, "workers": args.workers,
        "target_flops": args.target_flops, "torch_threads": args.torch_threads,
        "max_batch_size": args.max_batch_size, "max_queue_delay_ms": args.max_queue_delay_ms,
        "log_level": args.log_level}.items() if v is not None}
    if args.no_controller:
        overrides["controller"] = False
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for err in exc.errors():
            print(f"msdnet serve: error: {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    from model.checkpoint import CheckpointError
    from model.checkpoint import load as load_checkpoint

    try:  # fail before binding the port, with a one-line message
        load_checkpoint(settings.checkpoint)
    except CheckpointError as exc:
        print(f"msdnet serve: error: {exc}", file=sys.stderr)
        return 2
    log_config = logs.configure(settings.log_level)
    # uvicorn drains on SIGTERM, then re-raises the signal; after a clean drain exit 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=log_config,
                timeout_graceful_shutdown=settings.drain_timeout_s, access_log=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="msdnet", description="MSDNet: train, calibrate, evaluate and serve "
                                     "an early-exit image classifier.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    p = sub.add_parser("serve", help="run the HTTP server (uvicorn); settings also from MSDNET_* variables")
    p.add_argument("--checkpoint", help="checkpoint to serve (default: the shipped Fashion-MNIST model)")
    p.add_argument("--host", help="bind address (default 127.0.0.1; 0.0.0.0 in the container)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--workers", type=int, help="must be 1: scale out with replicas")
    p.add_argument("--target-flops", type=float, help="target mean FLOPs per /classify request")
    p.add_argument("--torch-threads", type=int)
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-queue-delay-ms", type=float)
    p.add_argument("--no-controller", action="store_true", help="keep the checkpoint's thresholds fixed")
    p.add_argument("--log-level")
    p.set_defaults(func=cmd_serve)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
