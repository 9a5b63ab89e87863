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
    "msdnet_latency_objective_seconds", "msdnet_target_in_force_flops_per_request", "msdnet_objective_state",
    "msdnet_degraded_seconds_total", "msdnet_degraded_answers_total", "msdnet_forecast_wait_seconds",
    "msdnet_engine_busy_ratio", "msdnet_client_gone_requests_total", "msdnet_cancelled_images_total",
    # the accuracy watch (issue 24)
    "msdnet_exit_confidence_bucket", "msdnet_exit_confidence_sum", "msdnet_exit_confidence_count",
    "msdnet_calibrated_mean_confidence", "msdnet_calibrated_threshold", "msdnet_curve_residual_flops_per_request",
    "msdnet_agreement_total", "msdnet_agreement_expected_total", "msdnet_calibrated_agreement_ratio",
    "msdnet_audit_flops_total", "msdnet_audit_skipped_total", "msdnet_feedback_total",
    "msdnet_feedback_last_exit_total", "msdnet_calibrated_accuracy_ratio",
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


# --- KServe: the InferenceService schema from the KServe Python SDK's models -----------

KSERVE_SDK = "kserve==0.21.0"
KSERVE_WHEELS = ROOT / "build" / "kserve"


def kserve_models() -> dict[str, dict[str, str]]:
    """{model class: {JSON field: OpenAPI type}} of the KServe SDK's models
    (``kserve/models/*.py``: each class's ``openapi_types`` and ``attribute_map``),
    read from the SDK's wheel without installing it (its dependencies would pin
    protobuf, psutil... below this project's). The wheel is fetched once with
    ``pip download --no-deps`` into build/kserve; fails the test if it cannot be."""
    import ast
    import subprocess
    import zipfile

    wheels = sorted(KSERVE_WHEELS.glob("kserve-*.whl"))
    if not wheels:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest",
                            str(KSERVE_WHEELS), KSERVE_SDK], capture_output=True, text=True, timeout=300)
        wheels = sorted(KSERVE_WHEELS.glob("kserve-*.whl"))
        if not wheels:
            pytest.fail(f"pip download {KSERVE_SDK} failed: {r.stderr[-2000:]}")
    models = {}
    with zipfile.ZipFile(wheels[-1]) as z:
        for name in z.namelist():
            if not re.fullmatch(r"kserve/models/v1\w+\.py", name):
                continue
            for node in ast.parse(z.read(name)).body:
                if not isinstance(node, ast.ClassDef):
                    continue
                found = {}
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
                        if stmt.targets[0].id in ("openapi_types", "attribute_map"):
                            found[stmt.targets[0].id] = ast.literal_eval(stmt.value)
                if len(found) == 2:
                    models[node.name] = {found["attribute_map"][k]: t for k, t in found["openapi_types"].items()}
    return models


def kubernetes_definitions(version: str) -> dict:
    """Kubernetes' OpenAPI definitions (strict: no unknown fields), from kubernetes-validate."""
    import kubernetes_validate

    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    return json.loads((root / f"v{version}.0-local-strict" / "_definitions.json").read_text())


def kserve_errors(doc, type_name: str, models: dict, k8s: dict, path: str = "") -> list[str]:
    """Where ``doc`` breaks the SDK's schema for ``type_name``: unknown fields, wrong
    types; Kubernetes' own types (V1Container, V1ObjectMeta, ...) are checked
    against Kubernetes' strict JSON schema."""
    import jsonschema

    if m := re.fullmatch(r"list\[(.+)\]", type_name):
        if not isinstance(doc, list):
            return [f"{path}: expected a list"]
        return [e for i, d in enumerate(doc) for e in kserve_errors(d, m.group(1), models, k8s, f"{path}[{i}]")]
    if m := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        if not isinstance(doc, dict):
            return [f"{path}: expected a map"]
        return [e for k, d in doc.items() for e in kserve_errors(d, m.group(1), models, k8s, f"{path}.{k}")]
    scalars = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object,
               "ResourceQuantity": (str, int, float)}
    if type_name in scalars:
        ok = isinstance(doc, scalars[type_name]) and not (type_name == "int" and isinstance(doc, bool))
        return [] if ok else [f"{path}: expected {type_name}, got {doc!r}"]
    if type_name in models:
        if not isinstance(doc, dict):
            return [f"{path}: expected a {type_name} object"]
        fields = models[type_name]
        errors = [f"{path}.{k}: unknown field of {type_name}" for k in doc if k not in fields]
        return errors + [e for k, d in doc.items() if k in fields
                         for e in kserve_errors(d, fields[k], models, k8s, f"{path}.{k}")]
    # A Kubernetes type: V1Container -> io.k8s.api.core.v1.Container (or meta/v1's, apps/v1's).
    kind = re.fullmatch(r"(?:K8sIoApiAppsV1|V1)(\w+)", type_name).group(1)
    prefixes = ("io.k8s.api.core.v1.", "io.k8s.apimachinery.pkg.apis.meta.v1.", "io.k8s.api.apps.v1.")
    ref = next(p + kind for p in prefixes if p + kind in k8s["$defs"])
    validator = jsonschema.Draft202012Validator({**k8s, "$ref": f"#/$defs/{ref}"})
    return [f"{path}.{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
