"""Load tests and benchmarks for msdnet-serve.

- :mod:`loadtest.openloop`: open-loop driver (fixed arrival rate, latency from
  each request's *scheduled* send time, so no coordinated omission).
- :mod:`loadtest.locustfile`: Locust scenarios (mixed /classify, deadlines, /batch).
- :mod:`loadtest.naive_server`: the baseline, whole network per request, no batching.
- :mod:`loadtest.bench`: ``python -m loadtest.bench --out docs`` (``make bench``) writes
  docs/BENCHMARKS.md from its parts, all in :mod:`loadtest.parts` (capacity against the
  peers, peers in :mod:`loadtest.peers`; CPU by stage; deadlines; the controller; stalls;
  the per-block engine), sized by one :class:`loadtest.common.Plan`; the capacity search
  :mod:`loadtest.search`, the servers :mod:`loadtest.servers`; the Markdown
  :mod:`loadtest.report` (section 1: :mod:`loadtest.capacityreport`), the plots
  :mod:`loadtest.plots`. ``python3 -m loadtest.capacity`` (``stages``, ``stall``,
  ``blocks``) runs one part alone.
- :mod:`loadtest.harness`: the server-process harness (``free_port``, ``ServerProcess``)
  that the benchmarks and the tests (``tests/live.py``) share; it imports nothing from ``tests``.

Every load generator here refuses non-loopback targets and is bounded in request
count and time. FLOPs are multiply-accumulates of convs and linears as the MSDNet
paper counts them, cumulative per exit.
"""
