"""The accuracy watch: what early exit costs in accuracy while serving (issue 24).

- ``sampler.py``: which answered ``/classify`` images are carried on to the last
  exit (a share, paused with the latency objective, a FLOPs cap).
- ``reference.py``: the calibration's figures for the target in force.
- ``feedback.py``: a bounded store of recent answers for labels that arrive later.
- ``monitor.py``: :class:`~server.watch.monitor.AccuracyWatch`, what the engine
  tells (confidences, answers, audits) turned into metrics.

Plain Python: no torch, no HTTP.
"""
