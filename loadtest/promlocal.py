"""A real Prometheus (Debian's ``prometheus`` package) scraping loopback targets
with the project's alert rules, for benchmarks and tests.

    with LocalPrometheus([server.url], folder) as prom:
        prom.query('ALERTS{alertstate="firing"}')

Scrape and rule-evaluation interval ``interval_s`` (1 s by default, so that rate
windows of seconds hold samples); the rules are ``deploy/prometheus/alerts.yml``
unless given. Loopback only.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .harness import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
ALERT_RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"


def prometheus_binary() -> str | None:
    """Path of the ``prometheus`` server, None when it is not installed."""
    found = shutil.which("prometheus") or "/usr/bin/prometheus"
    return found if Path(found).is_file() else None


class LocalPrometheus(ServerProcess):
    """Prometheus on a free loopback port, scraping ``targets`` (base URLs) as job
    ``msdnet``, its configuration and data in ``folder``.

    Raises:
        FileNotFoundError: Prometheus is not installed (``apt-get install -y prometheus``).
        RuntimeError: from :meth:`start` when it is not ready within 30 s.
    """

    def __init__(self, targets: list[str], folder: str | Path, interval_s: float = 1.0,
                 rules: str | Path = ALERT_RULES):
        import yaml

        binary = prometheus_binary()
        if binary is None:
            raise FileNotFoundError("prometheus not found: apt-get install -y prometheus")
        folder = Path(folder).resolve()  # the process runs in it: its paths must not be relative
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(rules, folder / "alerts.yml")
        hosts = [t.split("://", 1)[-1].rstrip("/") for t in targets]
        (folder / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": f"{interval_s:g}s", "evaluation_interval": f"{interval_s:g}s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": "msdnet", "static_configs": [{"targets": hosts}]}]}))
        cmd = [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'tsdb'}"]
        super().__init__(cmd,
                         ready_path="/-/ready", ready_timeout_s=30, stop_timeout_s=10, name="prometheus",
                         listen_args=lambda p: [f"--web.listen-address=127.0.0.1:{p}"], cwd=folder)

    def _get(self, path: str, params: dict) -> dict:
        import httpx

        r = httpx.get(self.url + path, params=params, timeout=30, trust_env=False)
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            raise RuntimeError(f"Prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """The instant vector of ``expr`` (now, or at Unix time ``at``)."""
        return self._get("/api/v1/query", {"query": expr, **({"time": at} if at is not None else {})})["result"]

    def query_range(self, expr: str, start: float, end: float, step_s: float = 1.0) -> list[dict]:
        """The range result of ``expr`` over [start, end] (Unix seconds) every ``step_s``."""
        return self._get("/api/v1/query_range", {"query": expr, "start": start, "end": end,
                                                  "step": f"{step_s:g}s"})["result"]

    def rules(self) -> list[dict]:
        """Every loaded rule with its health, state and last error."""
        return [r for g in self._get("/api/v1/rules", {})["groups"] for r in g["rules"]]
