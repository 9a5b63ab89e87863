"""This process's listening socket: refuse to run as one of several worker
processes of one server (:func:`claim`), and see its accept queue (:func:`queued`).

A process that loads the model owns the model thread, the scheduler, the budget
controller and the metrics registry. ``msdnet serve --workers N`` runs N HTTP
workers against one engine process (``server.ipc``; the workers skip this check),
but ``uvicorn --factory server.http.app:create_app --workers 2`` or gunicorn with
several workers would load the model in several processes sharing one listening socket:
each would keep its own controller and metrics, and a scrape would see one
process's counts. Those processes hold the same socket (the same inode), so the
first takes an exclusive lock named after it and any other one fails its startup
with a clear message (uvicorn and gunicorn then stop the whole server).
Linux only (``/proc``); elsewhere the check is skipped.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import struct
import tempfile
from pathlib import Path

_TCP_LISTEN = 10  # tcp_info.tcpi_state of a listening socket

_held: list = []  # lock files kept open for the life of the process


class SharedListener(RuntimeError):
    """Another process of this server already serves on the same listening socket."""


def _server_sockets() -> dict[str, int]:
    """{inode: fd} of this process's bound, unconnected stream sockets: the
    listening socket (under ``uvicorn --workers`` the parent binds it and the first
    worker to serve calls ``listen()``, so it may not be listening yet)."""
    found = {}
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return found
    for fd in fds:
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            with socket.socket(fileno=os.dup(fd)) as s:
                if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                if s.getsockname()[1] == 0:
                    continue  # not bound
                try:
                    s.getpeername()
                    continue  # connected: a client or an accepted connection
                except OSError:
                    found[str(os.fstat(fd).st_ino)] = fd
        except OSError:
            continue
    return found


def claim() -> None:
    """Lock each server socket this process holds; call once at startup.

    A process started by ``msdnet serve`` binds its socket after startup and
    holds none here: nothing to claim.

    Raises:
        SharedListener: another live process of this server holds the lock.
    """
    for inode in sorted(_server_sockets()):
        path = Path(tempfile.gettempdir()) / f"msdnet-listener-{inode}.lock"
        f = open(path, "w")  # noqa: SIM115 - kept open: the lock lives as long as the process
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise SharedListener(
                "another worker process already serves this listening socket with its own model: a replica "
                "has one model thread, one budget controller and one set of metrics; for several HTTP worker "
                "processes use 'msdnet serve --workers N' (one engine process shared by N workers)") from None
        _held.append(f)


def listening() -> list[int]:
    """The descriptors of this process's listening sockets (one per socket)."""
    return list(_server_sockets().values())


def queued(fds: list[int] | None = None) -> int:
    """Connections the kernel has completed on this process's listening sockets
    (``fds``, default :func:`listening`) that no process has accepted yet: the accept
    queue (Linux ``TCP_INFO``: a listening socket reports its queue length as
    ``tcpi_unacked``); 0 where that is unknown. Closing the last descriptor of a
    listening socket resets those connections."""
    total = 0
    for fd in listening() if fds is None else fds:
        try:
            with socket.socket(fileno=os.dup(fd)) as s:
                info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
        except (OSError, AttributeError):  # closed meanwhile, or no TCP_INFO on this system
            continue
        if info[0] == _TCP_LISTEN:
            total += struct.unpack_from("I", info, 24)[0]
    return total
