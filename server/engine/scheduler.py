"""Block-level scheduler: which images run which block next, and when they leave.

Plain Python: no torch, no HTTP, no threads; the caller passes the clock. The
runner (``server.engine.runner``) asks :meth:`BlockScheduler.next_step` for a batch,
runs that block on it, and reports each image's confidence to
:meth:`BlockScheduler.complete`, which sends it out or on to the next block.

Requests from all clients share one queue per block, served in arrival order
except that images with a deadline go first, earliest deadline first, when more
wait than a step takes. Block 1's queue waits up to
``max_queue_delay_s`` to fill a batch, but only while the recent arrival rate
(:class:`ArrivalRate`) says another image is due within that wait: at low load
an image starts at once, under load batches grow. Deeper queues run at once. Between two
steps of deeper blocks a ready block-1 queue always gets a turn, so new arrivals
never wait behind a running batch's deeper blocks for more than one step.

Audited images (``Task.audit``: answered at an early exit, sampled by an
:class:`~server.engine.audit.Auditor` to be carried on to the last exit) wait in
separate queues (:class:`~server.engine.audit.AuditQueues`) and run only when the
scheduler holds no regular image, queued or running, and the auditor is open.

Times are seconds on a monotonic clock; FLOPs are multiply-accumulates of convs
and linears (MSDNet paper convention), cumulative per exit.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .audit import AuditQueues

if TYPE_CHECKING:
    import numpy as np

    from .audit import Auditor


class QueueFull(Exception):
    """The scheduler holds ``max_queue_size`` images; retry later."""

    def __init__(self, retry_after_s: float):
        super().__init__(f"queue full; retry after {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class Outcome(enum.Enum):
    """Why an image left the network."""

    CONFIDENT = "confident"   # confidence reached the exit's threshold
    LAST_EXIT = "last_exit"   # ran every block
    DEADLINE = "deadline"     # the next block would overrun its deadline
    BUDGET = "budget"         # its batch's FLOPs budget cannot pay for the next block
    EXPIRED = "expired"       # deadline passed before exit 1 could run: nothing computed
    NON_FINITE = "non_finite"  # the exit's logits are NaN or infinite: no answer, no further block
    CANCELLED = "cancelled"   # its client left (the request was cancelled): no further block
    AUDITED = "audited"       # an audited image reached the last exit (or a non-finite output): its answer
    #                           had gone out when it left; nothing to answer now


@dataclass
class Finished:
    """An image's answer: outcome, exit (1-based; 0 = nothing computed), probabilities
    there ``(num_classes,)`` float32 (None when nothing was computed), FLOPs
    (cumulative to the exit), the confidence that decided and, for /classify, the
    target mean FLOPs per request in force when it was answered and whether that
    was below the configured target (the latency objective degraded it; None and
    False for /batch)."""

    outcome: Outcome
    exit: int
    probs: np.ndarray | None
    flops: int
    confidence: float | None
    target_flops: float | None = None
    degraded: bool = False


class ExitPolicy(Protocol):
    """Decides, after exit k (1-based), whether an image leaves."""

    def leaves(self, task: Task, confidence: float) -> bool: ...

    def may_continue(self, task: Task) -> bool:
        """Whether the image may start its next block; a True answer reserves
        the block's FLOPs (the step is then run)."""
        ...


@dataclass(eq=False)
class Task:
    """One image in flight.

    Attributes:
        arrival: when the request arrived (s, monotonic).
        deadline: absolute deadline (s, monotonic) or None.
        policy: its exit policy (the controller's thresholds, or a batch budget).
        exits_done: exits evaluated so far (0..K).
        confidence: confidence at the newest exit.
        state: the runner's opaque per-image data (features, logits).
        cancelled: its request was cancelled (the client left): it runs no further
            block and leaves with ``CANCELLED`` when next chosen or completed.
        auditable: a ``/classify`` image: the auditor may sample it when it leaves early.
        audit: answered already and carried on to the last exit with spare capacity
            (``exits_done`` and ``confidence`` then follow the audit, not the answer).
        key: the request id, for the accuracy watch (None: none).
    """

    arrival: float
    policy: ExitPolicy
    deadline: float | None = None
    exits_done: int = 0
    confidence: float | None = None
    state: Any = None
    cancelled: bool = False
    auditable: bool = False
    audit: bool = False
    key: str | None = None
    id: int = field(default_factory=itertools.count().__next__)


class ArrivalRate:
    """Images per second arriving at block 1, from their arrival stamps: an
    exponentially weighted mean of the gaps between consecutive arrivals.

    Args:
        halflife: arrivals after which an old gap weighs half.
    """

    def __init__(self, halflife: float = 32.0):
        self._keep = 0.5 ** (1.0 / halflife)
        self._gap: float | None = None  # mean gap, seconds
        self._last: float | None = None

    def observe(self, arrival: float) -> None:
        if self._last is not None:
            gap = max(0.0, arrival - self._last)
            self._gap = gap if self._gap is None else self._keep * self._gap + (1 - self._keep) * gap
        self._last = arrival if self._last is None else max(self._last, arrival)

    @property
    def per_second(self) -> float:
        """The rate (images/s); 0 before two arrivals, infinite for a burst."""
        if self._gap is None:
            return 0.0
        return float("inf") if self._gap == 0 else 1.0 / self._gap


class LatencyModel:
    """Per-block step time as ``a_k + b_k * batch`` seconds, fitted online by
    exponentially weighted least squares, with a safety factor.

    Args:
        num_blocks: K.
        decay: weight kept by past observations at each new one.
        safety: the estimate is multiplied by this.
    """

    def __init__(self, num_blocks: int, decay: float = 0.98, safety: float = 1.25):
        self.decay, self.safety = decay, safety
        # Sufficient statistics per block: sum w, w*n, w*n^2, w*t, w*n*t.
        self._s = [[0.0] * 5 for _ in range(num_blocks)]

    def observe(self, block: int, batch: int, seconds: float) -> None:
        s = self._s[block]
        for i, v in enumerate((1.0, batch, batch * batch, seconds, batch * seconds)):
            s[i] = self.decay * s[i] + v

    def estimate(self, block: int, batch: int) -> float:
        """Expected seconds for one step of ``block`` (0-based) on ``batch`` images."""
        w, sn, snn, st, snt = self._s[block]
        if w == 0:
            return 0.0
        var = snn / w - (sn / w) ** 2
        if var <= 1e-9 * max(1.0, snn / w):  # one batch size seen so far: scale per image
            per_image = st / sn if sn else 0.0
            return self.safety * per_image * batch
        slope = (snt / w - (sn / w) * (st / w)) / var
        intercept = st / w - slope * sn / w
        return self.safety * max(intercept + slope * batch, 0.0)


class BlockScheduler:
    """One queue per block; see the module docstring.

    Args:
        num_blocks: K (blocks = exits).
        max_batch_size: images per block step.
        max_queue_delay_s: longest time block 1 waits to fill a batch.
        max_queue_size: images held at once (all queues and the running step);
            more are refused with :class:`QueueFull`.
        latency: the step-time model used for deadlines.
        adaptive_wait: block 1 waits only while another image is expected within
            ``max_queue_delay_s`` at the recent arrival rate (False: always waits).
        auditor: samples answered images for the last exit (None: no audits).
        max_audit_held: audited images held at once (the oldest is dropped past it).
        max_audit_batch: images per audit step (default: ``max_batch_size`` // 4, at least 1).
    """

    def __init__(self, num_blocks: int, max_batch_size: int, max_queue_delay_s: float, max_queue_size: int,
                 latency: LatencyModel | None = None, adaptive_wait: bool = True, auditor: Auditor | None = None,
                 max_audit_held: int = 256, max_audit_batch: int | None = None):
        self.num_blocks = num_blocks
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.latency = latency or LatencyModel(num_blocks)
        self.adaptive_wait = adaptive_wait
        self.arrivals = ArrivalRate()
        self.queues: list[deque[Task]] = [deque() for _ in range(num_blocks)]
        self.in_flight = 0  # images in the scheduler, queued or running
        self._last_block = -1
        self.auditor = auditor
        self.audits = AuditQueues(num_blocks, max_audit_held, max_audit_batch or max(1, max_batch_size // 4))

    def depth(self, block: int) -> int:
        """Images waiting at ``block`` (0-based)."""
        return len(self.queues[block])

    def submit(self, tasks: list[Task]) -> None:
        """Queue new images at block 1, all or none.

        Raises:
            QueueFull: when they do not fit; ``retry_after_s`` estimates the drain time.
        """
        if self.in_flight + len(tasks) > self.max_queue_size:
            per_image = sum(self.latency.estimate(b, self.max_batch_size) for b in range(self.num_blocks))
            retry = max(1.0, per_image * self.in_flight / max(self.max_batch_size, 1))
            raise QueueFull(retry)
        self.queues[0].extend(tasks)
        self.in_flight += len(tasks)
        for t in tasks:
            self.arrivals.observe(t.arrival)

    def block1_wait(self) -> float:
        """Seconds block 1 may wait, from its oldest image's arrival, to fill a batch:
        ``max_queue_delay_s`` when at least one more image is due within it at the
        recent arrival rate (or ``adaptive_wait`` is off), else 0."""
        if not self.adaptive_wait or self.arrivals.per_second * self.max_queue_delay_s >= 1.0:
            return self.max_queue_delay_s
        return 0.0

    def _ready(self, block: int, now: float) -> bool:
        q = self.queues[block]
        if not q:
            return False
        if block > 0 or len(q) >= self.max_batch_size:
            return True
        return now - q[0].arrival >= self.block1_wait()

    def next_step(self, now: float) -> tuple[int, list[Task], list[tuple[Task, Outcome]]] | float | None:
        """Choose the next step.

        Returns ``(block, batch, finished)``: run ``block`` (0-based) on ``batch``;
        ``finished`` are images that leave now without running it, because the
        step would overrun their deadline (``DEADLINE``, or ``EXPIRED`` before exit
        1) or their budget cannot pay for it (``BUDGET``). Or a float: seconds
        to wait before asking again; or None when every queue is empty.
        """
        ready = [b for b in range(self.num_blocks) if self._ready(b, now)]
        if not ready:
            if not self.queues[0]:
                return self._audit_step()
            return max(0.0, self.queues[0][0].arrival + self.block1_wait() - now)
        if 0 in ready and self._last_block != 0:
            block = 0
        else:
            block = min(ready, key=lambda b: self.queues[b][0].arrival)
        self._last_block = block
        batch = self._take(block)
        finished = []
        estimate = self.latency.estimate(block, len(batch))
        kept = []
        # Least confident first: when a batch budget cannot pay every image's
        # next block, the blocks go to the images most likely wrong where they are.
        for task in sorted(batch, key=lambda t: -1.0 if t.confidence is None else t.confidence):
            if task.cancelled:
                finished.append((task, Outcome.CANCELLED))
            elif task.deadline is not None and now + estimate > task.deadline:
                finished.append((task, Outcome.EXPIRED if task.exits_done == 0 else Outcome.DEADLINE))
            elif task.exits_done > 0 and not task.policy.may_continue(task):
                finished.append((task, Outcome.BUDGET))
            else:
                kept.append(task)
        keep = set(kept)
        kept = [t for t in batch if t in keep]  # queue order for the step
        self.in_flight -= len(finished)
        return block, kept, finished

    def _audit_step(self) -> tuple[int, list[Task], list] | None:
        """An audit step, only with spare capacity: no regular image queued or running."""
        if self.in_flight > 0 or self.auditor is None or not self.auditor.open:
            return None
        step = self.audits.take()
        return None if step is None else (step[0], step[1], [])

    def _take(self, block: int) -> list[Task]:
        """The next batch of ``block``'s queue: in arrival order, except that when
        more images wait than a step takes, images with a deadline go first,
        earliest deadline first (EDF), so a tight deadline is not left behind
        a long queue of best-effort work."""
        q = self.queues[block]
        n = min(self.max_batch_size, len(q))
        if n == len(q) or all(t.deadline is None for t in q):
            return [q.popleft() for _ in range(n)]
        chosen = heapq.nsmallest(n, q, key=lambda t: (t.deadline is None, t.deadline or 0.0, t.arrival))
        taken = set(map(id, chosen))
        self.queues[block] = deque(t for t in q if id(t) not in taken)
        return chosen

    def complete(self, block: int, batch: list[Task], confidences: list[float],
                 seconds: float) -> list[tuple[Task, Outcome]]:
        """Record a finished step of ``block`` on ``batch`` that took ``seconds``,
        with each image's confidence at exit block+1. Images that leave are
        returned with their outcome; the rest are queued at the next block.
        A NaN confidence means the network's output for that image is not
        finite: it leaves with ``NON_FINITE`` (a deeper block cannot mend it).
        An image leaving ``CONFIDENT`` may be sampled for audit (``task.audit``
        set; it is returned all the same, its answer goes out, and it waits for
        audit steps once the caller passes it to :meth:`queue_audits`); an audited
        image reaching the last exit (or a non-finite output) is returned ``AUDITED``.
        """
        if batch:
            self.latency.observe(block, len(batch), seconds)
        finished = []
        audited = 0
        for task, conf in zip(batch, confidences):
            task.exits_done = block + 1
            task.confidence = conf
            if task.audit:
                if conf != conf or task.exits_done == self.num_blocks:
                    finished.append((task, Outcome.AUDITED))
                    audited += 1
                else:
                    self.audits.requeue(task, block + 1)
            elif conf != conf:  # NaN
                finished.append((task, Outcome.NON_FINITE))
            elif task.exits_done == self.num_blocks:
                finished.append((task, Outcome.LAST_EXIT))
            elif task.policy.leaves(task, conf):
                finished.append((task, Outcome.CONFIDENT))
                self._sample(task)
            elif task.cancelled:
                finished.append((task, Outcome.CANCELLED))
            else:
                self.queues[block + 1].append(task)
        self.in_flight -= len(finished) - audited
        self.audits.release(audited)
        return finished

    def _sample(self, task: Task) -> None:
        """Ask the auditor whether ``task``, leaving early, is carried on to the last exit."""
        if not task.auditable or task.cancelled or self.auditor is None or not self.auditor.wants(task):
            return
        task.audit, task.deadline = True, None
        dropped = self.audits.reserve()
        if dropped is not None:
            self.auditor.dropped(dropped)

    def queue_audits(self, tasks: list[Task]) -> None:
        """Sampled images, answered now, wait for audit steps at their next block."""
        for task in tasks:
            self.audits.requeue(task, task.exits_done)

    def fail(self, batch: list[Task]) -> None:
        """Forget a step's images whose block failed (the runner answers them with
        the error); they no longer count towards ``max_queue_size`` (or the audit bound)."""
        audits = sum(t.audit for t in batch)
        self.in_flight -= len(batch) - audits
        self.audits.release(audits)

    def drain(self) -> list[Task]:
        """Remove and return every queued regular image (shutdown); held audits are dropped."""
        tasks = [t for q in self.queues for t in q]
        for q in self.queues:
            q.clear()
        self.in_flight -= len(tasks)
        self.audits.drain()
        return tasks
