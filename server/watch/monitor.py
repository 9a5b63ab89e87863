"""The accuracy watch as the engine sees it: sampling, drift and feedback turned into metrics.

:class:`AccuracyWatch` is the scheduler's ``Auditor`` (through its
:class:`~server.watch.sampler.AuditSampler`) and the runner's ``StepWatch``
(``server.engine.audit``): the runner tells it each regular step's confidences,
each answer, each audit step and each finished audit, on a model thread. It
exports (``server.metrics``):

- drift: the confidence at each exit (a histogram), the calibration's thresholds
  and agreement for the target in force beside the live ones, and the curve's
  residual: how much more each answer cost than the calibration curve says the
  thresholds in force cost (``point_cost``), smoothed;
- agreement: per exit an audited image was answered at, whether that answer equals
  the last exit's, and what calibration expects of it (``msdnet_agreement_expected_total``);
- the audits' FLOPs (never charged to the budget controller);
- feedback: served and last-exit correctness per exit, from labels.

FLOPs are multiply-accumulates of convs and linears (MSDNet paper convention),
cumulative per exit. Plain Python: no torch, no HTTP.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..engine.scheduler import Finished, Outcome, Task
from .feedback import FeedbackStore, Labelled
from .reference import CalibratedReference, ExitReference
from .sampler import AuditSampler

if TYPE_CHECKING:
    from model.checkpoint import Calibration

    from ..metrics import Metrics

log = logging.getLogger("msdnet.watch")
ANSWERED = (Outcome.CONFIDENT, Outcome.LAST_EXIT, Outcome.DEADLINE)  # a /classify image with a class


class AccuracyWatch:
    """See the module docstring.

    Args:
        metrics: the server's metrics.
        exit_flops: cumulative FLOPs of each exit (K values).
        reference: the calibration's figures by target.
        sampler: which answered images are audited.
        store: recent answers, for labels.
        mean_confidence: the calibration's mean confidence per exit (None: not recorded).
        residual_halflife: answers after which an old one weighs half in the curve's residual.

    Attributes:
        point_cost: returns the validation mean FLOPs per image of the thresholds in force
            (``BudgetKeeper.point_cost``); None: no residual is exported.
    """

    def __init__(self, metrics: Metrics, exit_flops: list[float], reference: CalibratedReference,
                 sampler: AuditSampler, store: FeedbackStore, mean_confidence: tuple[float, ...] | None = None,
                 residual_halflife: float = 50.0):
        self.metrics, self.reference, self.sampler, self.store = metrics, reference, sampler, store
        self.point_cost: Callable[[], float] | None = None
        self._keep = 0.5 ** (1.0 / residual_halflife)
        self._residual = 0.0
        self._lock = threading.Lock()  # model threads answer concurrently
        self.exit_flops = [float(f) for f in exit_flops]
        k = len(self.exit_flops)
        self._histograms = [metrics.confidence.labels(exit=str(e)) for e in range(1, k + 1)]
        self._ref: ExitReference = reference.at(self.exit_flops[-1])
        self._ref_target: float | None = None
        for e, c in enumerate(mean_confidence or (), start=1):
            metrics.calibrated_confidence.labels(exit=str(e)).set(c)

    # ---- the scheduler's Auditor ------------------------------------------------------
    @property
    def open(self) -> bool:
        """Whether audits may be sampled and run now."""
        return self.sampler.open

    def wants(self, task: Task) -> bool:
        """Whether ``task``, leaving early, is audited (:meth:`AuditSampler.wants`)."""
        return self.sampler.wants(task)

    def dropped(self, task: Task) -> None:
        """A held audit was dropped unfinished."""
        self.sampler.dropped(task)

    # ---- the runner's StepWatch --------------------------------------------------------
    def confidences(self, block: int, confidences: list[float]) -> None:
        """A regular step's confidences at exit ``block + 1`` (NaN ones are skipped)."""
        h = self._histograms[block]
        for c in confidences:
            if c == c:
                h.observe(c)

    def answered(self, task: Task, result: Finished) -> None:
        """A ``/classify`` answer: credits the sampler and is kept for labels."""
        if not task.auditable or result.probs is None or result.outcome not in ANSWERED:
            return
        self.sampler.served(result.flops)
        if self.point_cost is not None and result.outcome is not Outcome.DEADLINE:  # the thresholds chose its exit
            with self._lock:
                self._residual = self._keep * self._residual + (1 - self._keep) * (result.flops - self.point_cost())
                self.metrics.curve_residual.set(self._residual)
        if task.key is not None:
            self.store.answered(task.key, result.exit, int(result.probs.argmax()), task.audit)

    def audit_step(self, block: int, n: int, seconds: float) -> None:
        """``n`` audited images ran ``block`` (0-based, >= 1): their FLOPs, apart."""
        self.metrics.audit_flops.inc(n * (self.exit_flops[block] - self.exit_flops[block - 1]))

    def audited(self, task: Task, served_exit: int, served_class: int, last_class: int | None) -> None:
        """An audit finished: agreement at ``served_exit`` (1-based), and the last
        exit's correctness when a label arrived first. A non-finite last exit counts nothing."""
        if last_class is None:
            return
        e = str(served_exit)
        self.metrics.agreement.labels(exit=e, agree="true" if served_class == last_class else "false").inc()
        self.metrics.agreement_expected.labels(exit=e).inc(self._ref.agreement[served_exit - 1])
        if task.key is not None:
            label = self.store.audited(task.key, served_exit, served_class, last_class)
            if label is not None:
                self._count_last(served_exit, last_class == label)

    # ---- budget and feedback -----------------------------------------------------------
    def set_target(self, target_flops: float, thresholds_for: Callable[[float], tuple[float, ...]]) -> None:
        """The target in force is ``target_flops`` (FLOPs per request); ``thresholds_for``
        gives the curve's thresholds for a target. Exports the calibration's figures
        there (only when the target changed: this runs after every request)."""
        if target_flops == self._ref_target:
            return
        self._ref_target = target_flops
        thresholds = thresholds_for(target_flops)
        ref = self._ref = self.reference.at(target_flops)
        m = self.metrics
        for e, (th, agree, top1, last) in enumerate(zip(thresholds, ref.agreement, ref.top1, ref.last_top1),
                                                    start=1):
            m.calibrated_threshold.labels(exit=str(e)).set(th if math.isfinite(th) else math.inf)
            m.calibrated_agreement.labels(exit=str(e)).set(agree)
            for at, value in (("served", top1), ("last", last)):
                if value is not None:
                    m.calibrated_accuracy.labels(exit=str(e), at=at).set(value)

    def feedback(self, key: str, label: int) -> Labelled:
        """Score the answer of request ``key`` against the true class ``label``.

        Raises:
            errors.UnknownRequest: (404) no answer of that id is held.
            errors.AlreadyLabelled: (409) it was labelled already.
        """
        out = self.store.label(key, label)
        self.metrics.feedback.labels(exit=str(out.exit), served="correct" if out.served_class == label
                                     else "wrong").inc()
        if out.last_class is not None:
            self._count_last(out.exit, out.last_class == label)
        return out

    def _count_last(self, exit_k: int, correct: bool) -> None:
        self.metrics.feedback_last.labels(exit=str(exit_k), last="correct" if correct else "wrong").inc()


def build_watch(metrics: Metrics, exit_flops: list[float], calibration: Calibration, last_top1: float | None, *,
                share: float, max_flops_share: float, store_size: int,
                residual_halflife: float = 50.0) -> AccuracyWatch:
    """The watch for a checkpoint's ``calibration`` (``last_top1``: validation top-1 at the
    last exit from its model card, None if unrecorded) and the settings' ``share`` of
    images audited, ``max_flops_share`` of served FLOPs they may cost, ``store_size``
    answers kept for labels and the curve residual's ``residual_halflife`` (answers).
    Logs once when the calibration predates the per-exit figures."""
    reference = CalibratedReference(list(calibration.curve), len(exit_flops), last_top1)
    if not reference.has_figures:
        log.warning("the checkpoint's calibration has no per-exit agreement figures: the agreement expected is "
                    "its lower bound top1(served) + top1(last exit) - 1; run 'msdnet calibrate --figures-only' "
                    "to store them")
    sampler = AuditSampler(share, exit_flops, max_flops_share,
                           on_skip=lambda reason: metrics.audit_skipped.labels(reason=reason).inc())
    return AccuracyWatch(metrics, exit_flops, reference, sampler, FeedbackStore(store_size),
                         calibration.mean_confidence, residual_halflife)
