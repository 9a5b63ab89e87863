"""Benchmark report: ``python -m loadtest.bench --out docs [--smoke]`` (``make bench``).

In one run on one machine, starting every server itself (loopback only), it
measures the goals of issue 12 and writes ``<out>/BENCHMARKS.md`` with its plots:

a. capacity (highest Poisson rate with p99 <= 100 ms and no failure) of LitServe
   and Ray Serve running the checkpoint's whole network, and of msdnet-serve with
   its defaults (budget controller on), with 1 and 3 HTTP workers, and forced to
   the last exit; raw ``image/png`` and JSON base64 bodies; CPU cores busy of each
   server and of the client (``parts.capacity``);
s. CPU per request by stage, from a py-spy profile of every server process
   (``parts.stages``);
c. deadlines met at shares of msdnet-serve's capacity (``parts.deadlines``);
b. budget controller tracking through a traffic-mix switch and a ``PUT /budget``
   (``parts.controller``);
e. the controller's accuracy on steady traffic against fixed thresholds at the
   same mean FLOPs (``parts.accuracy``);
f. no stall: ``/healthz`` and a small ``/classify`` while floods of huge images
   and of already-expired requests arrive (``parts.stall``);
d. the per-block ONNX Runtime engine against ONNX Runtime's whole network and
   torch eager, batch 1 and 64 (``parts.blocks``).

Every part is a module of :mod:`loadtest.parts`; one :class:`loadtest.common.Plan`
sizes them all (``FULL``, or ``SMOKE`` with ``--smoke``).

Parts c, b and e run on one msdnet-serve with its defaults, at shares of the
capacity part a found for it. FLOPs everywhere = multiply-accumulates of convs
and linears as the MSDNet paper counts them, cumulative per exit (served costs
use lazy evaluation).

``--smoke`` runs every part tiny (seconds each, one configuration per server) to
show the scripts work; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import secrets
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import ENCODINGS, FULL, SMOKE, Plan, log
from .machine import machine_info
from .parts import accuracy, capacity, controller, deadlines, stages, stall
from .parts.offline import easy_hard, offline_eval
from .plots import write_plots
from .report import report
from .samples import load_test_set, to_samples
from .servers import msdnet

PARTS = "ascbefd"


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
    """The measurements of an earlier run from its ``--json`` file."""
    return _restore(json.loads(Path(path).read_text()))


def write_outputs(res: dict, out: Path) -> None:
    """The plots and ``BENCHMARKS.md`` into the folder ``out``."""
    from . import accuracyreport
    from .realreport import docs_part

    write_plots(res, out)
    watch = accuracyreport.docs_part(out)  # keeps the accuracy watch's part (python3 -m loadtest.accuracywatch)
    (out / "BENCHMARKS.md").write_text(report(res) + ("\n" + watch if watch else "") + docs_part(out))
    # (and the real-size part: make bench-real)


def msdnet_capacity(a: dict | None, encoding: str = "png") -> float | None:
    """Capacity part a found for msdnet-serve with its defaults (None: not measured)."""
    srv = (a or {}).get("servers", {}).get("msdnet-default", {})
    cap = srv.get("encodings", {}).get(encoding, {}).get("capacity_rps")
    return cap or None


def default_workers() -> int:
    """``msdnet serve``'s default ``--workers`` on this machine."""
    from server.settings import usable_cpus

    return min(4, usable_cpus())


def run_capacity(res: dict, checkpoint: str, samples, plan: Plan, slo_ms: float, only: list[str] | None,
                 last_flops: int) -> None:
    """Part a into ``res["a"]`` (the layout of ``loadtest.capacity``'s capacity.json);
    ``slo_ms``: the p99 bound (ms), ``last_flops``: the last exit's cost (FLOPs)."""
    smoke = res["smoke"]
    configs = [c for c in capacity.bench_grid(checkpoint, last_flops, smoke)
               if not only or c.key in only or c.family in only]
    expected = capacity.reference_classes(checkpoint, samples) if smoke else None
    a = {"smoke": smoke, "plan": plan.search_dict(), "slo_ms": slo_ms, "images": len(samples),
         "command": res["command"], "started": res["started"], "machine": {"cpus": res["machine"]["cpus"]},
         "loadavg_at_start": res["machine"]["loadavg_at_start"]}
    a["servers"], a["failures"] = capacity.measure_configs(configs, samples, plan, slo_ms, expected)
    a["loadavg_at_end"] = list(os.getloadavg())
    res["a"] = a


def run_on_default_server(res: dict, parts: set[str], ck, checkpoint: str, test, logits, samples,
                          deadlines_ms: tuple[float, ...], plan: Plan) -> None:
    """Parts c, b and e on one msdnet-serve with its defaults (a budget token set)."""
    cap = msdnet_capacity(res.get("a")) or plan.fallback_capacity
    token = secrets.token_hex(16)
    cfg = msdnet(checkpoint, None)
    srv = cfg.make()
    srv.env.update({"MSDNET_BUDGET_TOKEN": token, "MSDNET_WARMUP_ROUNDS": str(plan.warmup_rounds)})
    flops = ck.exit_flops(lazy=True)
    with srv:
        if "c" in parts:
            log(f"part c: deadlines at shares of {cap:g} req/s")
            res["c"] = deadlines.run(srv.url, samples, cap, deadlines_ms, plan)
        if "e" in parts:  # before b, which moves the target
            log("part e: controller accuracy on steady traffic")
            res["e"] = accuracy.run(srv.url, samples, logits, test.labels.numpy(), ck, plan.accuracy_load * cap,
                                    plan)
        if "b" in parts:
            log("part b: controller tracking")
            easy, hard = easy_hard(res["offline"]["per_class"])
            res["b"] = controller.run(srv.url, token, test, easy, hard, ck.calibration.target_flops, flops, cap, plan)


def run_stall(res: dict, checkpoint: str, samples, plan: Plan) -> None:
    """Part f on its own msdnet-serve with its defaults."""
    srv = msdnet(checkpoint, None).make()
    with srv:
        log(f"part f: stall, {plan.stall_s:g} s of floods")
        f = stall.run(srv.url, plan.stall_s, 2, samples[0].png)
    f.update(seconds=plan.stall_s, batch_clients=2, workers=default_workers())
    res["f"] = f


def run_stages(res: dict, checkpoint: str, samples, plan: Plan) -> None:
    """Part s: the stage split with the default workers, both encodings."""
    rows = []
    raw = Path(tempfile.mkdtemp(prefix="msdnet-bench-pyspy-"))  # the raw profiles: large, not for docs/
    for enc in ENCODINGS:
        log(f"part s: CPU by stage, {enc}, {plan.stages_rate:g} req/s (raw py-spy profile in {raw})")
        rows.append(stages.profile_once(checkpoint, default_workers(), plan.stages_rate, plan.stages_s, samples, enc,
                                        plan.stages_spy_rate, raw / f"pyspy_{enc}.txt"))
    res["s"] = {"rows": rows, "rate": plan.stages_rate, "seconds": plan.stages_s, "spy_rate": plan.stages_spy_rate}


def main(argv: list[str] | None = None) -> int:
    """``python -m loadtest.bench``; returns the exit status (1: a smoke found a wrong
    answer or a server that did not start)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m loadtest.bench", description="Benchmark report: "
                                "docs/BENCHMARKS.md and PNG plots (see the module docstring).")
    p.add_argument("--out", required=True, help="folder for BENCHMARKS.md and the PNGs")
    p.add_argument("--smoke", action="store_true", help="every part tiny (seconds), to show the scripts work")
    p.add_argument("--checkpoint", help="checkpoint to serve (default: the shipped model)")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: /usr/share/datasets/fashion-mnist)")
    p.add_argument("--slo-ms", type=float, default=100.0, help="p99 latency SLO of part a")
    p.add_argument("--deadlines-ms", default="25,50,100", help="deadlines drawn from in part c (comma-separated)")
    p.add_argument("--parts", default=PARTS, help=f"which parts to run, of {PARTS!r} (c, b, e use a's capacity)")
    p.add_argument("--servers", nargs="*", help="part a: configuration keys or families (default: all)")
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
    from model.evaluate import collect_logits

    from .parts import blocks

    started = time.time()
    plan = SMOKE if args.smoke else FULL
    checkpoint = str(args.checkpoint or DEFAULT_CHECKPOINT)
    ck = load_checkpoint(checkpoint)
    if ck.calibration is None:
        raise SystemExit(f"{checkpoint} is not calibrated: run 'msdnet calibrate --checkpoint {checkpoint}'")
    deadlines_ms = tuple(float(x) for x in args.deadlines_ms.split(","))
    parts = set(args.parts)
    res: dict = {"smoke": args.smoke, "plan": dataclasses.asdict(plan), "machine": machine_info(),
                 "command": "python -m loadtest.bench " + " ".join(shlex.quote(a) for a in argv),
                 "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"), "checkpoint": checkpoint,
                 "slo_ms": args.slo_ms, "workers_default": default_workers()}
    log(f"machine: {res['machine']['cpu']}, {res['machine']['cpus']} usable CPUs; plan: "
        f"{'smoke' if args.smoke else 'full'}")

    test = load_test_set(args.data_dir)
    if plan.test_images is not None:
        test = test.subset(torch.arange(min(plan.test_images, len(test))))
    log(f"offline evaluation on {len(test)} test images")
    with torch.inference_mode():
        logits = collect_logits(ck.model, test, ck.transforms.mean, ck.transforms.std).numpy()
    res["offline"] = offline_eval(ck, test, logits)
    easy, hard = easy_hard(res["offline"]["per_class"])
    res["easy_names"] = [ck.classes[c] for c in easy]
    res["hard_names"] = [ck.classes[c] for c in hard]
    samples = to_samples(test, seed=0)
    last_flops = int(ck.exit_flops(lazy=True)[-1])

    if "a" in parts:
        log("part a: capacity against the peers")
        run_capacity(res, checkpoint, samples, plan, args.slo_ms, args.servers, last_flops)
    if "s" in parts:
        run_stages(res, checkpoint, samples, plan)
    if parts & set("cbe"):
        run_on_default_server(res, parts, ck, checkpoint, test, logits, samples, deadlines_ms, plan)
    if "f" in parts:
        run_stall(res, checkpoint, samples, plan)
    if "d" in parts:
        log("part d: per-block engine against the whole network")
        res["d"] = blocks.measure(checkpoint, plan.blocks_threads, plan.blocks_batches, plan.blocks_s)

    res["finished"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
    res["wall_s"] = time.time() - started
    write_outputs(res, out)
    if args.json:
        slim = dict(res)
        if "b" in slim:
            slim["b"] = {k: v for k, v in slim["b"].items() if k not in ("window_errors",)}
        Path(args.json).write_text(json.dumps(_jsonable(slim), indent=1))
    failures = res.get("a", {}).get("failures", [])
    log(f"wrote {out / 'BENCHMARKS.md'} in {res['wall_s'] / 60:.1f} min; {len(failures)} failure(s)")
    for f in failures:
        log(f"  FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
