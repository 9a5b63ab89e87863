"""What the benchmark's parts, report and plots share: the plan (sizes of every
part), the targets, the plot file names, the log line and number formatting."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

PNGS = {"throughput": "bench_throughput.png", "controller": "bench_controller.png",
        "deadlines": "bench_deadlines.png", "efficiency": "bench_efficiency.png"}
TARGET_SPEEDUP = 2.5            # part a: msdnet-serve capacity / forced-last-exit capacity
TARGET_ACC_DROP_POINTS = 0.3    # part a: accuracy points msdnet-serve may lose to the last exit
TARGET_DEADLINE_SHARE = 0.999   # part c: deadlines met at 80% of capacity
TARGET_FLOPS_ERROR = 0.02       # part b: |mean FLOPs / target - 1| of every window


@dataclass(frozen=True)
class Plan:
    """Sizes of every part. Rates in requests/s, times in seconds."""

    search_start: float = 100.0   # first rate tried; doubled until the SLO fails, then bisected
    search_max: float = 6400.0
    min_rate: float = 5.0
    trial_s: float = 15.0         # scored seconds per rate tried
    warmup_s: float = 1.5         # unscored seconds before each run
    pause_s: float = 2.0          # between runs (the server drains)
    timeout_s: float = 5.0        # a request not answered by then failed
    bisect_steps: int = 4
    max_trials: int = 12
    confirm_images: int = 10_000  # accuracy run: each test image once ...
    confirm_max_s: float = 110.0  # ... unless that takes longer at capacity
    confirm_max_s_naive: float = 30.0  # the baseline's answers are the last exit's: fewer images will do
    controller_phase: int = 3000  # requests per phase of part b
    controller_window: int = 1000
    controller_load: float = 0.5  # part b's rate, as a fraction of (i)'s capacity
    deadline_s: float = 15.0      # per load level of part c
    loads: tuple[float, ...] = (0.5, 0.8, 1.0, 1.2)
    eff_repeats_b1: int = 300
    eff_repeats_b64: int = 30
    peak_n: int = 2048
    images: int | None = None     # test images used (None: all 10,000)
    warmup_rounds: int = 5        # the server's MSDNET_WARMUP_ROUNDS


FULL = Plan()
SMOKE = Plan(search_start=20.0, search_max=40.0, trial_s=0.6, warmup_s=0.2, pause_s=0.1, timeout_s=5.0,
             bisect_steps=1, max_trials=2, confirm_images=100, confirm_max_s=0.8, confirm_max_s_naive=0.8,
             controller_phase=24,
             controller_window=12, controller_load=0.5, deadline_s=0.5, eff_repeats_b1=5, eff_repeats_b64=2,
             peak_n=256, images=200, warmup_rounds=1)


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
