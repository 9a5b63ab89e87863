"""The launch of ``--workers N``'s engine process: its run folder, the environment the
HTTP workers read, the start (until warm), the watch for its death, and the stop.

``server/cli.py`` composes it with uvicorn's supervisor of the workers::

    engine = EngineProcess(settings, overrides).start()   # returns once warm
    engine.watch(on_death)                                 # e.g. stop the workers
    try:
        ...  # run the HTTP workers
    finally:
        engine.stop(timeout_s)   # SIGTERM, then kill; the run folder removed

No torch is imported here: the engine process imports it after the spawn.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from ..settings import Settings

log = logging.getLogger("msdnet.cli")


class EngineStartError(RuntimeError):
    """The engine process exited before it was warm. ``exitcode`` 2: a bad checkpoint
    (the engine has printed the one-line reason); anything else: it crashed."""

    def __init__(self, exitcode: int | None):
        super().__init__(f"the engine process exited with code {exitcode} while starting")
        self.exitcode = exitcode


def _engine_main(settings: Settings, address: str, ready) -> None:
    """The engine process, in a process group of its own: a signal to the server's group
    (Ctrl-C in a terminal, ``kill -- -PGID``) reached it together with the workers, and it
    stopped taking their requests while they still drained (they answered 503, and the
    exit status was 1); now it comes from the CLI, once the workers are gone."""
    from . import engine

    os.setpgid(0, 0)
    engine.run(settings, address, ready)


class EngineProcess:
    """One engine process (model, scheduler, controller) serving a Unix socket that the
    HTTP workers reach.

    Args:
        settings: the server's settings (the engine process gets them pickled).
        overrides: the settings given on the command line, by field name; passed on to
            the workers as ``MSDNET_<NAME>`` (uvicorn spawns them: they read the
            environment).

    On :meth:`start`: a run folder under the temporary
    directory holds the socket (``engine.sock``) and, unless ``PROMETHEUS_MULTIPROC_DIR``
    is set, the prometheus-client multiprocess folder (``*.db`` left by an earlier run
    are removed: their values would be added to this one's); this process's
    environment gets ``MSDNET_ENGINE_ADDRESS`` and ``PROMETHEUS_MULTIPROC_DIR``.
    """

    def __init__(self, settings: Settings, overrides: dict):
        self.settings, self.overrides = settings, overrides
        self.run_dir: Path | None = None
        self.proc = None
        self.died = threading.Event()  # exited while not being stopped
        self._stopping = threading.Event()

    def start(self) -> EngineProcess:
        """Spawn the engine and return once it is warm (its first answer possible).

        Raises:
            EngineStartError: the engine exited first (the run folder is removed)."""
        self.run_dir = Path(tempfile.mkdtemp(prefix="msdnet-"))
        metrics_dir = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or self.run_dir / "metrics")
        metrics_dir.mkdir(parents=True, exist_ok=True)
        for stale in metrics_dir.glob("*.db"):
            stale.unlink()
        address = str(self.run_dir / "engine.sock")  # a Unix socket path: short, under /tmp
        os.environ.update({f"MSDNET_{k.upper()}": str(v) for k, v in self.overrides.items()})
        os.environ.update({"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "MSDNET_ENGINE_ADDRESS": address})
        spawn = multiprocessing.get_context("spawn")
        ready = spawn.Event()
        self.proc = spawn.Process(target=_engine_main, args=(self.settings, address, ready), name="msdnet-engine")
        self.proc.start()
        while not ready.wait(0.2):
            if not self.proc.is_alive():
                shutil.rmtree(self.run_dir, ignore_errors=True)
                raise EngineStartError(self.proc.exitcode)
        return self

    def watch(self, on_death: Callable[[], None]) -> None:
        """Call ``on_death()`` (on a daemon thread) if the engine exits before :meth:`stop`;
        :attr:`died` is set first."""
        def wait() -> None:
            self.proc.join()
            if not self._stopping.is_set():
                self.died.set()
                log.error("the engine process exited with code %s: stopping the workers", self.proc.exitcode)
                on_death()

        threading.Thread(target=wait, name="engine-watch", daemon=True).start()

    def stop(self, timeout_s: float) -> None:
        """SIGTERM (the engine answers what it holds, then stops), at most ``timeout_s``
        seconds, then SIGKILL; the run folder removed. Call it once nobody waits on the
        engine (every worker gone)."""
        self._stopping.set()
        if self.proc is not None and self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout_s)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
