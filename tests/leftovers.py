"""The test run leaves no process behind (issue 25, goal 6): ``tests/conftest.py`` marks the
run's environment, and at the end every live process that inherited the mark (a server, a peer,
an engine, a decoding process, an orphan re-parented to PID 1) is a leftover."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

MARK = "MSDNET_TEST_RUN"


def _own_resource_tracker(d: Path, ppid: int) -> bool:
    """multiprocessing's resource tracker of this very process: it ends when this process does
    (its pipe closes), so it is alive at the end of any run that used a process pool in-process."""
    return ppid == os.getpid() and b"multiprocessing.resource_tracker" in (d / "cmdline").read_bytes()


def marked(token: str) -> list[int]:
    """Live (not zombie) processes other than this one (and its own resource tracker) whose
    environment carries ``MARK=token``."""
    needle = f"{MARK}={token}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle not in (d / "environ").read_bytes().split(b"\0"):
                continue
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z" or _own_resource_tracker(d, int(fields[1])):
                continue
        except OSError:  # gone meanwhile, or not ours to read
            continue
        found.append(int(d.name))
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def collect(token: str, wait_s: float = 30.0) -> list[str]:
    """Wait (bounded) for the marked processes to end; kill and describe those that do not."""
    deadline = time.monotonic() + wait_s
    while (left := marked(token)) and time.monotonic() < deadline:
        time.sleep(0.2)
    described = [f"{pid}: {cmdline(pid)[:200]}" for pid in left]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return described
