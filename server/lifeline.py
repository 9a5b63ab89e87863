"""A child process stops when its parent is gone (issue 25, goal 6).

``msdnet serve --workers N`` runs an engine process and N HTTP worker processes
under the CLI process, and every HTTP process may start a low-priority decoding
process. On Linux a child outlives a parent killed with SIGKILL (it is re-parented
to PID 1) and would go on serving the port. Each of them calls
:func:`follow_parent` at start: a daemon thread notices the parent's death (its
parent PID changes) within ``interval_s`` and stops the process, gracefully first
(SIGTERM to itself: answer what it holds, as on an orchestrator's stop), then for
good after ``grace_s``. Polling rather than ``PR_SET_PDEATHSIG``: that signal fires
when the *thread* that started the child exits, and the decoding process is
started from a request thread of a pool that retires idle threads.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

log = logging.getLogger("msdnet.lifeline")


def _stop_gracefully(grace_s: float) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os._exit(1)  # the graceful stop did not end the process in time


def follow_parent(interval_s: float = 0.5, grace_s: float = 15.0,
                  on_orphan: Callable[[], None] | None = None) -> threading.Thread:
    """Watch this process's parent from a daemon thread; when it is gone, call
    ``on_orphan`` (default: SIGTERM to this process, then exit after ``grace_s`` s).

    Args:
        interval_s: seconds between two looks at the parent PID.
        grace_s: how long the default stop may take before the process exits with 1.
        on_orphan: what to do instead (e.g. ``lambda: os._exit(0)``).

    Returns:
        The started thread (named ``msdnet-lifeline``).
    """
    parent = os.getppid()
    act = on_orphan or (lambda: _stop_gracefully(grace_s))

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        log.warning("parent process %d is gone: stopping process %d", parent, os.getpid())
        act()

    thread = threading.Thread(target=watch, name="msdnet-lifeline", daemon=True)
    thread.start()
    return thread
