"""``python -m tests.held_serve DIR [msdnet serve options]``: ``msdnet serve``
(the real CLI path: settings, uvicorn, graceful shutdown) with every model step
held until the file ``DIR/release`` exists; ``DIR/held`` appears when the first
step is held. For tests that need a request really in flight (SIGTERM drain).

The hook is set when this module is imported, from ``MSDNET_TEST_HOLD_DIR``
(set by :func:`main`), so the engine process of ``--workers N`` (a spawned child,
which imports this module as its parent's main module) holds its steps too.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from server import cli
from server.engine.runner import Runner


def _install(folder: Path) -> None:
    def hold(block, batch):  # model thread, before a step runs
        (folder / "held").touch()
        while not (folder / "release").exists():
            time.sleep(0.01)

    Runner.step_hook = staticmethod(hold)


if os.environ.get("MSDNET_TEST_HOLD_DIR"):
    _install(Path(os.environ["MSDNET_TEST_HOLD_DIR"]))


def main() -> int:
    os.environ["MSDNET_TEST_HOLD_DIR"] = sys.argv[1]
    _install(Path(sys.argv[1]))
    return cli.main(["serve", *sys.argv[2:]])


if __name__ == "__main__":
    sys.exit(main())
