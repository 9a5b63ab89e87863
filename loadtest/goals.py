"""Issue 12's goals from the measurements of ``python -m loadtest.bench``: the
figure each goal is judged on (:func:`figures`) and the report's goals table
(:func:`goals_section`). msdnet-serve is judged in its default configuration,
each peer in its best. FLOPs = multiply-accumulates of convs and linears (MSDNet
paper), cumulative per exit; 1 MFLOPs = 10⁶ of them."""

from __future__ import annotations

from .capacityreport import best_per_family
from .common import (
    ENCODING_LABELS,
    ENCODINGS,
    TARGET_ACC_DROP_POINTS,
    TARGET_BLOCKS_B1,
    TARGET_BLOCKS_B64,
    TARGET_DEADLINE_SHARE,
    TARGET_FLOPS_ERROR,
    TARGET_PEER_RATIO,
    TARGET_SERVER_CORES,
    TARGET_STALL_CLASSIFY_MS,
    TARGET_STALL_HEALTHZ_MS,
    fmt,
    pct,
    table,
    yes,
)
from .parts.accuracy import TARGET_POINTS

MF = 1e6  # MACs per MFLOPs


def _get(d: dict, k):
    """``d[k]`` whether the JSON round trip made the int key a string or not."""
    return d[k] if k in d else d[str(k)]


def best_of(a: dict, family: str, enc: str) -> tuple[str, float, dict] | None:
    """(key, capacity, trial at capacity) of ``family``'s best configuration for ``enc``."""
    found = best_per_family(a).get(family, {}).get(enc)
    if found is None:
        return None
    key, cap = found
    return key, cap, a["servers"][key]["encodings"][enc].get("at_capacity") or {}


def default_of(a: dict, family: str, enc: str) -> tuple[str, float, dict] | None:
    """The same for the configuration with the server's defaults (``<family>-default``)."""
    key = f"{family}-default"
    run = a["servers"].get(key, {}).get("encodings", {}).get(enc)
    if run is None:
        return best_of(a, family, enc)
    return key, run["capacity_rps"], run.get("at_capacity") or {}


def figures(res: dict) -> dict:
    """Every goal's figure from the measurements (None where the part did not run)."""
    f: dict = {}
    a = res.get("a")
    if a:
        for enc in ENCODINGS:
            m, last = default_of(a, "msdnet", enc), default_of(a, "msdnet-last", enc)
            peers = {fam: best_of(a, fam, enc) for fam in ("litserve", "ray")}
            row = {"msdnet": m, "last": last, "peers": peers}
            if m:
                row["ratios"] = {fam: (m[1] / p[1] if p and p[1] else None) for fam, p in peers.items()}
                best_peer = max((p[1] for p in peers.values() if p), default=None)
                row["last_vs_best_peer"] = last[1] / best_peer if last and best_peer else None
                row["gain"] = m[1] / last[1] if last and last[1] else None
                fm, fl = m[2].get("mean_flops"), (last[2].get("mean_flops") if last else None)
                row["flops_ratio"] = fl / fm if fm and fl else None
                row["server_cores"] = m[2].get("server_cores")
                row["client_cores"] = m[2].get("client_cores")
            f[enc] = row
    return f


def ratio(v) -> str:
    return fmt(v, "{:.2f}×")


def goals_section(res: dict) -> list[str]:
    """Issue 12's goals: one row each with the figure of this run and whether it is met."""
    fig, rows = figures(res), []
    if res.get("a"):
        for enc in ENCODINGS:
            r = fig.get(enc, {})
            if not r.get("msdnet"):
                continue
            ratios = r["ratios"]
            ok = all(v is not None and v >= TARGET_PEER_RATIO for v in ratios.values())
            lit, ray = (fmt(r["peers"][k] and r["peers"][k][1], "{:g}") for k in ("litserve", "ray"))
            rows.append([f"1. capacity at p99 ≤ {res['slo_ms']:g} ms ≥ {TARGET_PEER_RATIO}× LitServe's and Ray "
                         f"Serve's ({ENCODING_LABELS[enc]})",
                         f"{r['msdnet'][1]:g} req/s: {ratio(ratios['litserve'])} LitServe's best ({lit}), "
                         f"{ratio(ratios['ray'])} Ray Serve's ({ray})", yes(ok)])
            lv = r.get("last_vs_best_peer")
            rows.append([f"1. forced to the last exit ≥ the best peer ({ENCODING_LABELS[enc]})",
                         f"{fmt(r['last'] and r['last'][1], '{:g}')} req/s = {ratio(lv)} the best peer",
                         yes(lv is not None and lv >= 1)])
    e = res.get("e")
    if e and e.get("last_exit_top1") is not None:
        d = 100 * (e["served_top1"] - e["last_exit_top1"])
        rows.append([f"1. served accuracy within {TARGET_ACC_DROP_POINTS} points of the last exit's",
                     f"{100 * e['served_top1']:.2f}% served vs {100 * e['last_exit_top1']:.2f}% at the last exit "
                     f"({d:+.2f} points, {e['answered']:,} test images, section 7)",
                     yes(d >= -TARGET_ACC_DROP_POINTS)])
    if res.get("a"):
        for enc in ENCODINGS:
            r = fig.get(enc, {})
            if r.get("server_cores") is None:
                continue
            rows.append([f"2. server processes keep ≥ {TARGET_SERVER_CORES} cores busy at capacity "
                         f"({ENCODING_LABELS[enc]})",
                         f"server {r['server_cores']:.2f} + client {r['client_cores']:.2f} cores",
                         yes(r["server_cores"] >= TARGET_SERVER_CORES)])
    if res.get("s"):
        cells = "; ".join(f"{row['encoding']}: {row['cpu_ms_outside_network']:.2f} of {row['cpu_ms_per_request']:.2f} "
                          "ms" for row in res["s"]["rows"])
        rows.append(["2. CPU per request outside the network, from a profile", cells + " (section 2)", "reported"])
    c = res.get("c")
    if c:
        r80 = next((r for r in c["rows"] if abs(r["load"] - 0.8) < 1e-9), None)
        if r80:
            rows.append([f"3. ≥ {TARGET_DEADLINE_SHARE:.1%} of 25/50/100 ms deadlines met at 80% of capacity",
                         f"{pct(r80['met'])}% of {r80['requests']:,}",
                         yes(r80["met"] is not None and r80["met"] >= TARGET_DEADLINE_SHARE)])
    fl = res.get("f")
    if fl:
        h, k = fl["healthz"].get("p99_ms"), fl["classify"].get("p99_ms")
        expired = fl["statuses"].get("expired 504", 0)
        sent = sum(v for kk, v in fl["statuses"].items() if kk.startswith("expired"))
        rows.append([f"4. under the floods: `/healthz` p99 < {TARGET_STALL_HEALTHZ_MS:g} ms, a normal `/classify` "
                     f"p99 < {TARGET_STALL_CLASSIFY_MS:g} ms, an expired request costs no decoding",
                     f"{fmt(h)} ms; {fmt(k)} ms; {expired:,} of {sent:,} expired requests answered 504, "
                     f"{fl['rejected_deadline']:.0f} counted as refused before decoding",
                     yes(h is not None and k is not None and h < TARGET_STALL_HEALTHZ_MS
                          and k < TARGET_STALL_CLASSIFY_MS and expired == sent == fl["rejected_deadline"])])
    d = res.get("d")
    if d:
        cells, ok = [], True
        for t, by_b in d["results"].items():
            r1 = _get(by_b, 1)["per-block ORT / whole ORT"]["wall"] if _has(by_b, 1) else None
            r64 = _get(by_b, 64)["per-block ORT / whole ORT"]["wall"] if _has(by_b, 64) else None
            cells.append(f"{t} thread(s): batch 64 {ratio(r64)}, batch 1 {ratio(r1)}")
            ok &= r64 is not None and r64 >= TARGET_BLOCKS_B64 and r1 is not None and r1 >= TARGET_BLOCKS_B1
        rows.append(["5. per-block engine's GMAC/s ≥ whole-network ONNX Runtime's at batch 64, within 1.5× at "
                     "batch 1", "; ".join(cells), yes(ok)])
    if res.get("a"):
        cells = [f"{ENCODING_LABELS[enc]}: {ratio(fig[enc].get('gain'))} (FLOPs ratio "
                 f"{ratio(fig[enc].get('flops_ratio'))})"
                 for enc in ENCODINGS if fig.get(enc, {}).get("msdnet")]
        rows.append(["6. early-exit gain: capacity controller on / forced to the last exit, beside the FLOPs ratio",
                     "; ".join(cells) + " (section 6)", "reported"])
    b = res.get("b")
    if b:
        eb = b["max_abs_error_constant"]
        rows.append([f"7. controller: mean FLOPs within ±{TARGET_FLOPS_ERROR:.0%} of the target in every "
                     f"{b['window']:,}-request window", f"max \\|error\\| {pct(eb)}%",
                     yes(eb is not None and eb <= TARGET_FLOPS_ERROR)])
    if e and e.get("fixed_top1") is not None:
        rows.append([f"7. controller on steady traffic: served accuracy within {TARGET_POINTS} points of fixed "
                     "thresholds at the same mean FLOPs",
                     f"{e['difference_points']:+.3f} points ({100 * e['served_top1']:.2f}% vs "
                     f"{100 * e['fixed_top1']:.2f}% at {e['served_mean_flops'] / MF:.3f} MFLOPs)",
                     yes(e.get("target_met"))])
    return ["## Goals (issue 12)", "", *table(["goal", "this run", ""], rows), ""]


def _has(d: dict, k) -> bool:
    return k in d or str(k) in d
