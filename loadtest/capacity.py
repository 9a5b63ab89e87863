"""``python3 -m loadtest.capacity``: the command line of :mod:`loadtest.parts.capacity` (part a of
``python -m loadtest.bench``, a tool of its own too); the code lives there."""

import sys

from .parts.capacity import main

if __name__ == "__main__":
    sys.exit(main())
