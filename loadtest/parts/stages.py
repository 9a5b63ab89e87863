"""Where msdnet-serve's CPU goes per request, by stage, from a sampling profile.

Starts ``msdnet serve`` (each ``--workers`` value asked for), sends real test
images at a fixed rate with the open-loop client, and meanwhile records every
server process with py-spy (``--subprocesses``, idle threads not sampled). Each
sample's stack is put in one stage by its innermost frame that names one (rules
in :data:`STAGES`); the stage's share of samples times the server processes'
CPU seconds per answered request (``/proc``, the whole process tree) is its CPU
per request. "Outside the network" is everything but the ``network`` stage.

    python3 -m loadtest.stages --out DIR --rate 250 --workers 1 2

Writes ``stages.json``, ``STAGES.md`` and ``stages.png`` (stacked bars). Needs
py-spy (the bench extra) and ptrace rights over the server (same user).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

from .. import openloop as ol
from ..common import log
from ..samples import samples_for
from ..servers import TreeServer
from .capacity import make_requests

# (stage, pattern on "function (file:line)" frames); the innermost matching frame decides.
STAGES: tuple[tuple[str, re.Pattern], ...] = tuple((name, re.compile(pat)) for name, pat in (
    ("network", r"onnxruntime/|torch/|server/engine/backends[/.]|model/network\.py"),
    ("decode", r"PIL/|server/images\.py|model/transforms\.py|base64"),
    ("json", r"\(json/|orjson|pydantic|fastapi/encoders|server/http/responses\.py|server/http/schemas\.py"),
    ("ipc", r"asyncio/streams|msgpack|server/ipc/"),
    ("schedule", r"server/engine/|server/budget/|server/service\.py"),
    ("metrics", r"prometheus_client/"),
    ("http", r"uvicorn/|starlette/|fastapi/|httptools|h11/|multipart|server/http/"),
    ("event loop", r"asyncio/|uvloop|concurrent/futures|threading\.py|anyio/"),
))
STAGE_NAMES = [s for s, _ in STAGES] + ["other"]


def stage_of(frames: list[str]) -> str:
    """The stage of one stack (frames root first)."""
    for frame in reversed(frames):
        for name, pat in STAGES:
            if pat.search(frame):
                return name
    return "other"


def split_raw(path: Path) -> dict[str, int]:
    """Samples per stage in a py-spy ``--format raw`` file (``frame;frame;... count`` lines)."""
    counts = dict.fromkeys(STAGE_NAMES, 0)
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        counts[stage_of(frames)] += int(n)
    return counts


def profile_once(checkpoint: str | None, workers: int, rate: float, seconds: float, samples, encoding: str,
                 spy_rate: int, raw: Path) -> dict:
    """One server, one rate: the stage split and CPU per answered request (ms); the
    py-spy profile is kept in ``raw``."""
    cmd = [shutil.which("python3") or "python3", "-m", "server.cli", "serve"]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    env = {"MSDNET_ACCESS_LOG": "false", "MSDNET_LOG_LEVEL": "warning", "MSDNET_WORKERS": str(workers)}
    with TreeServer(cmd, env, name=f"stages-w{workers}") as srv:
        make = make_requests(samples, encoding)
        ol.run(srv.url, make, rate, 3.0, warmup_s=0.0, timeout_s=5.0, seed=1)  # warm every process
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(srv.proc.pid), "--subprocesses", "--nonblocking",
                                "--rate", str(spy_rate), "--format", "raw", "--output", str(raw),
                                "--duration", str(int(seconds) + 2)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
        time.sleep(1.0)  # py-spy attaches to every process first
        c0 = srv.cpu_s()
        r = ol.run(srv.url, make, rate, seconds, warmup_s=0.0, timeout_s=5.0, seed=2)
        c1 = srv.cpu_s()
        _, err = spy.communicate(timeout=60)
        if spy.returncode != 0 or not raw.exists():
            raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
        counts = split_raw(raw)
    s = ol.summarise(r.scored(), seconds)
    answered = max(1, s["ok"])
    total = max(1, sum(counts.values()))
    cpu_ms = 1e3 * (c1 - c0) / answered
    per_stage = {k: cpu_ms * v / total for k, v in counts.items()}
    return {"workers": workers, "rate": rate, "encoding": encoding, "answered": s["ok"], "requests": s["requests"],
            "p99_ms": s["p99_ms"], "server_cores": (c1 - c0) / seconds, "cpu_ms_per_request": cpu_ms,
            "samples": counts, "cpu_ms_per_stage": per_stage,
            "cpu_ms_outside_network": cpu_ms - per_stage["network"]}


def report(rows: list[dict]) -> str:
    head = ("| workers | encoding | rate (req/s) | answered | server cores | CPU ms/request | "
            + " | ".join(STAGE_NAMES) + " | outside the network |")
    lines = [head, "|" + " --- |" * (6 + len(STAGE_NAMES) + 1)]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['encoding']} | {r['rate']:g} | {r['answered']} | "
                     f"{r['server_cores']:.2f} | {r['cpu_ms_per_request']:.2f} | "
                     + " | ".join(f"{r['cpu_ms_per_stage'][k]:.2f}" for k in STAGE_NAMES)
                     + f" | {r['cpu_ms_outside_network']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = [f"{r['workers']} worker(s)\n{r['encoding']}, {r['rate']:g}/s" for r in rows]
    bottom = [0.0] * len(rows)
    for stage in STAGE_NAMES:
        vals = [r["cpu_ms_per_stage"][stage] for r in rows]
        ax.bar(names, vals, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("server CPU per answered request (ms)")
    ax.set_title("msdnet-serve: CPU per request by stage (py-spy samples x process-tree CPU)", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m loadtest.stages", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (28x28 model) or a folder DIR/<class>/<image> "
                   "(default: generated images at the checkpoint's contract)")
    p.add_argument("--rate", type=float, default=200.0, help="requests/s (below capacity: py-spy costs CPU too)")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--workers", type=int, nargs="+", default=[1])
    p.add_argument("--encodings", nargs="+", default=["png", "json"])
    p.add_argument("--spy-rate", type=int, default=250, help="py-spy samples per second per thread")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from model.checkpoint import DEFAULT_CHECKPOINT

    samples, source = samples_for(args.checkpoint or DEFAULT_CHECKPOINT, args.data_dir, limit=2000)
    log(f"images: {len(samples)} {source}")
    rows = []
    for w in args.workers:
        for enc in args.encodings:
            row = profile_once(args.checkpoint, w, args.rate, args.seconds, samples, enc, args.spy_rate,
                               out / f"pyspy-w{w}-{enc}.txt")
            log(f"workers {w} {enc}: {row['cpu_ms_per_request']:.2f} ms CPU/request, outside the network "
                f"{row['cpu_ms_outside_network']:.2f}; {row['samples']}")
            rows.append(row)
    (out / "stages.json").write_text(json.dumps(rows, indent=1))
    (out / "STAGES.md").write_text(report(rows))
    plot(rows, out / "stages.png")
    print(report(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
