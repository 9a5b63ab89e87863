"""The parts of ``python -m loadtest.bench`` that are not tools of their own
(part a is :mod:`loadtest.capacity`, s :mod:`loadtest.stages`, f
:mod:`loadtest.stall`, d :mod:`loadtest.blocks`), one module each:

- :mod:`.offline`: test-split accuracy per exit, in-process (the reference);
- :mod:`.deadlines` (c): deadlines met at shares of capacity;
- :mod:`.controller` (b): the budget controller's realised vs target FLOPs;
- :mod:`.accuracy` (e): the controller's accuracy against fixed thresholds at the same mean FLOPs.

FLOPs = multiply-accumulates of convs and linears (MSDNet paper), cumulative per exit.
"""
