"""The machine and software a benchmark ran on, for the report's header."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path


def machine_info() -> dict:
    """CPU model and topology (``lscpu``), logical and usable CPUs (affinity and
    cgroup quota, as ``msdnet serve`` counts them), Python, torch and
    onnxruntime versions, the git revision of this checkout and the load average."""
    from server.settings import usable_cpus

    info = {"cpu": platform.processor() or "unknown", "logical_cpus": os.cpu_count(), "cpus": usable_cpus(),
            "python": platform.python_version(), "platform": platform.platform()}
    with contextlib.suppress(Exception):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu"] = fields.get("Model name", info["cpu"])
        for key in ("Thread(s) per core", "Core(s) per socket", "Socket(s)"):
            if key in fields:
                info[key] = fields[key]
    import torch

    info["torch"] = torch.__version__
    with contextlib.suppress(ImportError):
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    with contextlib.suppress(Exception):
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10, cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).parent).stdout.strip()
        info["git"] = rev + (" (uncommitted changes)" if dirty else "")
    info["loadavg_at_start"] = os.getloadavg()
    return info
