"""The benchmark's PNG plots (matplotlib, Agg backend), one function per part,
each drawn from that part's measurements as ``python -m loadtest.bench`` stores them.
FLOPs = multiply-accumulates of convs and linears (MSDNet paper), cumulative per exit."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import ENCODING_LABELS, ENCODINGS, PNGS, TARGET_DEADLINE_SHARE


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: float | None = None) -> None:
    plt = _plt()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend: dict, grid: dict) -> None:
    """Labels, a 9-pt title, the legend and grid (their keyword arguments), then save and close."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, **legend)
    ax.grid(alpha=0.3, **grid)
    _save(fig, path)


def plot_controller(b: dict, path: Path) -> None:
    """Per-request FLOPs (MACs), their rolling mean and the target, in completion order."""
    plt = _plt()
    s = b["series"]
    f, tgt, ph = np.array(s["flops"]) / 1e6, np.array(s["target"]) / 1e6, np.array(s["phase"])
    w = b["window"]
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    x = np.arange(len(f))
    ax.scatter(x, f, s=1, alpha=0.15, color="tab:gray", label="per request (the exit's cumulative cost)")
    if len(f) >= w:
        roll = np.convolve(f, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w - 1, len(f)), roll, color="tab:blue", lw=1.5, label=f"mean of the last {w} requests")
    ax.step(x, tgt, where="post", color="tab:red", lw=1.2, label="target")
    top = f.max() if len(f) else 1.0
    for k, row in enumerate(b["phases"]):
        idx = np.nonzero(ph == k)[0]
        if len(idx):
            ax.axvline(idx[0], color="k", lw=0.5, ls=":")
            ax.text(idx[0] + 5, top * 0.98, f"{row['mix']}\n@{row['target'] / 1e6:.2f}M", fontsize=7, va="top")
    _finish(fig, ax, path, "request (completion order)", "MFLOPs per request (multiply-accumulates)",
            "Budget controller: realised vs target FLOPs; traffic mix switch and PUT /budget", {"loc": "lower right"},
            {})


def plot_deadlines(rows: list[dict], num_exits: int, path: Path) -> None:
    """Share of deadlines met and the exits taken (504s apart) per load level."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 3.8), dpi=110)
    loads = [f"{r['load']:.0%}" for r in rows]
    ax1.bar(loads, [100 * (r["met"] or 0) for r in rows], color="tab:green")
    ax1.axhline(100 * TARGET_DEADLINE_SHARE, color="k", ls="--", lw=1, label="target 99.9%")
    lo = min([100 * (r["met"] or 0) for r in rows] + [99.0])
    ax1.set_ylim(max(0, lo - 2), 100.2)
    ax1.set_ylabel("deadlines met (%)")
    ax1.set_xlabel("load (share of capacity)")
    ax1.legend(fontsize=7)
    bottom = np.zeros(len(rows))
    for k in range(0, num_exits + 1):
        share = []
        for r in rows:
            n = r["requests"] or 1
            share.append(100 * (r["statuses"].get("504", 0) if k == 0 else r["exits"].get(str(k), 0)) / n)
        ax2.bar(loads, share, bottom=bottom, label="504 (nothing computed)" if k == 0 else f"exit {k}")
        bottom += np.array(share)
    ax2.set_ylabel("requests (%)")
    ax2.set_xlabel("load (share of capacity)")
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Deadlines: met share and exits taken", fontsize=9)
    _save(fig, path)


def plot_capacity(a: dict, path: Path) -> None:
    """Capacity (requests/s at the p99 SLO) per server configuration and encoding,
    as bars; ``a``: a capacity run (capacity.json, or the bench's part a). Nothing
    is drawn when no configuration was measured."""
    servers = [(k, s) for k, s in a["servers"].items() if s.get("encodings")]
    if not servers:
        return
    plt = _plt()
    x = np.arange(len(servers))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(servers) + 2), 4.5))
    for j, enc in enumerate(ENCODINGS):
        caps = [s["encodings"].get(enc, {}).get("capacity_rps", 0) for _, s in servers]
        bars = ax.bar(x + (j - 0.5) * 0.38, caps, 0.38, label=ENCODING_LABELS[enc])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(x, [f"{s['label'].split(',')[0]}\n{s['key_short']}" for _, s in servers], fontsize=7)
    ax.set_ylabel(f"capacity (req/s at p99 ≤ {a['slo_ms']:g} ms)")
    ax.set_title("Capacity per server and configuration (same client, same images, same CPUs)", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path, dpi=120)


def plot_latency(a: dict, path: Path) -> None:
    """p99 latency (ms) against offered load (requests/s): every trial of every
    configuration of a capacity run ``a``, one panel per encoding (log scale; the
    SLO as a line)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(ENCODINGS), figsize=(11, 4.2), sharey=True)
    for ax, enc in zip(np.atleast_1d(axes), ENCODINGS):
        for key, srv in a["servers"].items():
            trials = sorted(srv.get("encodings", {}).get(enc, {}).get("trials", []), key=lambda t: t["rate"])
            if trials:
                ax.plot([t["rate"] for t in trials], [max(t["p99_ms"], 1.0) for t in trials], "o-", ms=3,
                        label=key)
        ax.axhline(a["slo_ms"], color="grey", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("offered load (requests/s, Poisson)")
        ax.set_title(ENCODING_LABELS[enc], fontsize=9)
    np.atleast_1d(axes)[0].set_ylabel("p99 latency (ms)")
    np.atleast_1d(axes)[-1].legend(fontsize=6)
    fig.suptitle("Latency against load, every trial of the capacity search (same client, same CPUs)", fontsize=9)
    _save(fig, path, dpi=120)


def write_plots(res: dict, out: Path) -> None:
    """Every plot whose part is in ``res``, into the folder ``out`` (names: ``PNGS``)."""
    from .parts import stages

    if res.get("a"):
        plot_capacity(res["a"], out / PNGS["capacity"])
        plot_latency(res["a"], out / PNGS["latency"])
    if res.get("s"):
        stages.plot(res["s"]["rows"], out / PNGS["stages"])
    if res.get("b"):
        plot_controller(res["b"], out / PNGS["controller"])
    if res.get("c"):
        plot_deadlines(res["c"]["rows"], len(res["offline"]["exit_flops"]), out / PNGS["deadlines"])
