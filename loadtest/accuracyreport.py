"""The accuracy watch's section of docs/BENCHMARKS.md (issue 24), from ``accuracywatch.json``
(:mod:`loadtest.parts.accuracywatch`).

:func:`merge_into` puts the section between its own markers, before the real-size part
(``loadtest.realreport``, which owns the file from its marker on), so that neither
``make bench`` nor ``make bench-real`` loses it. FLOPs are multiply-accumulates of
convs and linears (MSDNet paper convention).
"""

from __future__ import annotations

import json
from pathlib import Path

from .common import fmt, table, yes
from .realreport import MARKER as REAL_MARKER

BEGIN = "<!-- accuracy watch (issue 24): loadtest.accuracyreport -->"
END = "<!-- end of the accuracy watch -->"
GOAL_REQUESTS = 5000     # a shift that must be flagged is flagged within this many requests
GOAL_AUDIT_SHARE = 0.05  # audits' FLOPs over the FLOPs served
CLEAN = "clean"


def _pct(v, digits: int = 2) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}%"


def _points(v) -> str:
    return "–" if v is None else f"{v:+.2f}"


def _firing_cell(row: dict) -> str:
    """When an accuracy-watch alert fired in the phase; for a phase that began with one
    still firing from the shift before, how long it took to clear, and any firing after."""
    spans = row.get("firing_spans_s")
    if row.get("firing_at_start"):
        if spans is None:  # a run from before the spans were kept
            return f"still firing from the shift ({row['firing_seconds']} s of the phase)"
        first, rest = (spans[0], spans[1:]) if spans else ([0, 0], [])
        text = f"still firing from the shift; cleared after {first[1]:.0f} s"
        return text + (f"; fired again at {', '.join(f'{a:.0f} s' for a, _ in rest)}" if rest else "")
    if row["firing_after_requests"] is None:
        return "–"
    return f"{row['firing_after_requests']:,} ({row['firing_after_s']:.0f} s)"


def goals(res: dict) -> list[tuple[str, str, bool | None]]:
    """(goal, figure reached, met) for the goals of issue 24's item 4."""
    off, rows = res["offline"], res["stream"]["phases"]
    out = []
    for row in rows:
        if row["phase"] == CLEAN or not off.get(row["phase"], {}).get("must_flag"):
            continue
        n = row["firing_after_requests"]
        if row.get("firing_at_start"):  # an alert of the phase before still fired: this phase proves nothing
            out.append((f"'{row['phase']}' flagged within {GOAL_REQUESTS:,} requests",
                        "an alert still fired from the phase before", None))
            continue
        out.append((f"'{row['phase']}' flagged within {GOAL_REQUESTS:,} requests",
                    "not flagged" if n is None else f"{n:,} requests ({row['firing_after_s']:.0f} s)",
                    n is not None and n <= GOAL_REQUESTS))
    clean = [r for r in rows if r["phase"] == CLEAN]
    minutes = sum(r["seconds"] for r in clean[:1]) / 60
    fired = clean[0]["firing_seconds"] if clean else None
    met = None if fired is None or (fired == 0 and minutes < 30) else fired == 0  # shorter than 30 min: unjudged
    out.append((f"clean traffic for 30 min raises no alert (run: {minutes:.0f} min)",
                "–" if fired is None else f"{fired} s of firing accuracy-watch alerts in {minutes:.0f} min", met))
    shares = [r["audit_flops_share"] for r in rows if r["audit_flops_share"] is not None]
    worst = max(shares) if shares else None
    out.append((f"extra compute of sampling <= {GOAL_AUDIT_SHARE:.0%} of served FLOPs", f"at most {_pct(worst)}"
                " per phase", None if worst is None else worst <= GOAL_AUDIT_SHARE + 1e-9))
    cap = res.get("capacity")
    if cap:
        on, off_ = (cap[k]["capacity_rps"] for k in ("sampling 0.02 (default)", "sampling off"))
        out.append(("capacity unchanged within noise (one search step, x1.12)",
                    f"{on:,.0f} with sampling, {off_:,.0f} without (requests/s)",
                    max(on, off_) / max(min(on, off_), 1e-9) < 1.12 + 1e-9))
    return out


def section(res: dict) -> str:
    """The markdown section (between :data:`BEGIN` and :data:`END`)."""
    off, s = res["offline"], res["stream"]
    lines = [BEGIN, "", "# Accuracy watch (issue 24)", "",
             f"`python3 -m loadtest.accuracywatch --out docs --clean-s {res['clean_s']:g} --shift-s {res['shift_s']:g} "
             f"--recover-s {res['recover_s']:g} --rate {res['rate_rps']:g}` ({res['started']}; "
             f"{res['machine'].get('cpus', '?')} CPUs, {res['machine'].get('cpu', '')}): "
             "the shipped model with its defaults (audit share 0.02, "
             "audits at most 4% of the FLOPs served), Prometheus (Debian's) scraping every second with "
             "`deploy/prometheus/alerts.yml`, Poisson open-loop traffic of Fashion-MNIST test images, "
             f"clean for {res['clean_s'] / 60:g} min, then each shift for {res['shift_s'] / 60:g} min followed by "
             f"{res['recover_s'] / 60:g} min of clean images. Target {res['target_flops'] / 1e6:.2f} MFLOPs per "
             "request (multiply-accumulates)." + (f" {res['conditions']}" if res.get("conditions") else ""),
             "", "## Goals", ""]
    lines += table(["goal", "reached", "met"], [[g, f, yes(m) if m is not None else "–"] for g, f, m in goals(res)])
    lines += ["", "## What each shift does to the answers (offline, 10,000 test images)", "",
              "Thresholds from the calibration curve's point whose mean cost on the shifted images is at most the "
              "target (what the controller converges to); the curve's residual is then about the target minus "
              "that point's validation cost. 'Must flag': served − last moves by more than 1 point or agreement "
              "by more than 5 points against the clean images.", ""]
    lines += table(["images", "last exit top-1", "served top-1", "served − last (points)", "served = last exit's",
                    "mean confidence, exit 1", "curve residual / target", "must flag"],
                   [[name, _pct(f["last_top1"]), _pct(f["served_top1"]),
                     _points(100 * (f["served_top1"] - f["last_top1"])), _pct(f["agreement"]),
                     f"{f['mean_confidence_exit1']:.3f}", _pct(f.get("bias_ratio_expected"), 1),
                     ("yes" if f.get("must_flag") else "no") if name != CLEAN else "–"]
                    for name, f in off.items()])
    lines += ["", "## Served: when the alerts fired", "",
              "Requests counted from the start of the phase; 'pending': the alert's expression first true (the "
              "signal left its band), 'firing': after the rule's `for`. Audit share: the audits' FLOPs over the "
              "FLOPs served to /classify in the phase (Prometheus `increase`).", ""]
    lines += table(["phase", "requests", "served top-1", "mean MFLOPs", "pending after", "firing after",
                    "first alert", "audit share", "p99 ms"],
                   [[r["phase"], f"{r['requests']:,}", _pct(r["served_top1"]),
                     fmt(None if r["mean_flops"] is None else r["mean_flops"] / 1e6, "{:.2f}"),
                     "–" if r["pending_after_requests"] is None or r.get("firing_at_start") else
                     f"{r['pending_after_requests']:,} ({r['pending_after_s']:.0f} s)",
                     _firing_cell(r),
                     ", ".join(sorted((k for k, v in r["firing_by_alert_s"].items() if v is not None),
                                      key=lambda k: r["firing_by_alert_s"][k])) or "–",
                     _pct(r["audit_flops_share"]), fmt(r["p99_ms"], "{:.1f}")]
                    for r in s["phases"]])
    cap = res.get("capacity")
    if cap:
        def shown(c: dict) -> str:
            return "; ".join(f"{k}: {v['capacity_rps']:,.0f}" for k, v in c.items()) + " requests/s"

        lines += ["", "Capacity at p99 <= 100 ms (raw PNG, `loadtest.parts.capacity.find_capacity`, after the "
                  f"stream, `--capacity-only`): {shown(cap)}."
                  + "".join(f" Search repeated: {shown(again)} (the search's noise)."
                            for again in res.get("capacity_repeats", []))]
    lines += ["", f"Other alerts that fired during the run: {', '.join(s['other_alerts']) or 'none'}. "
              f"Labels sent (`POST /feedback`, every {res.get('label_every', 10)}th request, 2 s later): "
              f"{s['feedback_statuses']}.", "", "![accuracy watch signals across the shifts](accuracywatch.png)", "",
              END, ""]
    return "\n".join(lines)


def docs_part(folder) -> str:
    """:func:`section` of ``folder/accuracywatch.json``; "" when there is none."""
    path = Path(folder) / "accuracywatch.json"
    return section(json.loads(path.read_text())) if path.exists() else ""


def merge_into(benchmarks, folder) -> None:
    """Put :func:`docs_part` of ``folder`` into the file ``benchmarks``: in place of an
    earlier one, else before the real-size part, else at the end."""
    path = Path(benchmarks)
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)].rstrip("\n") + "\n\n" + text[text.index(END) + len(END):].lstrip("\n")
    part = docs_part(folder)
    if REAL_MARKER in text:
        cut = text.index(REAL_MARKER)
        text = text[:cut].rstrip("\n") + "\n\n" + part + "\n" + text[cut:]
    else:
        text = text.rstrip("\n") + "\n\n" + part
    path.write_text(text)
