"""The ``msdnet`` console script: the model's sub-commands plus ``serve``."""

from __future__ import annotations

import argparse
import signal
import sys


def cmd_serve(args) -> int:
    import uvicorn
    from pydantic import ValidationError

    from . import logs
    from .settings import Settings

    overrides = {k: v for k, v in {
        "checkpoint": args.checkpoint, "host": args.host, "port": args.port, "workers": args.workers,
        "target_flops": args.target_flops, "torch_threads": args.torch_threads, "model_threads": args.model_threads,
        "max_batch_size": args.max_batch_size, "max_queue_delay_ms": args.max_queue_delay_ms,
        "log_level": args.log_level, "agreement_sample": args.agreement_sample}.items() if v is not None}
    if args.no_controller:
        overrides["controller"] = False
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for err in exc.errors():
            print(f"msdnet serve: error: {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    log_config = logs.configure(settings.log_level)
    if settings.workers > 1:  # the engine process loads (and checks) the checkpoint: no torch here
        return _serve_split(settings, overrides, log_config)
    from model.checkpoint import CheckpointError
    from model.checkpoint import load as load_checkpoint

    try:  # fail before binding the port, with a one-line message
        checkpoint = load_checkpoint(settings.checkpoint)
        checkpoint.check_target(settings.target_flops)
        if checkpoint.calibration is None:
            raise CheckpointError(f"{settings.checkpoint} is not calibrated: run 'msdnet calibrate --checkpoint "
                                  f"{settings.checkpoint} --data folder --data-dir DIR' (held-out images in "
                                  "DIR/val/<class>/) first")
    except CheckpointError as exc:
        print(f"msdnet serve: error: {exc}", file=sys.stderr)
        return 2
    from .http.app import create_app
    from .http.protocol import TimedHTTPProtocol

    # uvicorn drains on SIGTERM, then re-raises the signal; after a clean drain exit 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=log_config,
                timeout_graceful_shutdown=settings.drain_timeout_s, access_log=False, http=TimedHTTPProtocol)
    return 0


def _serve_split(settings, overrides: dict, log_config: dict) -> int:
    """``--workers N``: one engine process (model, scheduler, controller:
    :class:`server.ipc.launch.EngineProcess`) and N uvicorn worker processes (HTTP,
    decoding) that reach it over a Unix socket. The engine starts first and warms up;
    the workers start once it answers. If the engine dies, the workers are stopped and
    the exit status is 1.

    SIGTERM (or SIGINT) stops the workers first (each answers every request it has
    read: ``server.http.drain``), then the engine, so the engine is there for every
    request a worker still answers.
    """
    import os

    import uvicorn

    from .http.drain import MODEL_STOP_S, supervisor_class
    from .http.protocol import TimedHTTPProtocol
    from .ipc.launch import EngineProcess, EngineStartError

    try:
        engine = EngineProcess(settings, overrides).start()
    except EngineStartError as exc:
        if exc.exitcode != 2:  # 2: a bad checkpoint, and the engine printed the one-line reason
            print(f"msdnet serve: error: {exc}", file=sys.stderr)
        return 2 if exc.exitcode == 2 else 1
    # the engine gone: stop the workers (uvicorn's supervisor handles SIGTERM)
    engine.watch(lambda: os.kill(os.getpid(), signal.SIGTERM))
    config = uvicorn.Config("server.http.app:create_app", factory=True, workers=settings.workers,
                            host=settings.host, port=settings.port, log_config=log_config,
                            timeout_graceful_shutdown=settings.drain_timeout_s, access_log=False,
                            http=TimedHTTPProtocol)
    try:
        supervisor_class()(config, sockets=[config.bind_socket()]).run()
    finally:
        # Only now, with every worker gone: nothing the engine still holds has anyone waiting for it.
        engine.stop(MODEL_STOP_S)
    return 1 if engine.died.is_set() else 0


def cmd_batch_eval(args) -> int:
    import json

    from model.checkpoint import load
    from model.evaluate import collect_logits, test_set

    from .engine.batch_eval import compare

    ck = load(args.checkpoint) if args.checkpoint else load()
    test = test_set(ck, args.data_dir)
    logits = collect_logits(ck.model, test, ck.transforms.mean, ck.transforms.std)
    rows = compare(ck, logits, test.labels.numpy(), args.batch_size)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    print(f"/batch (budgeted, batches of {args.batch_size}) against fixed thresholds at equal mean FLOPs, test split;")
    print("MFLOPs = multiply-accumulates of convs and linears per image, lazy evaluation")
    print("'fixed': thresholds from the validation split (the paper's method); 'envelope': its best point at or "
          "below the same cost")
    print(f"{'budget/img':>10} {'MFLOPs':>8} {'/batch %':>9} {'fixed %':>8} {'diff':>6} {'envelope %':>11} {'diff':>6}")
    for r in rows:
        fixed, env = r["fixed_top1_at_same_flops"], r["fixed_envelope_top1_at_same_flops"]
        top1 = r["top1"]
        print(f"{r['budget_per_image'] / 1e6:>10.2f} {r['mean_flops'] / 1e6:>8.2f} {100 * top1:>9.2f} "
              f"{100 * fixed:>8.2f} {100 * (top1 - fixed):>+6.2f} {100 * env:>11.2f} {100 * (top1 - env):>+6.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="msdnet", description="MSDNet: train, calibrate, evaluate and serve "
                                     "an early-exit image classifier.")
    sub = parser.add_subparsers(dest="command", required=True)
    serving = argv[:1] == ["serve"]
    if not serving:  # the model's commands need torch; `serve --workers N` keeps the supervising process without it
        from model.cli import add_commands

        add_commands(sub)
    p = sub.add_parser("serve", help="run the HTTP server (uvicorn); settings also from MSDNET_* variables")
    p.add_argument("--checkpoint", help="checkpoint to serve (default: the shipped Fashion-MNIST model)")
    p.add_argument("--host", help="bind address (default 127.0.0.1; 0.0.0.0 in the container)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--workers", type=int, help="HTTP worker processes (default: usable CPUs, at most 4); 1: one "
                   "process; N > 1 adds one engine process that owns the model, the scheduler and the budget "
                   "controller")
    p.add_argument("--target-flops", type=float, help="target mean FLOPs per /classify request")
    p.add_argument("--torch-threads", type=int, help="intra-op threads per model thread")
    p.add_argument("--model-threads", type=int, help="engine threads running block steps concurrently (default: "
                   "one per usable CPU for a network whose last exit costs 50 MFLOPs or more, else 1)")
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-queue-delay-ms", type=float)
    p.add_argument("--no-controller", action="store_true", help="keep the checkpoint's thresholds fixed")
    p.add_argument("--agreement-sample", type=float, help="share of early /classify answers audited at the last "
                   "exit with spare capacity (default 0.02; 0: off)")
    p.add_argument("--log-level")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("batch-eval", help="/batch's budgeted policy against fixed thresholds on the test split")
    p.add_argument("--checkpoint")
    p.add_argument("--data-dir")
    p.add_argument("--batch-size", type=int, default=100, help="images per /batch request")
    p.add_argument("--json", metavar="OUT")
    p.set_defaults(func=cmd_batch_eval)
    if serving:
        args = parser.parse_args(argv)
        return args.func(args)
    from model.cli import run

    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
