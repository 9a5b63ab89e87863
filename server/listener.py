"""Refuse to run as one of several worker processes of one server.

One process owns the model thread, the scheduler, the budget controller and the
metrics registry. ``msdnet serve`` refuses ``--workers`` above 1, but
``uvicorn --factory server.app:create_app --workers 2`` or gunicorn with several
workers would start the app in several processes sharing one listening socket:
each would keep its own controller and metrics, and a scrape would see one
process's counts. Those processes hold the same socket (the same inode), so the
first takes an exclusive lock named after it and any other one fails its startup
with a clear message (uvicorn and gunicorn then stop the whole server).
Linux only (``/proc``); elsewhere the check is skipped.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from pathlib import Path

_held: list = []  # lock files kept open for the life of the process


class SharedListener(RuntimeError):
    """Another process of this server already serves on the same listening socket."""


def _listening_inodes() -> set[str]:
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6", "/proc/net/unix"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if table.endswith("unix"):
                if len(cols) >= 7 and cols[5] == "01" and cols[3] == "00010000":  # stream, listening
                    listening.add(cols[6])
            elif len(cols) >= 10 and cols[3] == "0A":  # TCP_LISTEN
                listening.add(cols[9])
    return listening


def _own_socket_inodes() -> set[str]:
    inodes = set()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
        if m:
            inodes.add(m.group(1))
    return inodes


def claim() -> None:
    """Lock each listening socket this process holds; call once at startup.

    A process started by ``msdnet serve`` binds its socket after startup and
    holds none here: nothing to claim.

    Raises:
        SharedListener: another live process of this server holds the lock.
    """
    for inode in sorted(_own_socket_inodes() & _listening_inodes()):
        path = Path(tempfile.gettempdir()) / f"msdnet-listener-{inode}.lock"
        f = open(path, "w")  # noqa: SIM115 - kept open: the lock lives as long as the process
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise SharedListener(
                "another worker process already serves this listening socket: msdnet-serve runs one process "
                "per replica (it owns the model thread, the budget controller and the metrics); start it with "
                "'msdnet serve' or with --workers 1, and scale out with replicas") from None
        _held.append(f)
