"""The overload part of ``docs/BENCHMARKS.md`` (issue 25), from ``overload-NAME.json`` files
that ``python3 -m loadtest.overload`` writes. Rendered with the real-size part
(``python3 -m loadtest.realreport --docs DIR``), so ``make bench`` keeps it.

FLOPs are multiply-accumulates of convs and linears (MSDNet paper convention), per
request, cumulative to the exit taken.
"""

from __future__ import annotations

import json
from pathlib import Path

from .common import fmt, pct, table

ORDER = ("fashion", "cifar100-7", "imagenet-5")


def _p(v, spec: str = "{:.2f}") -> str:
    """A share as a percentage with its sign ('–' for None)."""
    return "–" if v is None else pct(v, spec) + "%"


def _m(flops) -> str:
    """FLOPs in MFLOPs: two decimals for a small network, none for a large one."""
    if flops is None:
        return "–"
    return fmt(flops / 1e6, "{:.2f}" if flops < 100e6 else "{:.0f}")


def _ms(v) -> str:
    return fmt(v, "{:.0f}")


def goals(res: dict) -> list[list[str]]:
    """Rows (goal, figure, met?) of goals 1-3 for one network."""
    slo, c1 = res["objective_ms"], res["capacity_exit1_rps"]
    up_to = [s for s in res["sweep"] if s["rate"] <= c1]
    past = [s for s in res["sweep"] if s["rate"] > c1]
    worst = min((s["within_share"] for s in up_to), default=None)
    refused = max((s["refused_share"] for s in up_to), default=None)
    rows = [["2. ≥ 99% within the objective and none refused at every rate up to C1",
             f"worst {_p(worst)} within, at most {_p(refused)} refused, at "
             + ", ".join(f"{s['rate']:.0f}" for s in up_to) + " req/s",
             "met" if worst is not None and worst >= 0.99 and refused == 0 else "**not met**"]]
    for s in past:
        kept = s["refused_share"] == 0 and s["within_share"] >= 0.99  # nothing to refuse: all within
        ok = kept or (s["refusal_p99_ms"] is not None and s["refusal_p99_ms"] <= 10
                      and (s["answered_p99_ms"] or 0) <= slo)
        rows.append([f"2. past C1 ({s['rate']:.0f} req/s): excess refused within 10 ms, the rest within the objective",
                     f"{_p(s['refused_share'])} refused, refusal p99 {_ms(s['refusal_p99_ms'])} ms, answered p99 "
                     f"{_ms(s['answered_p99_ms'])} ms", "met" if ok else "**not met**"])
    backs = [b for b in res["burst"]["back_after_s"]]
    rows.append(["2. configured target back within 5 s after each burst",
                 ", ".join("never" if b is None else f"{b:.1f} s" for b in backs),
                 "met" if backs and all(b is not None and b <= 5 for b in backs) else "**not met**"])
    swing = res["step"]["steady_1p5x"]["swing"]
    rows.append(["2. no swing of the target in force over 10% once the load is steady (1.5x, last half)",
                 f"{_p(swing, '{:.1f}') if swing is not None else '–'} ({_m(res['step']['steady_1p5x']['min'])}-"
                 f"{_m(res['step']['steady_1p5x']['max'])} MFLOPs)",
                 "met" if swing is not None and swing <= 0.10 else "**not met**"])
    eff = res.get("effective") or {}
    ours = eff.get("msdnet-serve (objective) @ 3.0x", {}).get("effective_accuracy")
    peers = [v.get("effective_accuracy") for k, v in eff.items() if k.endswith("@ 3.0x") and "msdnet" not in k]
    if ours is not None and peers:
        best = max(p for p in peers if p is not None)
        rows.append(["3. effective accuracy at 3x ≥ 2x the best peer's", f"{_p(ours)} vs {_p(best)}",
                     "met" if best == 0 or ours >= 2 * best else "**not met**"])
    return rows


def section(res: dict) -> str:
    """One network's overload figures: goals, the step phases, the sweep, the bursts, the peers."""
    slo, c, c1 = res["objective_ms"], res["capacity_rps"], res["capacity_exit1_rps"]
    name = res["network"]
    w = [f"## Overload: {name}, objective {slo:g} ms", "",
         f"`python3 -m loadtest.overload --size {name} --out DIR` ({res['started']}; images: {res['images']}). "
         f"msdnet-serve with its defaults and `MSDNET_LATENCY_SLO_MS={slo:g}`; open-loop Poisson arrivals, latency "
         f"from each request's scheduled send. C = {c:.1f} req/s (capacity at p99 ≤ {slo:g} ms at the configured "
         f"target of {_m(res['target_flops'])} MFLOPs, no objective), C1 = {c1:.1f} req/s (forced to exit 1, "
         f"{_m(res['exit_flops'][0])} MFLOPs: the physical limit of degrading). Load average at the end: "
         f"{', '.join(f'{x:.2f}' for x in res.get('loadavg_at_end', []))}." + (
             f" {res['conditions']}" if res.get("conditions") else ""), ""]
    w += table(["goal", "figure", "met?"], goals(res)) + [""]
    names = ["0.5x", "1.5x", "3x", "0.5x again"]
    rows = [[names[i], f"{rate:.0f}", str(s["sent"]), _p(s["within_share"]), _p(s["refused_share"]),
             _ms(s["answered_p99_ms"]), _ms(s["refusal_p99_ms"]), fmt(s["mean_exit"], "{:.2f}"), _m(s["mean_flops"])]
            for i, ((_, rate), s) in enumerate(zip(res["step"]["phases"], res["step"]["phase_scores"]))]
    w += [f"**Step trace** ({res['step']['phases'][0][0]:g} s a phase; per second in the JSON and the plot):", ""]
    w += table(["phase", "req/s", "sent", "within objective", "refused", "answered p99 (ms)", "refusal p99 (ms)",
                "mean exit", "mean MFLOPs"], rows) + [""]
    b = res["burst"]["score"]
    w += [f"**Bursts** (3C for 2 s, 0.5C for 4 s, {len(res['burst']['back_after_s'])} times): "
          f"{_p(b['within_share'])} within the objective, {_p(b['refused_share'])} refused (p99 "
          f"{_ms(b['refusal_p99_ms'])} ms), answered p99 {_ms(b['answered_p99_ms'])} ms.", ""]
    rows = [[f"{s['rate']:.0f}", f"{s['rate'] / c:.2f}", _p(s["within_share"]), _p(s["refused_share"]),
             _ms(s["refusal_p99_ms"]), _ms(s["answered_p99_ms"]), fmt(s["mean_exit"], "{:.2f}"), _m(s["mean_flops"])]
            for s in res["sweep"]]
    w += ["**Steady rates** (each after 2 s of warm-up):", ""]
    w += table(["req/s", "x C", "within objective", "refused", "refusal p99 (ms)", "answered p99 (ms)", "mean exit",
                "mean MFLOPs"], rows) + [""]
    if res.get("effective"):
        rows = [[k, _p(v["effective_accuracy"]), _p(v["within_share"]), _p(v["refused_share"]),
                 _ms(v["answered_p99_ms"]), str(v["other_failures"])] for k, v in res["effective"].items()]
        w += ["**Effective accuracy** (correct answers within the objective / requests sent; the peers run the "
              "whole network with their own queueing, 1 worker each):", ""]
        w += table(["server @ load", "effective accuracy", "within objective", "refused", "answered p99 (ms)",
                    "timeouts/errors"], rows) + [""]
    w += [f"![overload {name}](overload-{name}.png)", ""]
    return "\n".join(w)


LOOPS = "loops-overload.json"  # the loop variants' side-by-side (not an overload-*.json: no section of its own)


def loop_row(label: str, res: dict) -> dict:
    """One run of ``loadtest.overload`` reduced to what tells two control loops apart."""
    step, scores = res["step"], res["step"]["phase_scores"]
    backs = [step.get("back_after_s"), *res["burst"]["back_after_s"]]
    return {"label": label, "git": res["machine"].get("git", "?"), "started": res["started"],
            "loadavg_at_start": res["machine"].get("loadavg_at_start", [None])[0],
            "within_1p5": scores[1]["within_share"], "refused_1p5": scores[1]["refused_share"],
            "mean_flops_1p5": scores[1]["mean_flops"], "swing_1p5": step["steady_1p5x"]["swing"],
            "within_3": scores[2]["within_share"], "refused_3": scores[2]["refused_share"],
            "back_max_s": None if any(b is None for b in backs) else max(backs)}


def loops_part(folder) -> str:
    """The side-by-side of control-loop variants (``folder/loops-overload.json``, written by
    ``python3 -m loadtest.overloadreport --loops OUT LABEL=RUN.json ...``); "" when none."""
    path = Path(folder) / LOOPS
    if not path.exists():
        return ""
    data = json.loads(path.read_text())
    rows = [[r["label"], r["git"], fmt(r["loadavg_at_start"], "{:.1f}"), _p(r["within_1p5"]), _p(r["refused_1p5"]),
             _m(r["mean_flops_1p5"]), _p(r["swing_1p5"], "{:.1f}"), _p(r["within_3"]), _p(r["refused_3"]),
             fmt(r["back_max_s"], "{:.1f}") if r["back_max_s"] is not None else "not within the phase"]
            for r in data["runs"]]
    return "\n".join([f"## The control loop, variants side by side ({data['network']})", "", data["note"], ""]
                     + table(["loop", "git", "load avg at start", "1.5C within", "1.5C refused", "1.5C mean MFLOPs",
                              "1.5C swing", "3C within", "3C refused", "slowest return to target (s)"], rows)
                     + [""])


def docs_part(folder) -> str:
    """The overload part: a heading and :func:`section` of every ``folder/overload-*.json`` ("" when none)."""
    files = sorted(Path(folder).glob("overload-*.json"),
                   key=lambda f: ORDER.index(f.stem[9:]) if f.stem[9:] in ORDER else len(ORDER))
    if not files:
        return ""
    head = ["", "# Overload: the latency objective (issue 25)", "",
            "What `MSDNET_LATENCY_SLO_MS` does under more load than the configured FLOPs target can serve: the "
            "target in force drops towards exit 1's cost, and only past exit 1's capacity are requests refused "
            "(503 with Retry-After, before decoding). Real sizes: speed-only networks (random weights), so "
            "exits and FLOPs, not accuracy. The same 2 cores run the client.", ""]
    loops = loops_part(folder)
    return ("\n".join(head) + "\n" + "\n".join(section(json.loads(f.read_text())) for f in files)
            + ("\n" + loops if loops else ""))


def main(argv: list[str] | None = None) -> int:
    """``--loops OUT NOTE_FILE LABEL=RUN.json ...``: write the side-by-side of loop variants."""
    import argparse

    p = argparse.ArgumentParser(prog="python3 -m loadtest.overloadreport", description=main.__doc__)
    p.add_argument("--loops", nargs="+", metavar="ARG", required=True,
                   help="OUT.json, a file with the paragraph above the table, then LABEL=RUN.json pairs")
    a = p.parse_args(argv)
    out, note, *pairs = a.loops
    runs = [json.loads(Path(path).read_text()) for _, path in (pair.split("=", 1) for pair in pairs)]
    rows = [loop_row(pair.split("=", 1)[0], res) for pair, res in zip(pairs, runs)]
    Path(out).write_text(json.dumps({"network": runs[0]["network"], "note": Path(note).read_text().strip(),
                                     "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
