"""The accuracy watch's benchmark report (issue 24) from a made-up run: goals judged,
the section merged into BENCHMARKS.md before the real-size part and replaced on a
rerun. Plain Python: no server, no torch."""

from __future__ import annotations

import copy

from loadtest import accuracyreport as rep
from loadtest.realreport import MARKER

ROW = {"seconds": 300.0, "requests": 6000, "ok": 6000, "served_top1": 0.9, "mean_flops": 5.75e6, "p99_ms": 9.0,
       "audit_flops_share": 0.049, "pending_after_s": None, "pending_after_requests": None, "firing_after_s": None,
       "firing_after_requests": None, "firing_by_alert_s": {}, "firing_seconds": 0}
OFF = {"last_top1": 0.93, "served_top1": 0.929, "agreement": 0.98, "mean_confidence_exit1": 0.9, "p": 1.0}


def run(clean_s=1800.0, fired=None, audit=0.049) -> dict:
    shifted = {**ROW, "phase": "contrast halved", "audit_flops_share": audit}
    if fired is not None:
        shifted.update(firing_after_s=fired / 20, firing_after_requests=fired, pending_after_s=fired / 40,
                       pending_after_requests=fired // 2, firing_by_alert_s={"MsdnetThresholdsOffCalibration": 9.0})
    return {"clean_s": clean_s, "shift_s": 300.0, "recover_s": 300.0, "rate_rps": 20.0, "started": "2026-12-07",
            "machine": {"cpus": 2, "cpu": "x"}, "target_flops": 5.75e6, "label_every": 10,
            "offline": {"clean": OFF, "contrast halved": {**OFF, "must_flag": True, "agreement": 0.82},
                        "darker x0.6": {**OFF, "must_flag": False}},
            "stream": {"phases": [{**ROW, "phase": "clean", "seconds": clean_s}, shifted,
                                  {**ROW, "phase": "darker x0.6"}],
                       "other_alerts": [], "feedback_statuses": {200: 10}}}


def test_goals_are_judged_from_the_run():
    g = {name: met for name, _, met in rep.goals(run(fired=3000))}
    assert g["'contrast halved' flagged within 5,000 requests"] is True
    assert g["clean traffic for 30 min raises no alert (run: 30 min)"] is True
    assert g["extra compute of sampling <= 5% of served FLOPs"] is True
    late = {name: met for name, _, met in rep.goals(run(clean_s=600.0, fired=6000, audit=0.06))}
    assert late["'contrast halved' flagged within 5,000 requests"] is False
    assert late["clean traffic for 30 min raises no alert (run: 10 min)"] is None  # too short to judge
    assert late["extra compute of sampling <= 5% of served FLOPs"] is False
    assert not any("darker" in name for name in g)  # a shift that need not be flagged is not a goal


def test_section_merges_before_the_real_size_part_and_is_replaced(tmp_path):
    import json

    (tmp_path / "accuracywatch.json").write_text(json.dumps(run(fired=3000)))
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text(f"# Benchmarks\n\nintro\n\n{MARKER}\n\n# Real sizes\n")
    rep.merge_into(bench, tmp_path)
    text = bench.read_text()
    assert text.index("# Benchmarks") < text.index(rep.BEGIN) < text.index(rep.END) < text.index(MARKER)
    assert "3,000 (150 s)" in text and "MsdnetThresholdsOffCalibration" in text
    again = copy.deepcopy(run(fired=4000))
    (tmp_path / "accuracywatch.json").write_text(json.dumps(again))
    rep.merge_into(bench, tmp_path)
    text = bench.read_text()
    assert text.count(rep.BEGIN) == 1 and "4,000 (200 s)" in text and "3,000 (150 s)" not in text
    assert text.endswith("# Real sizes\n")


def test_a_phase_that_starts_with_the_shifts_alert_says_when_it_cleared_and_any_refiring():
    from loadtest.parts.accuracywatch import spans

    t0 = 1000.0
    series = [{"values": [[t0 + t, "1"] for t in (0, 1, 2, 3, 40, 41)]}, {"values": [[t0 + 3, "1"], [t0 + 99, "1"]]}]
    assert spans(series, t0, t0 + 60) == [[0.0, 3.0], [40.0, 41.0]]  # the sample at 99 s is past the phase
    row = {**ROW, "phase": "clean", "firing_at_start": True, "firing_spans_s": spans(series, t0, t0 + 60)}
    assert rep._firing_cell(row) == "still firing from the shift; cleared after 3 s; fired again at 40 s"
    cleared = rep._firing_cell({**row, "firing_spans_s": [[0.0, 55.0]]})
    assert cleared == "still firing from the shift; cleared after 55 s"
    assert rep._firing_cell({**ROW, "firing_after_requests": 1234, "firing_after_s": 61.6}) == "1,234 (62 s)"
    assert rep._firing_cell(ROW) == "–"
