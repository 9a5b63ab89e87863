"""Load tests and benchmarks for msdnet-serve.

- :mod:`loadtest.openloop`: open-loop driver (fixed arrival rate, latency from
  each request's *scheduled* send time, so no coordinated omission).
- :mod:`loadtest.locustfile`: Locust scenarios (mixed /classify, deadlines, /batch).
- :mod:`loadtest.naive_server`: the baseline, whole network per request, no batching.
- :mod:`loadtest.bench`: ``python -m loadtest.bench --out docs`` (``make bench``) writes
  docs/BENCHMARKS.md: capacity against the peers (:mod:`loadtest.capacity`, peers in
  :mod:`loadtest.peers`), CPU by stage (:mod:`loadtest.stages`), stalls (:mod:`loadtest.stall`),
  the per-block engine (:mod:`loadtest.blocks`) and :mod:`loadtest.parts`; the Markdown
  :mod:`loadtest.report`, the plots :mod:`loadtest.plots`.
- :mod:`loadtest.harness`: the server-process harness (``free_port``, ``ServerProcess``)
  that the benchmarks and the tests (``tests/live.py``) share; it imports nothing from ``tests``.

Every load generator here refuses non-loopback targets and is bounded in request
count and time. FLOPs are multiply-accumulates of convs and linears as the MSDNet
paper counts them, cumulative per exit.
"""
