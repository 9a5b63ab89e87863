"""The parts of ``python -m loadtest.bench``, one module each (issue 12's goals):

- :mod:`.capacity` (a): capacity against LitServe and Ray Serve (the search:
  :mod:`loadtest.search`; the tables: :mod:`loadtest.capacityreport`);
- :mod:`.stages` (s): CPU per request by stage, from a py-spy profile;
- :mod:`.deadlines` (c): deadlines met at shares of capacity;
- :mod:`.controller` (b): the budget controller's realised vs target FLOPs;
- :mod:`.accuracy` (e): the controller's accuracy against fixed thresholds at the same mean FLOPs;
- :mod:`.stall` (f): ``/healthz`` and ``/classify`` latency under floods;
- :mod:`.blocks` (d): the per-block engine against the whole network;
- :mod:`.offline`: test-split accuracy per exit, in-process (the reference).

One :class:`loadtest.common.Plan` sizes them all. Parts a, s, f and d are tools of
their own too: ``python3 -m loadtest.capacity`` (``.stages``, ``.stall``,
``.blocks``) runs the part's ``main``; part c alone: ``python3 -m loadtest.parts.deadlines``.

FLOPs = multiply-accumulates of convs and linears (MSDNet paper), cumulative per exit.
"""
