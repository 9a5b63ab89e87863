"""Server processes for benchmarks: ``ServerProcess.msdnet`` (``msdnet serve``) or
``ServerProcess.naive`` (the baseline), each on a free loopback port.

The process logic lives in :mod:`loadtest.harness` (shared with the tests'
``LiveServer``); this module keeps the names benchmarks import.
"""

from __future__ import annotations

from .harness import ServerProcess, free_port, serve_command

__all__ = ["ServerProcess", "free_port", "serve_command"]
