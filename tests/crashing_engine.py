"""``python -m tests.crashing_engine serve ...``: ``msdnet serve`` whose engine process
(``--workers N``) exits with status 3 before it is warm, as a crash while loading would.
The engine, a spawned child, imports this module as its parent's main module, which
replaces its run before it loads anything."""

from __future__ import annotations

import os
import sys

from server import cli
from server.ipc import engine


def _crash(*_args, **_kwargs) -> None:
    os._exit(3)


if os.environ.get("MSDNET_TEST_ENGINE_CRASH"):
    engine.run = _crash

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
