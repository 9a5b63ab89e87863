"""The capacity search, in plain Python: the highest arrival rate whose trial
passes, found by doubling then geometric bisection over a pass/fail trial
function. Every capacity in the benchmarks comes from :func:`search_capacity`
(``loadtest.parts.capacity.find_capacity`` runs its trials: open-loop runs judged
by their p99 latency against the SLO and their failures). Rates in requests/s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .common import Plan


@dataclass
class Bracket:
    """What a search found. ``lo``: the highest rate that passed (requests/s, None:
    none passed); ``hi``: the lowest rate above ``lo`` that failed (None: none failed
    up to ``max_rate``); ``tried``: ``(rate, passed)`` of every trial in order, each
    rate rounded to 0.1 requests/s as it was tried."""

    lo: float | None = None
    hi: float | None = None
    tried: list[tuple[float, bool]] = field(default_factory=list)


def search_capacity(passes: Callable[[float], bool], plan: Plan,
                    clock: Callable[[], float] = time.monotonic) -> Bracket:
    """Search the highest passing rate with ``passes(rate)`` (rate in requests/s,
    rounded to 0.1; True when that trial passed).

    From ``plan.start``, double while the rate passes and is at most
    ``plan.max_rate``; if the first rate fails, halve until one passes or the next
    would fall below ``plan.min_rate``; then bisect geometrically (the next rate is
    ``sqrt(lo * hi)``) until ``hi / lo < plan.stop_ratio``. At most
    ``plan.max_trials`` trials, and no trial starts once ``plan.max_search_s``
    seconds of ``clock`` (seconds, monotonic) have passed since the search began.
    """
    found = Bracket()
    started = clock()

    def budget_left() -> bool:
        return len(found.tried) < plan.max_trials and clock() - started < plan.max_search_s

    def run(rate: float) -> bool:
        ok = bool(passes(round(rate, 1)))
        found.tried.append((round(rate, 1), ok))
        return ok

    rate = plan.start
    while budget_left() and rate <= plan.max_rate:
        if run(rate):
            found.lo, rate = rate, rate * 2
        else:
            found.hi = rate
            break
    while found.lo is None and found.hi is not None and found.hi / 2 >= plan.min_rate and budget_left():
        if run(found.hi / 2):
            found.lo = found.hi / 2
        else:
            found.hi = found.hi / 2
    while found.lo is not None and found.hi is not None and found.hi / found.lo >= plan.stop_ratio \
            and budget_left():
        mid = math.sqrt(found.lo * found.hi)
        if run(mid):
            found.lo = mid
        else:
            found.hi = mid
    return found
