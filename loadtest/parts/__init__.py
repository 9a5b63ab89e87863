"""The parts of ``python -m loadtest.bench``, one module each:

- :mod:`.offline`: test-split accuracy per exit, in-process (the reference);
- :mod:`.throughput` (a): capacity at a p99 SLO and served accuracy of three servers;
- :mod:`.controller` (b): the budget controller's realised vs target FLOPs;
- :mod:`.deadlines` (c): deadlines met at shares of capacity;
- :mod:`.efficiency` (d): attained multiply-accumulates per second per block.

FLOPs = multiply-accumulates of convs and linears (MSDNet paper), cumulative per exit.
"""
