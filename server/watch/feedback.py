"""A bounded store of recent answers, so that labels arriving later can be scored.

Plain Python (no torch, no HTTP). Each answered ``/classify`` request (one image)
is kept under its request id (the server's ``X-Request-ID``): the exit it was
answered at, the class served and, when it was audited, the last exit's class.
The store holds the newest ``capacity`` answers; older ones are forgotten (a label
for one is refused as unknown). A label may arrive before the request's audit has
finished: the last exit's correctness is then counted when the audit finishes.
Thread-safe (model threads record, the event loop labels).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from .. import errors

# A record: [exit (1-based), served class, last exit's class or None, audited, label or None]
_EXIT, _SERVED, _LAST, _AUDITED, _LABEL = range(5)


@dataclass(frozen=True)
class Labelled:
    """One label and what it says about its request's answer.

    Attributes:
        request_id: the request's id.
        label: the true class id.
        exit: the exit the answer left at (1-based).
        served_class: the class answered.
        audited: whether the request was sampled for the last exit.
        last_class: the last exit's class (None: not audited, or its audit has not
            finished yet; it is scored when it finishes).
    """

    request_id: str
    label: int
    exit: int
    served_class: int
    audited: bool
    last_class: int | None


class FeedbackStore:
    """Request id -> answer, for the newest ``capacity`` answers; see the module docstring.

    Raises:
        ValueError: ``capacity`` below 1.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._records: OrderedDict[str, list] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._records)

    def _put(self, key: str, record: list) -> None:
        self._records[key] = record
        self._records.move_to_end(key)
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)

    def answered(self, key: str, exit_k: int, served_class: int, audited: bool) -> None:
        """Record an answer (a request id seen again replaces the older answer)."""
        with self._lock:
            old = self._records.get(key)
            if old is not None and old[_AUDITED] and old[_EXIT] == exit_k and old[_SERVED] == served_class:
                return  # its audit finished first (another model thread): keep the last exit's class
            self._put(key, [exit_k, served_class, None, audited, None])

    def audited(self, key: str, served_exit: int, served_class: int, last_class: int | None) -> int | None:
        """Record the last exit's class of an audited answer; returns the label when
        one has already arrived (the caller scores the last exit), else None."""
        with self._lock:
            record = self._records.get(key)
            if record is None or record[_EXIT] != served_exit or record[_SERVED] != served_class:
                self._put(key, [served_exit, served_class, last_class, True, None])
                return None
            record[_LAST], record[_AUDITED] = last_class, True
            return record[_LABEL]

    def label(self, key: str, label: int) -> Labelled:
        """Attach the true class ``label`` to request ``key``'s answer.

        Raises:
            errors.UnknownRequest: (404) no answer of that id is held (never
                answered here, not a one-image /classify request, or forgotten).
            errors.AlreadyLabelled: (409) that answer has a label already.
        """
        with self._lock:
            record = self._records.get(key)
            if record is None:
                raise errors.UnknownRequest(
                    f"no answer with request id {key!r} is held: unknown, not a one-image /classify answer, or "
                    f"older than the newest {self.capacity} answers (MSDNET_FEEDBACK_STORE_SIZE)",
                    request_id=key)
            if record[_LABEL] is not None:
                raise errors.AlreadyLabelled(f"request {key!r} was labelled already (class {record[_LABEL]})",
                                             request_id=key, label=record[_LABEL])
            record[_LABEL] = label
            return Labelled(key, label, record[_EXIT], record[_SERVED], record[_AUDITED], record[_LAST])
