"""The overload benchmark part's figures (loadtest/parts/overload.py) on made-up records: no server."""

from __future__ import annotations

import pytest

from loadtest.openloop import Record
from loadtest.parts.overload import back_to_target, per_second, score, settle


def rec(i, t, latency_s, status=200, exit_=1, flops=100, label=None, correct=None):
    return Record(i, t, t, t + latency_s, latency_s, status, exit=exit_ if status == 200 else None,
                  flops=flops if status == 200 else None, label=label, correct=correct)


def test_score_counts_what_the_objective_counts():
    records = [rec(0, 0.1, 0.05, label=1, correct=True), rec(1, 0.2, 0.15, label=1, correct=True),
               rec(2, 0.3, 0.004, status=503, label=1), rec(3, 0.4, 0.02, label=1, correct=False)]
    s = score(records, objective_ms=100)
    assert s["sent"] == 4 and s["within_share"] == 0.5 and s["refused_share"] == 0.25
    assert s["refusal_p99_ms"] == pytest.approx(4.0) and s["other_failures"] == 0
    assert s["effective_accuracy"] == 0.25  # one correct answer within the objective, of 4 sent
    assert s["mean_exit"] == 1 and s["mean_flops"] == 100


def test_per_second_rows_and_the_target_in_force():
    records = [rec(0, 0.5, 0.01), rec(1, 1.2, 0.2, exit_=2, flops=300), rec(2, 1.5, 0.001, status=503)]
    polls = [(0.1, 1000.0, "steady", 0.0), (1.1, 600.0, "degraded", 50.0), (1.6, 400.0, "refusing", 70.0)]
    rows = per_second(records, polls, objective_ms=100, seconds=2)
    assert [r["requests"] for r in rows] == [1, 2] and [r["refused"] for r in rows] == [0, 1]
    assert rows[0]["within"] == 1.0 and rows[1]["within"] == 0.0
    assert rows[0]["in_force_flops"] == 1000.0 and rows[1]["in_force_flops"] == 500.0
    assert rows[1]["mean_exit"] == 2 and rows[1]["mean_flops"] == 300


def test_settling_and_return_to_the_configured_target():
    polls = [(t / 4, f, "", 0) for t, f in enumerate([1000, 600, 550, 560, 555, 900, 1000, 1000])]
    s = settle(polls, 0.5, 1.25)
    assert s["min"] == 550 and s["max"] == 560 and s["swing"] == pytest.approx(560 / 550 - 1)
    assert back_to_target(polls, 1.0, 1000.0) == pytest.approx(0.5)
    assert back_to_target(polls[:6], 1.0, 1000.0) is None


def fake_result(back=(1.0, 2.0), swing_max=560.0, refused_up_to_c1=0.0):
    score_ = {"sent": 100, "within_share": 0.995, "refused_share": refused_up_to_c1, "other_failures": 0,
              "refusal_p99_ms": None, "answered_p99_ms": 80.0, "effective_accuracy": None, "mean_exit": 1.2,
              "mean_flops": 5.5e6}
    past = {**score_, "rate": 300.0, "within_share": 0.7, "refused_share": 0.3, "refusal_p99_ms": 4.0}
    return {"network": "fashion", "objective_ms": 100.0, "capacity_rps": 100.0, "capacity_exit1_rps": 250.0,
            "target_flops": 5.75e6, "exit_flops": [4.8e6, 8e6], "images": "test", "started": "now",
            "loadavg_at_end": [0.5, 0.5, 0.5],
            "sweep": [{**score_, "rate": 50.0}, {**score_, "rate": 200.0}, past],
            "step": {"phases": [[30, 50], [30, 150], [30, 300], [30, 50]], "phase_scores": [score_] * 4,
                     "steady_1p5x": {"min": 550.0, "max": swing_max, "swing": swing_max / 550.0 - 1}},
            "burst": {"score": score_, "back_after_s": list(back)},
            "effective": {"msdnet-serve (objective) @ 3.0x": {**score_, "effective_accuracy": 0.6},
                          "LitServe @ 3.0x": {**score_, "effective_accuracy": 0.2}}}


def test_the_report_judges_each_goal_from_the_figures():
    from loadtest.overloadreport import goals, section

    rows = {r[0][:40]: r[2] for r in goals(fake_result())}
    assert set(rows.values()) == {"met"}, rows
    bad = {r[0][:40]: r[2] for r in goals(fake_result(back=(1.0, None), swing_max=700.0, refused_up_to_c1=0.01))}
    assert list(bad.values()).count("**not met**") == 3, bad
    md = section(fake_result())
    assert "C = 100.0 req/s" in md and "C1 = 250.0 req/s" in md and "![overload fashion](overload-fashion.png)" in md


def test_loop_variants_side_by_side_from_their_runs(tmp_path):
    import json

    from loadtest import overloadreport as rep

    runs = []
    for label, swing_max, back in (("old", 800.0, (1.0, None)), ("new", 570.0, (3.5, 2.0))):
        res = fake_result(back=back, swing_max=swing_max)
        res["machine"] = {"git": label[:3], "loadavg_at_start": [1.25, 1, 1]}
        res["step"]["back_after_s"] = 1.0
        path = tmp_path / f"{label}.json"
        path.write_text(json.dumps(res))
        runs.append(f"{label}={path}")
    (tmp_path / "note.txt").write_text("Same machine, one after the other.\n")
    assert rep.main(["--loops", str(tmp_path / rep.LOOPS), str(tmp_path / "note.txt"), *runs]) == 0
    rows = json.loads((tmp_path / rep.LOOPS).read_text())["runs"]
    assert [r["label"] for r in rows] == ["old", "new"]
    assert rows[0]["back_max_s"] is None and rows[1]["back_max_s"] == 3.5
    assert rows[1]["swing_1p5"] == pytest.approx(570.0 / 550.0 - 1)
    md = rep.loops_part(tmp_path)
    assert "Same machine, one after the other." in md and "not within the phase" in md and "| new | new | 1.2 |" in md
    assert rep.LOOPS not in [p.name for p in tmp_path.glob("overload-*.json")]  # no section of its own
