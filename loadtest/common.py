"""What the benchmarks' parts, reports and plots share: the plan (sizes of every
part, the capacity search's included), the request encodings, the targets (issue
12's bars), the plot file names, the log line and number formatting."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

PNGS = {"capacity": "bench_capacity.png", "latency": "bench_latency.png", "stages": "bench_stages.png",
        "controller": "bench_controller.png", "deadlines": "bench_deadlines.png"}
TARGET_PEER_RATIO = 2.5         # a: msdnet-serve's capacity / each peer's
TARGET_ACC_DROP_POINTS = 0.3    # a: accuracy points msdnet-serve may lose to the last exit
TARGET_SERVER_CORES = 1.8       # a: server cores busy at capacity (of 2)
TARGET_DEADLINE_SHARE = 0.999   # c: deadlines met at 80% of capacity
TARGET_FLOPS_ERROR = 0.02       # b: |mean FLOPs / target - 1| of every window
TARGET_STALL_HEALTHZ_MS = 50.0  # f: /healthz p99 under the floods
TARGET_STALL_CLASSIFY_MS = 100.0  # f: a normal /classify p99 under the floods
TARGET_BLOCKS_B64 = 1.0         # d: per-block ORT / whole-network ORT GMAC/s at batch 64, at least
TARGET_BLOCKS_B1 = 1 / 1.5      # d: the same at batch 1, at least


@dataclass(frozen=True)
class Plan:
    """Sizes of a benchmark run, for every part: the capacity search (part a,
    ``python3 -m loadtest.capacity``, ``loadtest.realbench``, ``loadtest.soak``:
    the fields up to ``images``, :data:`SEARCH_FIELDS`) and the bench's other
    parts (c, b, e, f, s, d). Rates in requests/s, times in seconds."""

    # The capacity search (loadtest.search, loadtest.parts.capacity).
    start: float = 150.0          # first rate tried
    max_rate: float = 3200.0      # doubling stops above this
    min_rate: float = 5.0         # halving stops below this; also the lowest rate of parts c and b
    trial_s: float = 5.0          # scored seconds per trial
    warmup_s: float = 1.0         # unscored seconds before each trial
    pause_s: float = 1.0          # between trials and between configurations
    timeout_s: float = 5.0        # a request not answered by then failed (every part)
    stop_ratio: float = 1.12      # bisect until hi / lo < this
    max_trials: int = 8           # from 150 req/s: 5 doublings to 4800, then 3 bisections
    max_search_s: float = 80.0    # per (configuration, encoding)
    images: int = 2000            # sample images cycled through (loadtest.capacity, loadtest.realbench)
    # The bench's other parts (loadtest.bench).
    test_images: int | None = None  # test images evaluated and sent (None: all 10,000)
    fallback_capacity: float = 200.0  # c, b, e when part a did not run
    part_warmup_s: float = 1.5    # unscored seconds before each run of part c
    part_pause_s: float = 2.0     # after each run of parts c, b, e (the server drains)
    confirm_images: int = 10_000  # part e: each test image once
    accuracy_load: float = 0.5    # part e's rate, as a fraction of the capacity
    controller_phase: int = 3000  # requests per phase of part b
    controller_window: int = 1000
    controller_load: float = 0.5  # part b's rate, as a fraction of the capacity
    deadline_s: float = 15.0      # per load level of part c
    loads: tuple[float, ...] = (0.5, 0.8, 1.0)
    stall_s: float = 20.0         # part f
    stages_rate: float = 300.0    # part s: below capacity, py-spy costs CPU too
    stages_s: float = 15.0
    stages_spy_rate: int = 100
    blocks_threads: tuple[int, ...] = (1, 2)
    blocks_batches: tuple[int, ...] = (1, 64)
    blocks_s: float = 3.0
    warmup_rounds: int = 5        # the server's MSDNET_WARMUP_ROUNDS

    def search_dict(self) -> dict:
        """The capacity search's fields (:data:`SEARCH_FIELDS`) by name, as a run's
        JSON stores them (rates in requests/s, times in seconds)."""
        return {k: getattr(self, k) for k in SEARCH_FIELDS}


SEARCH_FIELDS = ("start", "max_rate", "min_rate", "trial_s", "warmup_s", "pause_s", "timeout_s", "stop_ratio",
                 "max_trials", "max_search_s", "images")
FULL = Plan()
SMOKE = Plan(start=15.0, trial_s=2.0, warmup_s=0.5, pause_s=0.2, max_trials=1, max_search_s=10.0, images=60,
             test_images=200, fallback_capacity=20.0, part_warmup_s=0.2, part_pause_s=0.1, confirm_images=60,
             controller_phase=24, controller_window=12, deadline_s=0.5, stall_s=2.0, stages_rate=20.0, stages_s=1.0,
             blocks_threads=(1,), blocks_batches=(1, 4), blocks_s=0.2, warmup_rounds=1)
ENCODINGS = ("png", "json")  # png: the raw image body (image/png or image/jpeg, as the sample file is)
ENCODING_LABELS = {"png": "raw image/png", "json": "JSON base64"}


def log(msg: str) -> None:
    """One progress line on stdout, with the wall-clock time."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fmt(v, spec: str = "{:.1f}", none: str = "–") -> str:
    """``spec.format(v)``; ``none`` for None or NaN, '∞' for an infinite float."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return spec.format(v)


def pct(v, spec: str = "{:.2f}") -> str:
    """A fraction as a percentage (without the % sign); '–' for None."""
    return fmt(None if v is None else 100 * v, spec)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table: the header row, the ``---`` row, then ``rows`` (each as many
    cells as ``header``; ``ValueError`` otherwise). An empty cell is written ``| |``."""
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"row of {len(r)} cells under a header of {len(header)}: {r}")

    def line(cells: list[str]) -> str:
        return "|" + "|".join(f" {c} " if c != "" else " " for c in cells) + "|"

    return [line(header), line(["---"] * len(header)), *(line(r) for r in rows)]


def yes(ok) -> str:
    """A goal's verdict cell."""
    return "**met**" if ok else "**not met**"


def exit_shares(exits: dict) -> str:
    """``{"1": n1, ...}`` as '1: 40%, 2: 60%' (shares of the answered requests)."""
    tot = sum(exits.values()) or 1
    return ", ".join(f"{k}: {100 * v / tot:.0f}%" for k, v in exits.items())
