"""Prometheus metrics, all defined here (prometheus-client).

Names are ``msdnet_<what>_<unit>`` in base units: seconds, FLOPs (multiply-
accumulates of convs and linears, as the MSDNet paper counts them); counters end
in ``_total``. Labels have few values: ``exit`` and ``block`` are 1..K, ``endpoint``
is a route path, ``status`` an HTTP code, ``reason`` one of :data:`REJECT_REASONS`.

Each :class:`Metrics` owns its registry, so tests and several apps in one process
do not collide. One server process serves one model thread; several uvicorn
workers are refused (see ``server.settings``), so multiprocess mode is not needed.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

REJECT_REASONS = ("queue_full", "deadline", "bad_request", "unsupported_media", "too_large",
                  "invalid_parameter", "budget_too_small", "timeout", "non_finite_output")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """All of the server's metrics on one registry.

    Args:
        num_exits: K, the model's exits (labels ``exit``/``block`` = "1".."K").
        exit_flops: cumulative FLOPs per exit, for the per-request histogram buckets.
    """

    def __init__(self, num_exits: int, exit_flops: list[int]):
        self.registry = r = CollectorRegistry()
        self.exits = Counter("msdnet_exits_total", "Requests (images) answered at each exit.", ["exit"], registry=r)
        self.requests = Counter("msdnet_requests_total", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("msdnet_request_duration_seconds", "Request latency in seconds, by endpoint.",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.flops = Counter("msdnet_flops_total", "FLOPs spent on images (multiply-accumulates).",
                             ["endpoint"], registry=r)
        buckets = sorted({float(f) for f in exit_flops})
        self.request_flops = Histogram("msdnet_request_flops", "FLOPs spent per /classify request "
                                       "(multiply-accumulates); buckets at each exit's cumulative cost.",
                                       buckets=buckets, registry=r)
        self.target = Gauge("msdnet_target_flops_per_request", "Budget controller's target mean FLOPs "
                            "per /classify request.", registry=r)
        self.realised = Gauge("msdnet_realised_flops_per_request", "Mean FLOPs per /classify request over "
                              "the controller's last window (1,000 requests).", registry=r)
        self.fleet_realised = Gauge("msdnet_fleet_flops_per_request", "Fleet-wide mean FLOPs per /classify "
                                    "request as this replica sees it (equals the local mean in local mode).",
                                    registry=r)
        self.fleet_mode = Gauge("msdnet_fleet_mode", "1 while steering on the fleet-wide mean through Redis, "
                                "0 in local mode.", registry=r)
        self.threshold = Gauge("msdnet_exit_threshold", "Current confidence threshold of each exit.", ["exit"],
                               registry=r)
        self.queue_depth = Gauge("msdnet_queue_depth", "Images waiting at each block.", ["block"], registry=r)
        self.batch_size = Histogram("msdnet_batch_size", "Images per block step.", ["block"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.deadline_requests = Counter("msdnet_deadline_requests_total", "Requests that carried a deadline.",
                                         registry=r)
        self.deadline_misses = Counter("msdnet_deadline_misses_total", "Requests answered after their deadline "
                                       "or refused with 504.", registry=r)
        self.rejected = Counter("msdnet_rejected_requests_total", "Requests refused, by reason.", ["reason"],
                                registry=r)
        self.model = Info("msdnet_model", "The served model.", registry=r)
        for k in range(1, num_exits + 1):
            self.exits.labels(exit=str(k))
            self.queue_depth.labels(block=str(k)).set(0)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)
