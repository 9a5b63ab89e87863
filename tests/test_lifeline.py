"""Processes die with their parent (issue 25, goal 6): after ``kill -9`` of ``msdnet serve
--workers 2`` its engine, its HTTP workers and their decoding processes stop; a clean stop
(SIGTERM) leaves no decoding process behind either."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from loadtest.harness import process_tree
from tests.leftovers import cmdline
from tests.live import LiveServer
from tests.test_decoding import png

pytestmark = pytest.mark.integration


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], limit_s: float = 60.0) -> list[int]:
    """Wait (a hang guard, not a speed bound) until none of ``pids`` is alive; those still alive."""
    deadline = time.monotonic() + limit_s
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def kill_all(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def test_follow_parent_stops_an_orphan():
    """A child calling follow_parent exits once its parent is killed with SIGKILL."""
    code = ("import os, subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import os, time; from server.lifeline import follow_parent; "
            "follow_parent(interval_s=0.05, on_orphan=lambda: os._exit(0)); print(os.getpid(), flush=True); "
            "time.sleep(600)'], stdout=subprocess.PIPE, text=True); "
            "print(c.stdout.readline().strip(), flush=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    try:
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.kill()
        parent.wait(30)
        left = wait_gone([child])
    finally:
        parent.kill()
    kill_all(left)
    assert not left, "the orphan kept running"


def _with_decoding_process(srv: LiveServer) -> list[int]:
    """Send a large image (decoded in a low-priority process) to every worker; the whole tree."""
    for _ in range(4):  # whichever worker takes it starts its decoding process
        r = httpx.post(srv.url + "/classify", content=png(1100, 1000), headers={"content-type": "image/png"},
                       timeout=60)
        assert r.status_code == 200, r.text
    tree = process_tree(srv.proc.pid)
    assert any("multiprocessing" in cmdline(p) and "resource_tracker" not in cmdline(p) for p in tree), \
        [cmdline(p) for p in tree]
    return tree


def test_kill_9_of_msdnet_serve_leaves_no_process(tiny_checkpoint):
    srv = LiveServer(tiny_checkpoint, args=["--workers", "2"])
    with srv:
        tree = _with_decoding_process(srv)
        assert len(tree) >= 4  # engine, 2 workers, a decoding process (and the resource tracker)
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(30)
        left = wait_gone(tree)
        kill_all(left)
    assert not left, [cmdline(p) for p in left]


def test_a_clean_stop_leaves_no_decoding_process(tiny_checkpoint):
    srv = LiveServer(tiny_checkpoint, args=["--workers", "2"])
    with srv:
        tree = _with_decoding_process(srv)
    assert srv.returncode == 0, srv.log[-2000:]
    left = wait_gone(tree)
    kill_all(left)
    assert not left, [cmdline(p) for p in left]
