"""``python3 -m loadtest.blocks``: the command line of :mod:`loadtest.parts.blocks` (part d of
``python -m loadtest.bench``, a tool of its own too); the code lives there."""

import sys

from .parts.blocks import main

if __name__ == "__main__":
    sys.exit(main())
