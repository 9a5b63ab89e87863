"""``python3 -m loadtest.stages``: the command line of :mod:`loadtest.parts.stages` (part s of
``python -m loadtest.bench``, a tool of its own too); the code lives there."""

import sys

from .parts.stages import main

if __name__ == "__main__":
    sys.exit(main())
