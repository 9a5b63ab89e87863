"""Prometheus metrics, all defined here (prometheus-client).

Names are ``msdnet_<what>_<unit>`` in base units: seconds, FLOPs (multiply-
accumulates of convs and linears, as the MSDNet paper counts them); counters end
in ``_total``. Labels have few values: ``exit`` and ``block`` are 1..K, ``endpoint``
is a route path, ``status`` an HTTP code, ``reason`` one of :data:`REJECT_REASONS`
(or, for audits, :data:`server.watch.sampler.SKIP_REASONS`); ``agree``, ``served``
and ``last`` two values each.

Each :class:`Metrics` owns its registry, so tests and several apps in one process
do not collide. With ``msdnet serve --workers N`` (N HTTP worker processes and
one engine process) every process writes its values to prometheus-client's
multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``, made fresh by the CLI) and
a scrape of any worker reads all of them (:meth:`Metrics.exposition`): HTTP
counts come from the workers, exits, FLOPs, thresholds and queues from the
engine, and every scrape shows the whole replica. Gauges are written by the
engine only (``mostrecent``).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

MODEL_INFO_LABELS = ("checkpoint", "num_exits", "classes", "image_size", "exit_flops")
REJECT_REASONS = ("queue_full", "deadline", "bad_request", "unsupported_media", "too_large",
                  "invalid_parameter", "budget_too_small", "timeout", "non_finite_output", "objective")
OBJECTIVE_STATES = ("steady", "degraded", "refusing")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONFIDENCE_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999)
AUDIT_SKIP_REASONS = ("objective", "flops_cap", "dropped")  # server.watch.sampler.SKIP_REASONS


class Metrics:
    """All of the server's metrics on one registry.

    Args:
        num_exits: K, the model's exits (labels ``exit``/``block`` = "1".."K").
        exit_flops: cumulative FLOPs per exit, for the per-request histogram buckets.
    """

    def __init__(self, num_exits: int, exit_flops: list[int]):
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
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
                            "per /classify request.", registry=r, multiprocess_mode="mostrecent")
        self.realised = Gauge("msdnet_realised_flops_per_request", "Mean FLOPs per /classify request over "
                              "the controller's last window (1,000 requests).", registry=r,
                              multiprocess_mode="mostrecent")
        self.fleet_realised = Gauge("msdnet_fleet_flops_per_request", "Fleet-wide mean FLOPs per /classify "
                                    "request as this replica sees it (equals the local mean in local mode).",
                                    registry=r, multiprocess_mode="mostrecent")
        self.fleet_mode = Gauge("msdnet_fleet_mode", "1 while steering on the fleet-wide mean through Redis, "
                                "0 in local mode.", registry=r, multiprocess_mode="mostrecent")
        self.threshold = Gauge("msdnet_exit_threshold", "Current confidence threshold of each exit.", ["exit"],
                               registry=r, multiprocess_mode="mostrecent")
        self.queue_depth = Gauge("msdnet_queue_depth", "Images waiting at each block.", ["block"], registry=r,
                                 multiprocess_mode="mostrecent")
        self.batch_size = Histogram("msdnet_batch_size", "Images per block step.", ["block"],
                                    buckets=BATCH_BUCKETS, registry=r)
        # The latency objective (server.budget.objective); written by the engine.
        self.objective = Gauge("msdnet_latency_objective_seconds", "The latency objective (MSDNET_LATENCY_SLO_MS); "
                               "0 when none is set.", registry=r, multiprocess_mode="mostrecent")
        self.in_force = Gauge("msdnet_target_in_force_flops_per_request", "Target mean FLOPs per /classify request "
                              "in force: the configured one, or lower while the latency objective degrades.",
                              registry=r, multiprocess_mode="mostrecent")
        self.objective_state = Gauge("msdnet_objective_state", "1 for the latency objective's state now: steady "
                                     "(target in force = configured), degraded, refusing.", ["state"], registry=r,
                                     multiprocess_mode="mostrecent")
        self.degraded_seconds = Counter("msdnet_degraded_seconds_total", "Time with the target in force below the "
                                        "configured one (seconds).", registry=r)
        self.degraded_answers = Counter("msdnet_degraded_answers_total", "/classify images answered while the "
                                        "target in force was below the configured one.", registry=r)
        self.forecast_wait = Gauge("msdnet_forecast_wait_seconds", "Forecast queueing delay of a request arriving "
                                   "now (the engine's queued work over its model threads).", registry=r,
                                   multiprocess_mode="mostrecent")
        self.busy = Gauge("msdnet_engine_busy_ratio", "Share of the model threads' time spent in block steps "
                          "(smoothed).", registry=r, multiprocess_mode="mostrecent")
        self.client_gone = Counter("msdnet_client_gone_requests_total", "Requests cancelled in the engine because "
                                   "their client closed the connection before the answer.", registry=r)
        self.cancelled = Counter("msdnet_cancelled_images_total", "Images dropped before their next block because "
                                 "their client closed the connection.", registry=r)
        self.deadline_requests = Counter("msdnet_deadline_requests_total", "Requests that carried a deadline.",
                                         registry=r)
        self.deadline_misses = Counter("msdnet_deadline_misses_total", "Requests answered after their deadline "
                                       "or refused with 504.", registry=r)
        self.rejected = Counter("msdnet_rejected_requests_total", "Requests refused, by reason.", ["reason"],
                                registry=r)
        self._watch_metrics(num_exits)
        # A gauge, not an Info (Info does not work in multiprocess mode); the same exposition line.
        self.model = Gauge("msdnet_model_info", "The served model (value 1; the labels describe it).",
                           MODEL_INFO_LABELS, registry=r, multiprocess_mode="max")
        for k in range(1, num_exits + 1):
            self.exits.labels(exit=str(k))
            if not self.multiprocess:  # in multiprocess mode only the engine writes gauges
                self.queue_depth.labels(block=str(k)).set(0)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)

    def _watch_metrics(self, num_exits: int) -> None:
        """The accuracy watch's (``server.watch``): drift, agreement with the last exit, feedback."""
        r, last = self.registry, dict(multiprocess_mode="mostrecent")
        self.confidence = Histogram("msdnet_exit_confidence", "Temperature-scaled confidence (max softmax, unitless) "
                                    "of each image at each exit it is evaluated at (requests' steps only).", ["exit"],
                                    buckets=CONFIDENCE_BUCKETS, registry=r)
        self.calibrated_confidence = Gauge("msdnet_calibrated_mean_confidence", "Mean confidence of the calibration "
                                           "images at each exit (every image evaluated there).", ["exit"],
                                           registry=r, **last)
        self.calibrated_threshold = Gauge("msdnet_calibrated_threshold", "The calibration curve's confidence "
                                          "threshold of each exit for the target in force (what "
                                          "msdnet_exit_threshold would be on calibration-like images).", ["exit"],
                                          registry=r, **last)
        self.curve_residual = Gauge("msdnet_curve_residual_flops_per_request", "Mean FLOPs per /classify answer "
                                    "spent above what the calibration curve says the thresholds in force cost "
                                    "(their validation mean), smoothed over ~50 answers: 0 on calibration-like "
                                    "images; the controller then holds the target with thresholds calibrated for "
                                    "another budget.", registry=r, **last)
        self.agreement = Counter("msdnet_agreement_total", "Audited /classify images (answered before the last "
                                 "exit, carried on to it afterwards) by the exit they were answered at and whether "
                                 "that answer equals the last exit's.", ["exit", "agree"], registry=r)
        self.agreement_expected = Counter("msdnet_agreement_expected_total", "Audited images weighted by the "
                                          "calibration's agreement at the exit each was answered at (what "
                                          "msdnet_agreement_total{agree=\"true\"} counts on calibration-like "
                                          "images).", ["exit"], registry=r)
        self.calibrated_agreement = Gauge("msdnet_calibrated_agreement_ratio", "Calibration's agreement of the "
                                          "answer with the last exit's among the images leaving at each exit, at "
                                          "the target in force.", ["exit"], registry=r, **last)
        self.audit_flops = Counter("msdnet_audit_flops_total", "FLOPs spent carrying audited images on to the last "
                                   "exit (multiply-accumulates); never charged to the budget controller.", registry=r)
        self.audit_skipped = Counter("msdnet_audit_skipped_total", "Sampled images not audited, by reason: the "
                                     "latency objective was not steady, the audit FLOPs cap, or dropped unfinished "
                                     "(audit queues full).", ["reason"], registry=r)
        self.feedback = Counter("msdnet_feedback_total", "Labels received (POST /feedback) by the exit answered at "
                                "and whether the served class was correct.", ["exit", "served"], registry=r)
        self.feedback_last = Counter("msdnet_feedback_last_exit_total", "Labels of audited answers by the exit "
                                     "answered at and whether the last exit's class was correct.", ["exit", "last"],
                                     registry=r)
        self.calibrated_accuracy = Gauge("msdnet_calibrated_accuracy_ratio", "Calibration's top-1 among the images "
                                         "leaving at each exit, of the class served there (at=served) and at the "
                                         "last exit (at=last), at the target in force.", ["exit", "at"], registry=r,
                                         **last)
        for k in range(1, num_exits + 1):
            e = str(k)
            self.confidence.labels(exit=e)
            for ok in ("correct", "wrong"):
                self.feedback.labels(exit=e, served=ok)
            if k < num_exits:
                self.agreement_expected.labels(exit=e)
                for ok in ("correct", "wrong"):
                    self.feedback_last.labels(exit=e, last=ok)
                for agree in ("true", "false"):
                    self.agreement.labels(exit=e, agree=agree)
        for reason in AUDIT_SKIP_REASONS:
            self.audit_skipped.labels(reason=reason)

    def exposition(self) -> bytes:
        """The text a scrape gets: this registry, or, in multiprocess mode, every
        process's values merged (prometheus-client's ``MultiProcessCollector``)."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)

    def set_model_info(self, **labels: str) -> None:
        """``msdnet_model_info{...} 1`` with the :data:`MODEL_INFO_LABELS` given."""
        self.model.labels(**{k: labels[k] for k in MODEL_INFO_LABELS}).set(1)
