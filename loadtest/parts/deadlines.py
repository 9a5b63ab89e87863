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
                   warmup_s=plan.warmup_s, timeout_s=plan.timeout_s, seed=3000 + j)
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
        time.sleep(plan.pause_s)
    return rows


def run(url: str, samples, capacity: float, deadlines: tuple[float, ...], plan: Plan) -> dict:
    """Part c on a started msdnet-serve; ``target_met``: at least
    ``TARGET_DEADLINE_SHARE`` met at 80% of capacity."""
    rows = deadline_runs(url, samples, max(capacity, plan.min_rate), deadlines, plan)
    r80 = next((r for r in rows if abs(r["load"] - 0.8) < 1e-9), None)
    return {"capacity": capacity, "deadlines": list(deadlines), "rows": rows,
            "target_met": bool(r80 and r80["met"] is not None and r80["met"] >= TARGET_DEADLINE_SHARE)}
