"""Memory of one large ``/batch``: ``python3 -m loadtest.batchmem --checkpoint X [--images 64]``.

Starts ``msdnet serve`` with its defaults (access log off), samples the RSS of the
server's whole process tree (CLI, engine, HTTP workers, decoding processes) every
20 ms, and sends one ``POST /batch`` of ``--images`` images (the checkpoint's
kind: generated photo-like JPEGs for photo contracts, speed-only) with a FLOPs
budget of each ``--shares`` x images x the last exit's cost. Prints, and writes
with ``--json``, the tree's RSS before, its peak, the FLOPs used against the
budget and the exits taken. Bounded: one request per share, loopback only.

FLOPs = multiply-accumulates of convs and linears (MSDNet paper convention),
cumulative per exit, lazy evaluation.
"""

from __future__ import annotations

import argparse
import base64
import json
import threading
import time

import httpx
import psutil

from model.checkpoint import load

from .harness import ServerProcess, process_tree, serve_command
from .samples import samples_for


def tree_rss(pid: int) -> int:
    """Bytes resident in ``pid`` and its descendants (0 for those gone meanwhile)."""
    total = 0
    for p in [pid, *process_tree(pid)]:
        try:
            total += psutil.Process(p).memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(checkpoint: str, images: int, shares: list[float], seed: int = 0) -> dict:
    """One ``/batch`` per budget share; the tree's RSS before and at its peak (bytes).

    Raises:
        RuntimeError: when the server does not start or a request is not answered 200.
    """
    flops = load(checkpoint).exit_flops(lazy=True)
    samples, source = samples_for(checkpoint, limit=images, seed=seed, camera_share=0.0)
    bodies = [base64.b64encode(s.data).decode("ascii") for s in samples[:images]]
    out = {"checkpoint": checkpoint, "images": len(bodies), "source": source, "runs": []}
    with ServerProcess(serve_command(checkpoint), {"MSDNET_ACCESS_LOG": "false"}, ready_timeout_s=600,
                       name="batchmem") as srv:
        out["rss_before"] = tree_rss(srv.proc.pid)
        peak, stop = [out["rss_before"]], threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], tree_rss(srv.proc.pid))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            for share in shares:
                budget = int(share * len(bodies) * flops[-1])
                t0 = time.perf_counter()
                r = httpx.post(srv.url + "/batch", json={"images": bodies, "flops_budget": budget}, timeout=600)
                if r.status_code != 200:
                    raise RuntimeError(f"/batch answered {r.status_code}: {r.text[:300]}")
                d = r.json()
                out["runs"].append({"share": share, "flops_budget": budget, "flops_used": d["flops_used"],
                                    "exit_counts": d["exit_counts"], "seconds": time.perf_counter() - t0})
        finally:
            stop.set()
            watcher.join()
        out["rss_peak"] = peak[0]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--shares", type=float, nargs="+", default=[0.4, 1.0],
                   help="budgets as shares of images x the last exit's FLOPs")
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args(argv)
    out = measure(a.checkpoint, a.images, a.shares)
    for run in out["runs"]:
        print(f"/batch of {out['images']}: budget {run['share']:.0%} of the last exit, {run['flops_used'] / 1e9:.2f} "
              f"of {run['flops_budget'] / 1e9:.2f} GFLOPs used, exits {run['exit_counts']}, {run['seconds']:.1f} s")
    print(f"server tree RSS: {out['rss_before'] / 2**20:.0f} MiB before, peak {out['rss_peak'] / 2**20:.0f} MiB "
          f"(+{(out['rss_peak'] - out['rss_before']) / 2**20:.0f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
