"""Benchmark report: ``python -m loadtest.bench --out docs [--smoke]``.

In one run on one machine, starting the server processes itself (loopback only),
it measures and writes ``<out>/BENCHMARKS.md`` and PNG plots:

a. throughput at an SLO (p99 <= 100 ms, open loop, latency from the scheduled
   send time) and served accuracy, for (i) msdnet-serve at the checkpoint's
   calibrated target with the budget controller on, (ii) the same server forced to
   the last exit (``MSDNET_TARGET_FLOPS`` = the last exit's cost), (iii) the naive
   baseline (``loadtest.naive_server``: whole network per request, no batching);
b. controller tracking: realised vs target FLOPs per request through a switch of
   traffic mix (easy classes only, then hard classes only) and a runtime change of
   target (``PUT /budget``);
c. deadlines met at 50/80/100/120% of (i)'s capacity, and the exits taken;
d. compute efficiency: attained multiply-accumulates per second per block at
   batch 1 and 64 against a large matrix multiply and against ONNX Runtime.

FLOPs everywhere = multiply-accumulates of convs and linears as the MSDNet paper
counts them, cumulative per exit (served costs use lazy evaluation).

``--smoke`` runs every part tiny (seconds each) to show the scripts work; its
numbers mean nothing.

Each part is a module of :mod:`loadtest.parts`; the Markdown is :mod:`loadtest.report`,
the plots :mod:`loadtest.plots`; this module is the command line and the order of
the runs (parts b and c run on part a's msdnet-serve, at shares of its capacity).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import secrets
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .common import FULL, SMOKE, Plan, log
from .machine import machine_info
from .parts import controller, deadlines, efficiency, throughput
from .parts.offline import easy_hard, offline_eval
from .plots import write_plots
from .report import report
from .samples import load_test_set, to_samples


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and (math.isinf(o) or math.isnan(o)):
        return str(o)
    if isinstance(o, np.generic):
        return o.item()
    return o


def _restore(o):
    """Undo :func:`_jsonable` (non-finite floats as strings)."""
    if isinstance(o, dict):
        return {k: _restore(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_restore(v) for v in o]
    if o in ("inf", "-inf", "nan"):
        return float(o)
    return o


def load_results(path: Path) -> dict:
    """The measurements of an earlier run from its ``--json`` file (part d's batch
    sizes back to int keys)."""
    res = _restore(json.loads(Path(path).read_text()))
    if "d" in res:
        res["d"]["batches"] = {int(k): v for k, v in res["d"]["batches"].items()}
        if "batches" in res["d"]["onnx"]:
            res["d"]["onnx"]["batches"] = {int(k): v for k, v in res["d"]["onnx"]["batches"].items()}
    return res


def write_outputs(res: dict, out: Path) -> None:
    """The plots and ``BENCHMARKS.md`` into the folder ``out``."""
    write_plots(res, out)
    (out / "BENCHMARKS.md").write_text(report(res))


def run_servers(res: dict, parts: set[str], ck, checkpoint: Path, test, samples, threads: int,
                deadlines_ms: tuple[float, ...], plan: Plan, slo_ms: float) -> None:
    """Part a on each of its servers in turn; parts b and c on the first
    (msdnet-serve, controller on) while it runs, at shares of its capacity."""
    flops = ck.exit_flops(lazy=True)
    cal_target = ck.calibration.target_flops
    easy, hard = easy_hard(res["offline"]["per_class"])
    token = secrets.token_hex(16)
    msd_env = {"MSDNET_WARMUP_ROUNDS": str(plan.warmup_rounds)}
    a = {"servers": {}}
    for key, label, make, how in throughput.server_configs(checkpoint, threads, msd_env, token, flops, cal_target):
        log(f"part a: {label}")
        with make() as srv:
            a["servers"][key] = throughput.measure(srv, key, label, how, samples, plan, slo_ms)
            if key != "msdnet":
                continue
            cap = a["servers"][key]["capacity_rps"]
            if "c" in parts:
                log("part c: deadlines")
                res["c"] = deadlines.run(srv.url, samples, cap, deadlines_ms, plan)
            if "b" in parts:
                log("part b: controller tracking")
                res["b"] = controller.run(srv.url, token, test, easy, hard, cal_target, flops, cap, plan)
    res["a"] = throughput.compare(a)


def main(argv: list[str] | None = None) -> int:
    """``python -m loadtest.bench``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m loadtest.bench", description="Benchmark report: "
                                "docs/BENCHMARKS.md and PNG plots (see the module docstring).")
    p.add_argument("--out", required=True, help="folder for BENCHMARKS.md and the PNGs")
    p.add_argument("--smoke", action="store_true", help="every part tiny (seconds), to show the scripts work")
    p.add_argument("--checkpoint", help="checkpoint to serve (default: the shipped model)")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: /usr/share/datasets/fashion-mnist)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads of every server and of part d")
    p.add_argument("--slo-ms", type=float, default=100.0, help="p99 latency SLO of part a")
    p.add_argument("--deadlines-ms", default="25,50,100", help="deadlines drawn from in part c (comma-separated)")
    p.add_argument("--parts", default="abcd", help="which parts to run (b and c need a)")
    p.add_argument("--json", help="also write every measurement as JSON here")
    p.add_argument("--render", metavar="JSON", help="measure nothing: rewrite the report and plots from a --json "
                   "file of an earlier run")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        res = load_results(args.render)
        res["rendered"] = f"re-rendered from that run's measurements (`--render`) on " \
                          f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M')} UTC"
        write_outputs(res, out)
        log(f"wrote {out / 'BENCHMARKS.md'} from {args.render}")
        return 0

    import torch

    from model.checkpoint import DEFAULT_CHECKPOINT
    from model.checkpoint import load as load_checkpoint

    started = time.time()
    plan = SMOKE if args.smoke else FULL
    checkpoint = Path(args.checkpoint or DEFAULT_CHECKPOINT)
    ck = load_checkpoint(checkpoint)
    if ck.calibration is None:
        raise SystemExit(f"{checkpoint} is not calibrated: run 'msdnet calibrate --checkpoint {checkpoint}'")
    deadlines_ms = tuple(float(x) for x in args.deadlines_ms.split(","))
    parts = set(args.parts)
    res: dict = {"smoke": args.smoke, "plan": asdict(plan), "machine": machine_info(),
                 "command": "python -m loadtest.bench " + " ".join(shlex.quote(a) for a in argv),
                 "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"), "checkpoint": str(checkpoint),
                 "torch_threads": args.torch_threads, "slo_ms": args.slo_ms}
    log(f"machine: {res['machine']['cpu']}, {res['machine']['logical_cpus']} CPUs; plan: "
        f"{'smoke' if args.smoke else 'full'}")

    test = load_test_set(args.data_dir)
    if plan.images is not None:
        test = test.subset(torch.arange(min(plan.images, len(test))))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    log(f"offline evaluation on {len(test)} test images")
    res["offline"] = offline_eval(ck, test)
    easy, hard = easy_hard(res["offline"]["per_class"])
    res["easy_names"] = [ck.classes[c] for c in easy]
    res["hard_names"] = [ck.classes[c] for c in hard]
    samples = to_samples(test, seed=0)
    torch.set_num_threads(args.torch_threads)

    if "a" in parts:
        run_servers(res, parts, ck, checkpoint, test, samples, args.torch_threads, deadlines_ms, plan, args.slo_ms)
    if "d" in parts:
        log("part d: compute efficiency")
        res["d"] = efficiency.efficiency(ck, test, args.torch_threads, plan)

    res["finished"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
    res["wall_s"] = time.time() - started
    write_outputs(res, out)
    if args.json:
        slim = dict(res)
        if "b" in slim:
            slim["b"] = {k: v for k, v in slim["b"].items() if k not in ("window_errors",)}
        Path(args.json).write_text(json.dumps(_jsonable(slim), indent=1))
    log(f"wrote {out / 'BENCHMARKS.md'} in {res['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
