"""The front door of an HTTP process: shed load when this process itself is behind.

Plain Python (no HTTP, no threads; the caller feeds it). The engine's latency
objective (:mod:`server.budget.objective`) sees the engine's queue; it cannot see
requests waiting in this process's socket buffers or for a decoding thread.
"""

from __future__ import annotations


class FrontDoor:
    """Sheds load at an HTTP process's front door when the process itself, not
    the engine, is behind (HTTP, JSON and decoding share the cores with the
    blocks: on a small network they cost more than the blocks, so degrading the
    exits cannot help; on a large one decoding may queue behind the blocks).

    Two signals, each smoothed: the event loop's lag (how late a 10-ms timer
    fires: requests wait unread in socket buffers while the loop is behind,
    invisible to every stamp the server can take) and the decode delay (from a
    request's arrival to its image decoded: decoding waits for a worker thread
    and a core). While the larger exceeds ``lag_share`` of the objective, a
    growing share of new requests is refused (a refusal costs a fraction of an
    answer, so the process catches up); below half of it, the share falls back to 0.

    Args:
        objective_s: the latency objective (seconds).
        lag_share: share of the objective either signal may reach.
        rise: refusal share added per sample at the limit (more above it).
        fall: refusal share removed per sample below half the limit.
        max_share: the largest share refused.
    """

    def __init__(self, objective_s: float, lag_share: float = 0.25, rise: float = 0.05, fall: float = 0.01,
                 max_share: float = 0.95):
        self.limit_s = lag_share * objective_s
        self.rise, self.fall, self.max_share = rise, fall, max_share
        self.loop_lag_s = 0.0
        self.decode_delay_s = 0.0
        self.share = 0.0

    @property
    def lag_s(self) -> float:
        """How far behind this process is (seconds): the larger smoothed signal."""
        return max(self.loop_lag_s, self.decode_delay_s)

    def observe(self, lag_s: float) -> None:
        """One event-loop lag sample (seconds late; from the loop's timer, every ~10 ms)."""
        self.loop_lag_s = 0.7 * self.loop_lag_s + 0.3 * max(0.0, lag_s)
        self.decode_delay_s *= 0.98  # forget a delay no decode reports any more (half-life ~0.35 s)
        self._steer()

    def observe_decode(self, delay_s: float) -> None:
        """One request's delay from arrival to its image decoded (seconds)."""
        self.decode_delay_s = 0.9 * self.decode_delay_s + 0.1 * max(0.0, delay_s)
        self._steer()

    def _steer(self) -> None:
        lag = self.lag_s
        if lag > self.limit_s:
            self.share = min(self.max_share, self.share + self.rise * min(lag / self.limit_s, 4.0))
        elif lag < 0.5 * self.limit_s:
            self.share = max(0.0, self.share - self.fall)

    def admits(self, draw: float) -> bool:
        """Whether a new request is taken; ``draw`` uniform in [0, 1) (the caller's
        random number, so tests choose it)."""
        return draw >= self.share
