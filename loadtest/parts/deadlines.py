"""Part c: deadlines met at shares of msdnet-serve's capacity, and the exits taken.
Every request carries a deadline (``?deadline_ms=``) drawn from a small set."""

from __future__ import annotations

import time

from .. import openloop as ol
from ..common import TARGET_DEADLINE_SHARE, Plan, log


def _server_met_share(recs, deadline_of) -> float | None:
    """Share of ``recs`` answered 200 whose own ``latency_ms`` (the server's clock)
    is within ``deadline_of(record)`` ms; None for no records."""
    if not recs:
        return None
    return sum(x.status == 200 and x.server_latency_ms is not None and x.server_latency_ms <= deadline_of(x)
               for x in recs) / len(recs)


def deadline_runs(url: str, samples, capacity: float, deadlines: tuple[float, ...], plan: Plan) -> list[dict]:
    """One open-loop run per share of ``capacity`` (requests/s) in ``plan.loads``;
    ``deadlines`` in ms. Met = 200 within the deadline from the scheduled send time."""
    rows = []
    for j, load in enumerate(plan.loads):
        rate = max(capacity * load, 1.0)
        r = ol.run(url, ol.classify_requests(samples, deadlines, seed=3000 + j), rate, plan.deadline_s,
                   warmup_s=plan.part_warmup_s, timeout_s=plan.timeout_s, seed=3000 + j)
        recs = r.scored()
        s = ol.summarise(recs, plan.deadline_s)
        per = {}
        for d in deadlines:
            sub = [x for x in recs if x.deadline_ms == d]
            per[f"{d:g}"] = {"n": len(sub), "met": sum(bool(x.deadline_met) for x in sub) / len(sub) if sub else None,
                             "server_met": _server_met_share(sub, lambda x, d=d: d)}
        rows.append({"load": load, "rate": rate, "requests": s["requests"], "met": s["deadline_met_share"],
                     "server_met": _server_met_share(recs, lambda x: x.deadline_ms),
                     "per_deadline": per, "statuses": s["statuses"], "exits": s["exits"], "p99_ms": s["p99_ms"],
                     "accuracy": s["accuracy"], "mean_flops": s["mean_flops"],
                     "send_lag_p99_ms": s["send_lag_p99_ms"]})
        log(f"  {load:.0%} of capacity ({rate:.1f} req/s): met {s['deadline_met_share']}, "
            f"statuses {s['statuses']}, exits {s['exits']}")
        time.sleep(plan.part_pause_s)
    return rows


def run(url: str, samples, capacity: float, deadlines: tuple[float, ...], plan: Plan) -> dict:
    """Part c on a started msdnet-serve; ``target_met``: at least
    ``TARGET_DEADLINE_SHARE`` met at 80% of capacity."""
    rows = deadline_runs(url, samples, max(capacity, plan.min_rate), deadlines, plan)
    r80 = next((r for r in rows if abs(r["load"] - 0.8) < 1e-9), None)
    return {"capacity": capacity, "deadlines": list(deadlines), "rows": rows,
            "target_met": bool(r80 and r80["met"] is not None and r80["met"] >= TARGET_DEADLINE_SHARE)}


def main(argv: list[str] | None = None) -> int:
    """``python3 -m loadtest.parts.deadlines --capacity R --out DIR``: part c alone,
    on ``msdnet serve`` with its defaults (``--workers`` to change them), at the
    plan's shares of ``R`` requests/s (measure R with ``loadtest.capacity``)."""
    import argparse
    import dataclasses
    import json
    import shutil
    from pathlib import Path

    from ..common import FULL
    from ..samples import load_samples
    from ..servers import TreeServer

    p = argparse.ArgumentParser(prog="python3 -m loadtest.parts.deadlines", description=main.__doc__.splitlines()[0])
    p.add_argument("--capacity", type=float, required=True, help="requests/s at p99 <= 100 ms, measured before")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int)
    p.add_argument("--deadlines-ms", default="25,50,100")
    p.add_argument("--loads", default="0.5,0.8,1.0", help="shares of --capacity")
    p.add_argument("--seconds", type=float, default=FULL.deadline_s, help="scored seconds per load")
    p.add_argument("--data-dir")
    args = p.parse_args(argv)
    plan = dataclasses.replace(FULL, loads=tuple(float(x) for x in args.loads.split(",")), deadline_s=args.seconds)
    env = {"MSDNET_ACCESS_LOG": "false", "MSDNET_LOG_LEVEL": "warning"}
    if args.workers:
        env["MSDNET_WORKERS"] = str(args.workers)
    samples = load_samples(args.data_dir)
    with TreeServer([shutil.which("python3") or "python3", "-m", "server.cli", "serve"], env, name="deadlines") as srv:
        res = run(srv.url, samples, args.capacity, tuple(float(x) for x in args.deadlines_ms.split(",")), plan)
    res["workers"] = args.workers or "default"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deadlines.json").write_text(json.dumps(res, indent=1, default=float))
    for r in res["rows"]:
        log(f"{r['load']:.0%} ({r['rate']:.0f} req/s): met {r['met']}, per deadline "
            f"{ {k: v['met'] for k, v in r['per_deadline'].items()} }, p99 {r['p99_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
