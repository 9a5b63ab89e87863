"""``python3 -m loadtest.overload``: the command line of :mod:`loadtest.parts.overload` (issue 25's
benchmark part: the latency objective under step, burst and steady overload); the code lives there."""

import sys

from .parts.overload import main

if __name__ == "__main__":
    sys.exit(main())
