"""Pure pieces of the benchmark (no server, no model): the report's table helper,
part b's window errors (hand-computed) and the import direction loadtest -> not tests."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from loadtest.parts.controller import window_errors
from loadtest.report import table

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


def test_loadtest_imports_nothing_from_tests():
    offenders = []
    for path in sorted((ROOT / "loadtest").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "tests" or n.startswith("tests.")]
    assert offenders == []


def test_stage_split_puts_each_stack_in_the_stage_of_its_innermost_named_frame(tmp_path):
    from loadtest.stages import STAGE_NAMES, split_raw, stage_of

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
