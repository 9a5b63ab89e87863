"""``python3 -m loadtest.accuracywatch``: the command line of :mod:`loadtest.parts.accuracywatch` (issue 24's
benchmark part: the accuracy watch on shifted images); the code lives there."""

import sys

from .parts.accuracywatch import main

if __name__ == "__main__":
    sys.exit(main())
