"""``python -m tests.held_serve DIR [msdnet serve options]``: ``msdnet serve``
(the real CLI path: settings, uvicorn, graceful shutdown) with every model step
held until the file ``DIR/release`` exists; ``DIR/held`` appears when the first
step is held. For tests that need a request really in flight (SIGTERM drain)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from server import cli
from server.engine.runner import Runner


def main() -> int:
    folder = Path(sys.argv[1])

    def hold(block, batch):  # model thread, before a step runs
        (folder / "held").touch()
        while not (folder / "release").exists():
            time.sleep(0.01)

    Runner.step_hook = staticmethod(hold)
    return cli.main(["serve", *sys.argv[2:]])


if __name__ == "__main__":
    sys.exit(main())
