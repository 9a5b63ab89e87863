"""Shared by the deployment tests: paths, the server's metric names, and the
Grafana dashboard's PromQL queries (with Grafana's variables filled in)."""

from __future__ import annotations

import functools
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "msdnet.json"

# Names as Prometheus stores them (histograms expanded, the Info as *_info), per
# server/metrics.py; `up` is Prometheus's own. test_deploy checks this against the code.
SERVER_METRICS = frozenset({
    "msdnet_exits_total",
    "msdnet_requests_total",
    "msdnet_request_duration_seconds_bucket", "msdnet_request_duration_seconds_sum",
    "msdnet_request_duration_seconds_count",
    "msdnet_flops_total",
    "msdnet_request_flops_bucket", "msdnet_request_flops_sum", "msdnet_request_flops_count",
    "msdnet_target_flops_per_request",
    "msdnet_realised_flops_per_request",
    "msdnet_fleet_flops_per_request",
    "msdnet_fleet_mode",
    "msdnet_exit_threshold",
    "msdnet_queue_depth",
    "msdnet_batch_size_bucket", "msdnet_batch_size_sum", "msdnet_batch_size_count",
    "msdnet_deadline_requests_total", "msdnet_deadline_misses_total",
    "msdnet_rejected_requests_total",
    "msdnet_model_info",
})
KNOWN_METRICS = SERVER_METRICS | {"up"}


@functools.cache
def settings() -> frozenset[str]:
    """Environment variables the server reads: MSDNET_ + each field of server.settings.Settings."""
    from server.settings import Settings

    return frozenset(f"MSDNET_{name.upper()}" for name in Settings.model_fields)


def tool(name: str, hint: str) -> str:
    """Path of a command-line tool, looked up on PATH and next to this Python
    (a venv's bin/ need not be on PATH); fails the test with ``hint`` if absent."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail(f"{name} not found; {hint}")
    return found


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> list[dict]:
    """Every panel that draws data (rows are layout only), nested rows included."""
    out = []
    for p in dash["panels"]:
        if p["type"] == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


# Grafana's built-in variables, as a test evaluates them: scrapes every 1 s there,
# so 15 s holds enough samples for rate().
GRAFANA_VARIABLES = {"$__rate_interval": "15s", "$__interval": "5s", "$__range": "5m"}


def to_promql(expr: str, variables: dict[str, str] = GRAFANA_VARIABLES) -> str:
    """``expr`` with Grafana's variables replaced; fails on any it does not know."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(name, variables[name])
    leftover = re.findall(r"\$\{?\w+", expr)
    assert not leftover, f"unknown Grafana variables {leftover} in {expr!r}"
    return expr


def queries(dash: dict) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query of every data panel."""
    return [(p["title"], t.get("refId", "?"), t.get("expr", "")) for p in panels(dash) for t in p.get("targets", [])]


_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not function
    calls, keywords, label names (in {...} or by/on lists) or durations."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"' r"|'(?:[^'\\]|\\.)*'", '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = _LABEL_LISTS.sub(" ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:$])([A-Za-z_:][\w:]*)\s*(\()?", s):
        if m.group(2) or m.group(1).lower() in _KEYWORDS:
            continue
        names.add(m.group(1))
    return names
