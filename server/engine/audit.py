"""Audit queues: answered images carried on to the last exit with spare capacity.

Plain Python (no torch, no HTTP, no threads; the scheduler calls it under its
lock). A sampled ``/classify`` image that left CONFIDENT at exit k < K has had
its answer sent; the accuracy watch (``server.watch``) wants to know whether the
last exit would have said the same. Such an image (``Task.audit``) waits here, at
block k+1, apart from the regular queues, and the scheduler takes a step from
these queues only when it holds no regular image at all (none queued at any
block, none in a running step): audit work never shares a step with a request
and never waits in front of one. At most ``max_held`` images are held; when a new
one comes and the queues are full, the oldest is dropped (the auditor is told).
The runner tells a :class:`StepWatch` what the audits (and regular steps) found.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .scheduler import Finished, Task


class Auditor(Protocol):
    """Chooses which answered images are audited (``server.watch``); called under the scheduler's lock."""

    @property
    def open(self) -> bool:
        """Whether audit work may run now (False e.g. while the latency objective degrades)."""
        ...

    def wants(self, task: Task) -> bool:
        """Whether ``task``, leaving CONFIDENT at exit ``task.exits_done`` < K, is audited."""
        ...

    def dropped(self, task: Task) -> None:
        """``task`` was held for audit and is dropped unfinished (the queues were full)."""
        ...


class StepWatch(Protocol):
    """What the runner tells the accuracy watch (``server.watch``); each call on a model thread."""

    def confidences(self, block: int, confidences: list[float]) -> None:
        """A regular step of ``block`` (0-based) gave these confidences (NaN: not finite)."""
        ...

    def answered(self, task: Task, result: Finished) -> None:
        """``task`` left the network (any outcome but ``AUDITED``) with ``result``."""
        ...

    def audit_step(self, block: int, n: int, seconds: float) -> None:
        """An audit step ran ``block`` (0-based) on ``n`` images in ``seconds``."""
        ...

    def audited(self, task: Task, served_exit: int, served_class: int, last_class: int | None) -> None:
        """An audited image answered ``served_class`` at ``served_exit`` (1-based) and the
        last exit says ``last_class`` (None: that exit's output is not finite)."""
        ...


class AuditQueues:
    """One audit queue per block, bounded; see the module docstring.

    Args:
        num_blocks: K.
        max_held: audited images held at once (all queues and running steps).
        max_batch: images per audit step (a small step keeps the wait of a request
            arriving during it short).
    """

    def __init__(self, num_blocks: int, max_held: int, max_batch: int):
        if max_held < 1 or max_batch < 1:
            raise ValueError("max_held and max_batch must be at least 1")
        self.queues: list[deque[Task]] = [deque() for _ in range(num_blocks)]
        self.max_held, self.max_batch = max_held, max_batch
        self.held = 0  # queued or in a running audit step

    def reserve(self) -> Task | None:
        """Count one more held image (sampled now, queued by :meth:`requeue` once
        answered); returns the oldest queued image when it had to be dropped to
        make room, else None (when every held image is running, none is dropped
        and the bound is passed by this one until a step finishes)."""
        dropped = None
        if self.held >= self.max_held:
            heads = [q for q in self.queues if q]
            if heads:
                oldest = min(heads, key=lambda q: q[0].arrival)
                dropped = oldest.popleft()
                self.held -= 1
        self.held += 1
        return dropped

    def take(self) -> tuple[int, list[Task]] | None:
        """The next audit step: up to ``max_batch`` images of the deepest non-empty
        queue (it finishes audits soonest and frees their features), or None."""
        for block in range(len(self.queues) - 1, -1, -1):
            q = self.queues[block]
            if q:
                return block, [q.popleft() for _ in range(min(self.max_batch, len(q)))]
        return None

    def requeue(self, task: Task, block: int) -> None:
        """``task`` (held) waits at ``block`` (0-based) for its next audit step."""
        self.queues[block].append(task)

    def release(self, n: int) -> None:
        """``n`` held images finished (last exit reached, no finite output, or failed)."""
        self.held -= n

    def drain(self) -> list[Task]:
        """Remove and return every queued image (shutdown)."""
        tasks = [t for q in self.queues for t in q]
        for q in self.queues:
            q.clear()
        self.held -= len(tasks)
        return tasks
