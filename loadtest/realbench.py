"""The benchmark at the paper's real sizes, one run per network: ``make bench-real SIZE=cifar100-7|imagenet-5``.

``python3 -m loadtest.realbench (--size NAME | --checkpoint FILE) --out DIR [--smoke]``

``--size`` makes (or reuses) the speed-only checkpoint of ``loadtest.realsize``
(random weights, calibrated on generated images); ``--checkpoint`` takes any.
Images at the checkpoint's input contract (``loadtest.samples.samples_for``:
``--data-dir`` real images, else generated, speed-only); SLO by size (p99 <= 100
ms for CIFAR and 28 x 28, <= 500 ms for ImageNet; ``--slo-ms``). In one run:

1. **decode**: decode + preprocessing per image, full JPEG decode against
   Pillow's draft mode, with the tensor's difference (``loadtest.decodecost``);
2. **blocks**: the per-block engine against the whole network in ONNX Runtime,
   GMAC/s at batch 1 and typical batches, 1 and 2 threads (``loadtest.parts.blocks``);
3. **capacity**: the grid (:data:`DEFAULT_GRID`, or ``--grid FILE.json`` of the
   same shape): LitServe (1 and 2 inference workers, 1 or 2 threads) and Ray
   Serve (1 and 2 replicas) with the whole network in ONNX Runtime, and in torch
   eager; msdnet-serve with the controller at 40% and 25% of the last exit's
   FLOPs and forced to the last exit, each with any ``MSDNET_*`` settings (e.g.
   ``MSDNET_MODEL_THREADS``; a configuration whose ``needs`` names a setting the
   server does not have is skipped, and says so). Per configuration and
   encoding: capacity (``loadtest.parts.capacity.measure_configs``), p99, mean MFLOPs per
   answer, effective GMAC/s, server cores, the server tree's peak RSS, and for
   msdnet-serve the block batch sizes it formed (``msdnet_batch_size``).

Writes ``DIR/realbench-NAME.json`` and ``DIR/REALBENCH-NAME.md`` (a section for
docs/BENCHMARKS.md; ``loadtest.realreport``). Bounded: each search at most
``--max-search-s`` (default 80 s) and 8 trials; loopback only.

``--smoke`` (CI, well under a minute at CIFAR size): small decode and blocks
runs, then msdnet-serve (controller at 40%) and LitServe with ONNX Runtime, one
short trial per encoding whose answers must all be 200 with the class the model
gives in-process at the reported exit; exit status 1 otherwise.

FLOPs = multiply-accumulates of convs and linears (MSDNet paper convention),
cumulative per exit (lazy evaluation for msdnet-serve's answers).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .common import ENCODINGS, FULL, SMOKE, Plan, log
from .parts import capacity as cap
from .servers import ServerConfig, litserve, msdnet, ray

DEFAULT_GRID: dict = {
    "peers": [
        {"server": "litserve", "api_servers": 1, "workers": 1, "threads": 1, "runtime": "onnxruntime"},
        {"server": "litserve", "api_servers": 1, "workers": 2, "threads": 1, "runtime": "onnxruntime"},
        {"server": "litserve", "api_servers": 1, "workers": 1, "threads": 2, "runtime": "onnxruntime"},
        {"server": "ray", "replicas": 1, "threads": 1, "runtime": "onnxruntime"},
        {"server": "ray", "replicas": 2, "threads": 1, "runtime": "onnxruntime"},
        {"server": "litserve", "api_servers": 1, "workers": 2, "threads": 1, "runtime": "torch"},
        {"server": "ray", "replicas": 2, "threads": 1, "runtime": "torch"},
    ],
    # target: a share of the last exit's lazy FLOPs (the controller's MSDNET_TARGET_FLOPS), or "last"
    "msdnet": [
        {"tag": "t40", "target": 0.40},
        {"tag": "t25", "target": 0.25},
        {"tag": "last", "target": "last"},
        # The server's default model threads: one per usable CPU for networks >= 50 MFLOPs (2 here); 1 for contrast.
        {"tag": "t40-mt1", "target": 0.40, "env": {"MSDNET_MODEL_THREADS": "1"}, "needs": "model_threads"},
        {"tag": "last-mt1", "target": "last", "env": {"MSDNET_MODEL_THREADS": "1"}, "needs": "model_threads"},
    ],
}
SMOKE_GRID: dict = {
    "peers": [{"server": "litserve", "api_servers": 1, "workers": 1, "threads": 1, "runtime": "onnxruntime"}],
    "msdnet": [{"tag": "t40", "target": 0.40, "env": {"MSDNET_WARMUP_ROUNDS": "1"}}],
}


def server_settings() -> set[str]:
    """The setting names msdnet-serve knows (``server.settings.Settings`` fields)."""
    from server.settings import Settings

    return set(Settings.model_fields)


def configs(grid: dict, checkpoint: str, last_flops: int) -> tuple[list[ServerConfig], list[str]]:
    """The grid as server configurations, and a note per skipped one. ``grid``:
    ``{"peers": [{"server": "litserve", "api_servers", "workers", "threads",
    "runtime"} | {"server": "ray", "replicas", "threads", "runtime"}], "msdnet":
    [{"tag", "target": share | "last", "env": {...}, "needs": setting}]}``.

    Raises:
        ValueError: an unknown peer server or a target that is neither a share in (0, 1] nor "last".
    """
    out, skipped = [], []
    known = server_settings()
    for p in grid.get("peers", []):
        if p["server"] == "litserve":
            out.append(litserve(checkpoint, p.get("api_servers", 1), p["workers"], p["threads"], p["runtime"]))
        elif p["server"] == "ray":
            out.append(ray(checkpoint, p["replicas"], p["threads"], p["runtime"]))
        else:
            raise ValueError(f"unknown peer server {p['server']!r}")
    for m in grid.get("msdnet", []):
        if m.get("needs") and m["needs"] not in known:
            skipped.append(f"msdnet {m['tag']}: skipped, the server has no setting {m['needs']!r} yet")
            continue
        t = m["target"]
        if t == "last":
            out.append(msdnet(checkpoint, None, last_flops, env=m.get("env"), tag=m["tag"]))
        elif isinstance(t, int | float) and 0 < t <= 1:
            out.append(msdnet(checkpoint, None, target_flops=t * last_flops, env=m.get("env"), tag=m["tag"]))
        else:
            raise ValueError(f"msdnet {m['tag']}: target {t!r} is neither a share in (0, 1] nor 'last'")
    return out, skipped


def batch_stats(url: str) -> dict:
    """msdnet-serve's ``msdnet_batch_size`` histogram per block from ``/metrics``:
    ``{block: {"steps", "images", "largest_bucket"}}`` (cumulative since start;
    ``largest_bucket``: the upper bound of the highest bucket that holds a step)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != "msdnet_batch_size":
            continue
        buckets: dict = {}
        for s in fam.samples:
            b = out.setdefault(s.labels.get("block", "?"), {"steps": 0, "images": 0.0, "largest_bucket": None})
            if s.name.endswith("_count"):
                b["steps"] = int(s.value)
            elif s.name.endswith("_sum"):
                b["images"] = s.value
            elif s.name.endswith("_bucket"):
                buckets.setdefault(s.labels.get("block", "?"), []).append((float(s.labels["le"]), s.value))
        for block, bs in buckets.items():
            bs.sort()
            prev, top = 0.0, None
            for le, cum in bs:
                if cum > prev:
                    top = le
                prev = cum
            out[block]["largest_bucket"] = top
    return out


def _diff(after: dict, before: dict) -> dict:
    return {k: {"steps": v["steps"] - before.get(k, {}).get("steps", 0),
                "images": v["images"] - before.get(k, {}).get("images", 0.0),
                "largest_bucket_since_start": v["largest_bucket"]} for k, v in after.items()}


def batches_since(cfg: ServerConfig, srv) -> Callable[[], dict]:
    """For msdnet-serve: a function giving ``{"batches": ...}``, the block batch sizes
    ``srv`` formed since this call (:func:`batch_stats` differences); for a peer, ``{}``.
    ``loadtest.parts.capacity.measure_configs``'s ``observe``."""
    if not cfg.family.startswith("msdnet"):
        return dict
    before = batch_stats(srv.url)
    return lambda: {"batches": _diff(batch_stats(srv.url), before)}


def plan_for(last_flops: int, smoke: bool) -> Plan:
    """The search plan: the capacity module's, starting at a rate the network's size
    makes plausible (0.4 x 80 GMAC/s / last exit's FLOPs, between 5 and 150 req/s)."""
    if smoke:
        return replace(SMOKE, start=20.0, images=40, trial_s=1.0, warmup_s=0.3)
    start = max(5.0, min(150.0, round(0.4 * 80e9 / last_flops)))
    return replace(FULL, start=start, images=200)


def main(argv: list[str] | None = None) -> int:
    from model.checkpoint import costs_table, load

    from . import decodecost, realreport, realsize
    from .machine import machine_info
    from .parts import blocks
    from .samples import samples_for

    p = argparse.ArgumentParser(prog="python3 -m loadtest.realbench", description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--size", choices=list(realsize.CONFIGS), help="a speed-only real-size network (made if needed)")
    g.add_argument("--checkpoint", help="any msdnet-serve checkpoint")
    p.add_argument("--out", required=True, help="folder for realbench-NAME.json and REALBENCH-NAME.md")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--data-dir", help="real images DIR/<class>/<file> (default: generated, speed-only)")
    p.add_argument("--slo-ms", type=float, help="p99 bound (default by size: 100 ms CIFAR/28x28, 500 ms ImageNet)")
    p.add_argument("--grid", help="JSON file {'peers': [...], 'msdnet': [...]} replacing the default grid")
    p.add_argument("--only", nargs="*", help="configuration keys or families to run")
    p.add_argument("--parts", nargs="*", default=["decode", "blocks", "capacity"])
    p.add_argument("--encodings", nargs="*", default=list(ENCODINGS), choices=list(ENCODINGS))
    p.add_argument("--camera-share", type=float, default=0.01, help="share of 4000x3000 generated photos")
    p.add_argument("--max-search-s", type=float, default=80.0, help="seconds per capacity search")
    a = p.parse_args(argv)
    checkpoint = str(realsize.make(a.size, log=log) if a.size else a.checkpoint)
    ck = load(checkpoint)
    name = a.size or ck.card.name or Path(checkpoint).stem
    last = int(ck.exit_flops(lazy=True)[-1])
    slo = a.slo_ms or cap.default_slo_ms(checkpoint)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"name": name, "checkpoint": checkpoint, "smoke": a.smoke, "slo_ms": slo,
                 "speed_only": ck.card.speed_only, "official_args": ck.card.official_args,
                 "costs": costs_table(ck.costs),
                 "contract": ck.transforms.describe(), "machine": machine_info(),
                 "command": "python3 -m loadtest.realbench " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
                 "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")}
    photo = ck.config.image_size > 64
    if "decode" in a.parts:
        log("decode + preprocessing per image")
        res["decode"] = (decodecost.measure(checkpoint, 1, n_photos=2, n_camera=0) if a.smoke
                         else decodecost.measure(checkpoint, 5))
    if "blocks" in a.parts:
        log("per-block engine against the whole network")
        threads, batches = ((1,), (1,)) if a.smoke else ((1, 2), (1, 4, 16) if photo else (1, 16, 64))
        res["blocks"] = blocks.measure(checkpoint, threads, batches, 0.1 if a.smoke else 2.0)
    failures: list[str] = []
    if "capacity" in a.parts:
        plan = replace(plan_for(last, a.smoke), max_search_s=a.max_search_s)
        grid = SMOKE_GRID if a.smoke else (json.loads(Path(a.grid).read_text()) if a.grid else DEFAULT_GRID)
        cfgs, skipped = configs(grid, checkpoint, last)
        cfgs = [c for c in cfgs if not a.only or c.key in a.only or c.family in a.only]
        samples, source = samples_for(checkpoint, a.data_dir, limit=plan.images, camera_share=a.camera_share)
        log(f"capacity: {len(cfgs)} configuration(s), images: {len(samples)} {source}, SLO p99 <= {slo:g} ms")
        expected = cap.reference_classes(checkpoint, samples) if a.smoke else None
        res["capacity"] = {"plan": plan.search_dict(), "images": len(samples), "images_source": source,
                           "skipped": skipped, "grid": grid, "loadavg_at_start": os.getloadavg()}
        res["capacity"]["servers"], failures = cap.measure_configs(cfgs, samples, plan, slo, expected,
                                                                   tuple(a.encodings), batches_since)
        res["capacity"]["loadavg_at_end"] = os.getloadavg()
    res["failures"] = failures
    (out / f"realbench-{name}.json").write_text(json.dumps(res, indent=1, default=float))
    (out / f"REALBENCH-{name}.md").write_text(realreport.section(res))
    log(f"wrote {out / f'REALBENCH-{name}.md'}; {len(failures)} failure(s)")
    for f in failures:
        log(f"  FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
