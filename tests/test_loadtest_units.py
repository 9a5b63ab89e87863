"""Pure pieces of the benchmark (no server, no model): the report's table helper,
part b's window errors and part e's fixed-threshold comparison (hand-computed),
the capacity search on fake trials, the goal figures of the report, and the
import direction loadtest -> not tests."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from loadtest.common import FULL, SMOKE, Plan, table
from loadtest.goals import figures, goals_section
from loadtest.parts.accuracy import accuracy_at, fixed_curve
from loadtest.parts.controller import window_errors
from loadtest.search import search_capacity

ROOT = Path(__file__).resolve().parent.parent


def test_table_rows_and_empty_cells():
    assert table(["a", ""], [["1", "x y"], ["", "2"]]) == ["| a | |", "| --- | --- |", "| 1 | x y |", "| | 2 |"]
    with pytest.raises(ValueError, match="row of 1 cells under a header of 2"):
        table(["a", "b"], [["1"]])


def test_window_errors_by_hand():
    # Means of 2-request windows: FLOPs 1, 2, 2.5 against targets 1, 1.5, 2 -> errors 0, 1/3, 1/4.
    # The middle window spans the target change: only windows 0 and 2 are under one target.
    w = window_errors(np.array([1.0, 1.0, 3.0, 2.0]), np.array([1.0, 1.0, 2.0, 2.0]), 2)
    assert w["window_errors"] == pytest.approx([0.0, 1 / 3, 0.25])
    assert w["max_abs_error_constant"] == pytest.approx(0.25) and w["worst_window_start"] == 2
    assert w["max_abs_error_all"] == pytest.approx(1 / 3) and w["windows"] == 3
    assert w["max_abs_error_disjoint"] == pytest.approx(0.25)  # windows 0 and 2
    assert window_errors(np.array([1.0]), np.array([1.0]), 2) == {"max_abs_error_constant": None,
                                                                   "max_abs_error_all": None, "windows": 0}


def test_fixed_thresholds_by_hand():
    # Two exits costing 10 and 30 FLOPs; four images. Confidence at exit 1: 0.9, 0.6, 0.4, 0.2.
    # Exit 1 right for images 0, 2; exit 2 right for 0, 1, 2.
    conf = np.array([[0.9, 0.6, 0.4, 0.2], [1.0, 1.0, 1.0, 1.0]])
    pred = np.array([[5, 0, 2, 0], [5, 1, 2, 0]])
    labels = np.array([5, 1, 2, 3])
    curve = fixed_curve(conf, pred, labels, [(0.5, 0.0), (0.95, 0.0), (0.0, 0.0)], [10, 30])
    # threshold 0.0: all leave at exit 1 (10 FLOPs, 2 right); 0.5: images 0, 1 leave -> 10, 10, 30, 30
    # (image 1 wrong at exit 1; 2 right at exit 2) = 20 FLOPs, 2/4; 0.95: all at exit 2 = 30 FLOPs, 3/4.
    assert curve == [(10.0, 0.5), (20.0, 0.5), (30.0, 0.75)]
    assert accuracy_at(curve, 25.0) == pytest.approx(0.625)  # halfway between 20 and 30
    assert accuracy_at(curve, 5.0) == 0.5 and accuracy_at(curve, 99.0) == 0.75  # clamped at the ends
    with pytest.raises(ValueError, match="no operating points"):
        accuracy_at([], 1.0)


def _search(cap: float, flops: float, server_cores: float) -> dict:
    return {"capacity_rps": cap, "trials": [], "at_capacity": {"rate": cap, "mean_flops": flops,
                                                               "server_cores": server_cores, "client_cores": 0.2}}


def below(limit: float):
    """A fake trial: a rate (requests/s) passes when it is under ``limit``."""
    return lambda rate: rate < limit


def test_search_doubles_then_bisects_to_the_ratio_step():
    found = search_capacity(below(437), Plan(start=100, stop_ratio=1.05, max_trials=20, max_search_s=60))
    # 100, 200, 400 pass, 800 fails; then sqrt(lo * hi) until hi / lo < 1.05.
    assert found.tried == [(100, True), (200, True), (400, True), (800, False), (565.7, False), (475.7, False),
                           (436.2, True), (455.5, False)]
    assert found.lo == pytest.approx(436.2031, abs=1e-4) and found.hi == pytest.approx(455.5155, abs=1e-4)
    assert found.hi / found.lo < 1.05


def test_search_halves_while_the_first_rate_fails():
    found = search_capacity(below(437), Plan(start=1000, stop_ratio=1.05, max_trials=3))
    assert found.tried == [(1000, False), (500.0, False), (250.0, True)] and (found.lo, found.hi) == (250.0, 500.0)
    found = search_capacity(below(437), Plan(start=1000, stop_ratio=1.05))  # 8 trials: bisects after the halving
    assert [r for r, _ in found.tried] == [1000, 500.0, 250.0, 353.6, 420.4, 458.5, 439.1]
    assert found.lo == pytest.approx(420.4482, abs=1e-4) and found.hi == pytest.approx(439.0630, abs=1e-4)


def test_search_bounds_nothing_passes_and_everything_passes():
    # Halving stops before a rate under min_rate (5 req/s): 9.375 / 2 < 5.
    found = search_capacity(below(0), Plan(start=150))
    assert [r for r, _ in found.tried] == [150, 75.0, 37.5, 18.8, 9.4] and found.lo is None and found.hi == 9.375
    # Doubling stops above max_rate (3200 req/s): nothing failed, so no upper bound.
    found = search_capacity(below(1e9), FULL)
    assert [r for r, _ in found.tried] == [150.0, 300.0, 600.0, 1200.0, 2400.0]
    assert (found.lo, found.hi) == (2400.0, None)
    # The smoke plan runs one trial.
    assert search_capacity(below(1e9), SMOKE).tried == [(15.0, True)]


def test_search_starts_no_trial_after_max_search_s():
    now = [0.0]

    def trial_of_30_s(rate: float) -> bool:
        now[0] += 30.0  # a fake clock: each trial takes 30 s of it
        return rate < 437

    found = search_capacity(trial_of_30_s, Plan(start=100, max_trials=20, max_search_s=80), clock=lambda: now[0])
    assert found.tried == [(100, True), (200, True), (400, True)] and (found.lo, found.hi) == (400, None)


def test_goal_figures_use_the_defaults_and_each_peers_best():
    a = {"servers": {
        "litserve-a1-w1-t1": {"family": "litserve", "encodings": {"png": _search(200, 21e6, 1.0)}},
        "litserve-a1-w2-t1": {"family": "litserve", "encodings": {"png": _search(250, 21e6, 1.5)}},
        "ray-r1-t1": {"family": "ray", "encodings": {"png": _search(50, 21e6, 1.0)}},
        "msdnet-default": {"family": "msdnet", "encodings": {"png": _search(700, 6e6, 1.6)}},
        "msdnet-default-w3": {"family": "msdnet", "encodings": {"png": _search(800, 6e6, 1.7)}},
        "msdnet-last-default": {"family": "msdnet-last", "encodings": {"png": _search(350, 21e6, 1.5)}}}}
    f = figures({"a": a})["png"]
    # The defaults are judged, not the best msdnet configuration; each peer at its best.
    assert f["msdnet"][1] == 700 and f["ratios"] == {"litserve": pytest.approx(2.8), "ray": pytest.approx(14.0)}
    assert f["last_vs_best_peer"] == pytest.approx(1.4) and f["gain"] == pytest.approx(2.0)
    assert f["flops_ratio"] == pytest.approx(3.5) and f["server_cores"] == 1.6
    rows = goals_section({"a": a, "slo_ms": 100.0})
    assert any("2.80× LitServe's best (250)" in r and "**met**" in r for r in rows)
    assert any("server 1.60 + client 0.20 cores" in r and "**not met**" in r for r in rows)


def test_loadtest_imports_nothing_from_tests():
    offenders = []
    for path in sorted((ROOT / "loadtest").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "tests" or n.startswith("tests.")]
    assert offenders == []


def test_stage_split_puts_each_stack_in_the_stage_of_its_innermost_named_frame(tmp_path):
    from loadtest.parts.stages import STAGE_NAMES, split_raw, stage_of

    onnx = ["run (asyncio/runners.py:118)", "_run (server/engine/runner.py:205)",
            "advance (server/engine/backends.py:301)", "run (onnxruntime/capi/onnxruntime_inference_collection.py:406)"]
    decode = ["run (threading.py:982)", "decode (server/images.py:90)", "load (PIL/ImageFile.py:300)"]
    sched = ["_loop (server/engine/runner.py:170)", "complete (server/engine/scheduler.py:300)"]
    uvloop = ["run (asyncio/runners.py:118)"]
    assert [stage_of(s) for s in (onnx, decode, sched, uvloop, ["main (x.py:1)"])] == [
        "network", "decode", "schedule", "event loop", "other"]
    raw = tmp_path / "raw.txt"
    raw.write_text('process 1:"python3 -m server.cli";' + ";".join(onnx) + " 7\n"
                   'process 1:"python3";process 2:"spawn";' + ";".join(decode) + " 3\n"
                   + ";".join(sched) + " 2\nnot a sample line\n")
    counts = split_raw(raw)
    assert set(counts) == set(STAGE_NAMES)
    assert (counts["network"], counts["decode"], counts["schedule"], sum(counts.values())) == (7, 3, 2, 12)
