"""``python3 -m loadtest.stall``: the command line of :mod:`loadtest.parts.stall` (part f of
``python -m loadtest.bench``, a tool of its own too); the code lives there."""

import sys

from .parts.stall import main

if __name__ == "__main__":
    sys.exit(main())
