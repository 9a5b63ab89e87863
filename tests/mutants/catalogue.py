"""The mutant list: (id, file, exact old snippet, new snippet, tests, description).

Each old snippet must occur exactly once in its file (the runner refuses the
whole list otherwise, so it cannot rot silently after an edit). Tests are pytest
paths or node ids: the smallest set that should kill the mutant.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


SCHED = ("tests/test_scheduler.py", "tests/test_scheduler_values.py")
CTRL = ("tests/test_controller.py", "tests/test_controller_terms.py")
CAL = ("tests/test_calibration.py", "tests/test_calibration_values.py")
IMG = ("tests/test_images.py", "tests/test_images_values.py")
FLEET = ("tests/test_fleet_exchange.py",)
B = "tests/test_server_behaviour.py::"
WORK = (B + "test_an_exit_runs_exactly_its_blocks_with_lazy_evaluation",)
METRICS = (B + "test_metrics_hold_the_answers_exits_and_costs",)
QUEUE = (B + "test_batch_metrics_queue_depths_and_batch_sizes",)
LATE = (B + "test_deadline_met_is_false_when_the_answer_comes_late",)
ARRIVAL = (B + "test_the_deadline_counts_from_the_requests_arrival",)
V2 = ("tests/test_v2.py::test_encoded_images_match_classify",)
R = "tests/test_robustness.py::"
G = "tests/test_mutant_guards.py::"

MUTANTS = [
    # ---- scheduler ------------------------------------------------------------
    Mutant("sched-delay", "server/engine/scheduler.py", "return now - q[0].arrival >= self.block1_wait()",
           "return now - q[0].arrival > self.block1_wait()", SCHED,
           "block 1 waits one tick past its queue delay"),
    Mutant("sched-wait-always", "server/engine/scheduler.py",
           "if not self.adaptive_wait or self.arrivals.per_second * self.max_queue_delay_s >= 1.0:",
           "if True:", SCHED, "block 1 waits its full delay even when no other image is due"),
    Mutant("decode-large-not-isolated", "server/http/decoding.py", "    if not is_large(data):\n", "    if True:\n",
           ("tests/test_decoding.py",), "large images decode in the HTTP process at full priority"),
    Mutant("sched-fairness", "server/engine/scheduler.py", "if 0 in ready and self._last_block != 0:", "if 0 in ready:",
           SCHED, "block 1 always jumps the queue (deeper blocks starve)"),
    Mutant("sched-last-exit", "server/engine/scheduler.py", "if task.exits_done == self.num_blocks:",
           "if task.exits_done == self.num_blocks - 1:", SCHED, "last exit off by one"),
    Mutant("sched-inflight", "server/engine/scheduler.py",
           "        self.in_flight -= len(finished)\n        return block, kept, finished",
           "        return block, kept, finished", SCHED, "images that leave before a step stay counted in flight"),
    Mutant("sched-threshold-strict", "server/engine/scheduler.py",
           "return confidence >= self._thresholds()[task.exits_done - 1]",
           "return confidence > self._thresholds()[task.exits_done - 1]", SCHED,
           "a confidence equal to the threshold does not leave"),
    Mutant("sched-budget-strict", "server/engine/scheduler.py", "if self.committed + step > self.budget:",
           "if self.committed + step >= self.budget:", SCHED, "a budget that exactly pays a block refuses it"),
    Mutant("sched-retry", "server/engine/scheduler.py",
           "retry = max(1.0, per_image * self.in_flight / max(self.max_batch_size, 1))",
           "retry = max(1.0, per_image / max(self.max_batch_size, 1))", SCHED,
           "Retry-After estimate ignores the images in flight"),
    Mutant("sched-safety", "server/engine/scheduler.py", "return self.safety * max(intercept + slope * batch, 0.0)",
           "return max(intercept + slope * batch, 0.0)", SCHED, "fitted latency drops the safety factor"),
    Mutant("sched-deadline-estimate", "server/engine/scheduler.py",
           "if task.deadline is not None and now + estimate > task.deadline:",
           "if task.deadline is not None and now > task.deadline:", SCHED,
           "deadline check ignores the step's estimated time"),
    # ---- runner ---------------------------------------------------------------
    Mutant("runner-extra-block", "server/engine/runner.py",
           "        logits, new_state = self.backend.advance(state)\n",
           "        logits, new_state = self.backend.advance(state)\n        if block + 1 < self.num_exits:\n"
           "            self.backend.advance(new_state)  # runs the next block and discards it\n",
           WORK, "runner also runs the next block after each step and discards it"),
    Mutant("runner-pins-finished", "server/engine/runner.py",
           "            loop.call_soon_threadsafe(_set_results, answers)\n",
           "            loop.call_soon_threadsafe(_set_results, answers)\n        self._kept = finished\n",
           ("tests/test_memory.py",),
           "the model thread keeps the last step's finished tasks (and their futures) alive"),
    Mutant("runner-lazy-off", "server/engine/runner.py", "return self.model.start(x, lazy=True)",
           "return self.model.start(x, lazy=False)", WORK, "runner starts blocks with lazy evaluation off"),
    Mutant("runner-temperature-1", "server/engine/runner.py",
           "logits.numpy().astype(np.float64) / self.temperatures[block]",
           "logits.numpy().astype(np.float64) / self.temperatures[0]", WORK, "every exit uses exit 1's temperature"),
    Mutant("runner-full-costs", "server/engine/runner.py", "self.exit_flops = checkpoint.exit_flops(lazy=True)",
           "self.exit_flops = checkpoint.exit_flops(lazy=False)", WORK,
           "answers report full (non-lazy) costs"),
    Mutant("v2-shared-no-temperature", "server/engine/runner.py",
           "logits.numpy().astype(np.float64) / self.temperatures[block]",
           "logits.numpy().astype(np.float64)", V2, "v2 fault shared with /classify: no temperature scaling"),
    # ---- service and metrics ----------------------------------------------------
    Mutant("metric-flops-exit1", "server/service.py",
           'self.metrics.flops.labels(endpoint="/classify").inc(flops)',
           'self.metrics.flops.labels(endpoint="/classify").inc(self.exit_flops[0])', METRICS,
           "msdnet_flops_total counts exit 1's cost for every request"),
    Mutant("metric-request-flops-last", "server/service.py", "self.metrics.request_flops.observe(flops)",
           "self.metrics.request_flops.observe(self.exit_flops[-1])", METRICS,
           "msdnet_request_flops records the last exit's cost"),
    Mutant("metric-exit-label-plus1", "server/service.py",
           '        self.metrics.exits.labels(exit=str(task.exits_done)).inc()\n'
           '        self.metrics.flops.labels(endpoint="/classify")',
           '        self.metrics.exits.labels(exit=str(task.exits_done + 1)).inc()\n'
           '        self.metrics.flops.labels(endpoint="/classify")', METRICS, "exit label off by one"),
    Mutant("metric-exit-label-1", "server/service.py",
           '        self.metrics.exits.labels(exit=str(task.exits_done)).inc()\n'
           '        self.metrics.flops.labels(endpoint="/classify")',
           '        self.metrics.exits.labels(exit="1").inc()\n'
           '        self.metrics.flops.labels(endpoint="/classify")', METRICS, "every request counted at exit 1"),
    Mutant("metric-batch-size-label", "server/service.py",
           "self.metrics.batch_size.labels(block=str(block + 1)).observe(n)",
           "self.metrics.batch_size.labels(block=str(block)).observe(n)", METRICS, "batch_size block label off by one"),
    Mutant("metric-batch-size-value", "server/service.py",
           "self.metrics.batch_size.labels(block=str(block + 1)).observe(n)",
           "self.metrics.batch_size.labels(block=str(block + 1)).observe(1)",
           (B + "test_batch_size_metric_counts_images_per_step",), "batch_size records 1 whatever the batch"),
    Mutant("metric-queue-depth-label", "server/service.py", "for b, d in enumerate(depths, start=1):",
           "for b, d in enumerate(depths, start=0):", QUEUE, "queue_depth block label off by one"),
    Mutant("metric-queue-depth-value", "server/service.py",
           "self.metrics.queue_depth.labels(block=str(b)).set(d)",
           "self.metrics.queue_depth.labels(block=str(b)).set(depths[0])", QUEUE,
           "queue_depth reports block 1's depth for every block"),
    Mutant("metric-batch-flops", "server/service.py",
           'self.metrics.flops.labels(endpoint="/batch").inc(self.exit_flops[task.exits_done - 1])',
           'self.metrics.flops.labels(endpoint="/batch").inc(self.exit_flops[0])', QUEUE,
           "/batch FLOPs counted at exit 1's cost"),
    Mutant("deadline-met-true", "server/http/responses.py",
           '"deadline_met": None if deadline_ms is None else latency_ms <= deadline_ms,',
           '"deadline_met": None if deadline_ms is None else True,', LATE, "/classify deadline_met always true"),
    Mutant("deadline-miss-uncounted", "server/service.py",
           "late = (time.monotonic() - started) * 1e3 > deadline_ms", "late = False", LATE,
           "late answers not counted as deadline misses"),
    Mutant("deadline-from-work-start", "server/service.py",
           "deadline = None if deadline_ms is None else started + deadline_ms / 1e3",
           "deadline = None if deadline_ms is None else time.monotonic() + deadline_ms / 1e3", ARRIVAL,
           "deadline counted from when the work is submitted, not the request's arrival"),
    Mutant("deadline-from-after-decode", "server/http/routes.py",
           "(f,) = await service.classify([await decode_off_loop(service, data)], deadline, started)",
           "(f,) = await service.classify([await decode_off_loop(service, data)], deadline, time.monotonic())",
           ARRIVAL + (G + "test_slow_decoding_counts_against_the_deadline",),
           "/classify deadline counted from after decoding"),
    Mutant("batch-uses-command", "server/service.py", "point = self.keeper.point_for(budget / n)",
           "point = self.keeper.point_for(self.keeper.controller.command)",
           (B + "test_batch_uses_its_own_budget_not_the_controllers_command",),
           "/batch takes the controller's command instead of its own budget per image"),
    Mutant("retry-after-constant", "server/service.py",
           'headers={"Retry-After": str(math.ceil(exc.retry_after_s))}', 'headers={"Retry-After": "1"}',
           (B + "test_queue_full_answers_503_with_the_schedulers_retry_after",),
           "Retry-After ignores the scheduler's estimate"),
    # ---- controller -------------------------------------------------------------
    Mutant("ctrl-no-bias", "server/budget/controller.py", "b = self.target - bias - deficit / self.horizon",
           "b = self.target - deficit / self.horizon", CTRL, "controller drops its bias term"),
    Mutant("ctrl-no-deficit-reset", "server/budget/controller.py",
           "        self.target = float(target)\n        self.deficit = 0.0\n",
           "        self.target = float(target)\n", CTRL + (B + "test_put_budget_restarts_the_deficit",),
           "PUT /budget (set_target) does not reset the running deficit"),
    Mutant("ctrl-no-clamp", "server/budget/controller.py",
           "self.deficit = max(-limit - others, min(limit - others, self.deficit))",
           "self.deficit = self.deficit", CTRL, "deficit clamp removed"),
    Mutant("ctrl-clamp-local", "server/budget/controller.py",
           "self.deficit = max(-limit - others, min(limit - others, self.deficit))",
           "self.deficit = max(-limit, min(limit, self.deficit))", CTRL,
           "fleet mode: the clamp ignores the other replicas' deficit"),
    Mutant("ctrl-bias-vs-target", "server/budget/controller.py", "b = self.command if commanded is None else commanded",
           "b = self.target if commanded is None else commanded", CTRL,
           "bias measured against the target instead of the command in force"),
    Mutant("ctrl-bisect-left", "model/curve.py", "i = bisect.bisect_right([p.mean_flops for p in curve], flops) - 1",
           "i = bisect.bisect_left([p.mean_flops for p in curve], flops) - 1", CTRL,
           "a budget equal to a point's cost skips it"),
    Mutant("ctrl-fleet-bias-weight", "server/budget/controller.py",
           "bias = (self.bias * self.own_rate + self.fleet.bias_rate) / total_rate",
           "bias = (self.bias + self.fleet.bias_rate) / total_rate", CTRL,
           "fleet bias not weighted by this replica's request rate"),
    # ---- fleet ------------------------------------------------------------------
    Mutant("fleet-bias-unweighted", "server/budget/fleet.py", 'bias_rate += float(row["bias"]) * float(row["rate"])',
           'bias_rate += float(row["bias"])', FLEET, "others' biases not weighted by their request rates"),
    Mutant("fleet-counts-self", "server/budget/fleet.py", "others = sorted(m for m in members if m != self.id)",
           "others = sorted(members)", FLEET, "a replica counts itself among the others"),
    Mutant("fleet-never-stale", "server/budget/fleet.py",
           'if not row or now - float(row.get("ts", 0)) > self.stale_after:', "if not row:", FLEET,
           "silent replicas never leave the fleet"),
    Mutant("fleet-target-echo", "server/budget/fleet.py", "                self.keeper.set_target(float(target))\n",
           "                self.keeper.set_target(float(target))\n"
           "                self.publish_target(float(target))\n", FLEET, "an adopted fleet target is published back"),
    Mutant("fleet-mean-count", "server/budget/fleet.py", 'total_n += float(row["window_n"])', "total_n += 0.0", FLEET,
           "fleet mean divides by this replica's count only"),
    Mutant("fleet-record", "server/budget/fleet.py", "        self._requests += 1\n", "        pass\n", FLEET,
           "requests not counted for the published rate"),
    # ---- calibration ------------------------------------------------------------
    Mutant("cal-no-temperature", "model/calibration.py", "probs = torch.softmax(logits.double() / t, dim=2)",
           "probs = torch.softmax(logits.double(), dim=2)", CAL, "calibration confidences skip the temperature"),
    Mutant("cal-last-exit", "model/calibration.py", "    passed[k_all - 1] = True\n", "", CAL,
           "the last exit does not take the samples left"),
    # The tie rule changed in the renovation (solve_for_budget is point_for on the Pareto front): equal
    # accuracy now goes to the cheaper point; the mutant restores the old rule (the dearer one).
    Mutant("cal-solve-tie", "model/calibration.py", "    return point_for(front, target_flops)\n",
           "    return max((o for o in curve if o.mean_flops <= target_flops),\n"
           "               key=lambda o: (o.top1 or 0.0, o.mean_flops))\n", CAL,
           "accuracy ties go to the dearer point (the rule: the cheaper)"),
    Mutant("cal-solve-strict", "model/calibration.py", "if target_flops < front[0].mean_flops:",
           "if target_flops <= front[0].mean_flops:", CAL,
           "a point costing exactly the budget is infeasible (the cheapest point)"),
    Mutant("cal-pareto-ties", "model/curve.py", "if not out or (o.top1 or 0.0) > (out[-1].top1 or 0.0):",
           "if not out or (o.top1 or 0.0) >= (out[-1].top1 or 0.0):", CAL,
           "Pareto front keeps dearer points of equal accuracy"),
    Mutant("cal-tie-rule", "model/calibration.py",
           "theta = float(value) if abs(n_at - want) <= abs(n_above - want) else float(above)",
           "theta = float(value) if abs(n_at - want) < abs(n_above - want) else float(above)", CAL,
           "threshold ties go above the value"),
    # ---- images -----------------------------------------------------------------
    Mutant("img-hw-swap", "model/transforms.py", "a[None] if a.ndim == 2 else a.transpose(2, 0, 1)",
           "a[None] if a.ndim == 2 else a.transpose(2, 1, 0)", IMG,
           "3-channel images have height and width swapped"),
    Mutant("img-i-unclipped", "server/images.py", "a = np.clip(raw.astype(np.float64), 0, 65535) / 257.0",
           "a = raw.astype(np.float64) / 257.0", IMG, "mode I values not clipped"),
    Mutant("img-f-unclipped", "server/images.py", "a = np.nan_to_num(np.clip(a, 0, 255))", "a = np.nan_to_num(a)",
           IMG, "mode F values not clipped"),
    Mutant("img-f-scale-edge", "server/images.py", "a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a",
           "a = a * 255.0 if np.nanmax(a, initial=0.0) < 1.0 else a", IMG,
           "an F image whose maximum is exactly 1.0 is not scaled"),
    Mutant("img-nearest", "model/transforms.py", "img = img.resize(target, INTERPOLATIONS[contract.interpolation])",
           "img = img.resize(target, Image.NEAREST)", IMG, "resize not bilinear"),
    Mutant("img-std", "model/transforms.py", "return np.ascontiguousarray((x - mean) / std, dtype=np.float32)",
           "return np.ascontiguousarray((x - mean) * std, dtype=np.float32)", IMG, "normalisation multiplies by std"),
    Mutant("img-background", "server/images.py",
           'base = Image.new("RGBA", rgba.size, (background, background, background, 255))',
           'base = Image.new("RGBA", rgba.size, (255, 255, 255, 255))', IMG,
           "transparency composited onto white, not the model's background"),
    # ---- HTTP layer -------------------------------------------------------------
    Mutant("v2-deadline-met-true", "server/http/v2.py",
           'response_params["deadline_met"] = (time.monotonic() - started) * 1e3 <= deadline_ms',
           'response_params["deadline_met"] = True',
           (B + "test_v2_deadline_met_is_false_when_the_answer_comes_late",), "v2 deadline_met always true"),
    Mutant("v2-class-pick", "server/http/v2.py", "top = [int(np.argsort(-p)[0]) for p in probs]",
           "top = [int(np.argsort(p)[0]) for p in probs]", V2, "v2 answers the least likely class"),
    Mutant("v2-exit-label", "server/http/v2.py", '"exit": [f.exit for f in done]', '"exit": [f.exit - 1 for f in done]',
           V2, "v2 exit output 0-based"),
    Mutant("http-shutdown-1ms", "server/cli.py",
           "log_config=log_config,\n                timeout_graceful_shutdown=settings.drain_timeout_s",
           "log_config=log_config,\n                timeout_graceful_shutdown=0.001",
           ("tests/test_server_live.py::test_sigterm_drains_in_flight_requests_and_exits_0",),
           "graceful-shutdown timeout cut to 1 ms"),
    Mutant("http-b64-lax", "server/http/params.py", "return base64.b64decode(value, validate=True)",
           "return base64.b64decode(value, validate=False)", ("tests/test_http.py",),
           "invalid base64 silently decoded"),
    Mutant("http-rejected-uncounted", "server/http/responses.py",
           "service.metrics.rejected.labels(reason=exc.reason).inc()", "pass", METRICS,
           "refused requests not counted by reason"),
    Mutant("http-status-label", "server/http/middleware.py",
           'service.metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()',
           'service.metrics.requests.labels(endpoint=endpoint, status="200").inc()', METRICS,
           "every request counted as status 200"),
    Mutant("http-token-unchecked", "server/http/routes.py",
           "if not hmac.compare_digest(given.encode(\"latin-1\"), token.get_secret_value().encode()):", "if False:",
           ("tests/test_http.py",), "PUT /budget accepts any bearer token"),
    Mutant("http-multipart-deadline", "server/http/routes.py",
           'data, deadline = await upload.read(), params.positive_number(form.get("deadline_ms"), "deadline_ms")',
           "data, deadline = await upload.read(), None", ("tests/test_http.py",),
           "multipart deadline_ms ignored"),

    # ---- added after the renovation: request parsing, non-finite outputs, decoding, budget keeper ------------
    Mutant("http-request-id-utf8", "server/http/params.py", 'text = raw.decode("latin-1")', "text = raw.decode()",
           (R + "test_non_utf8_header_bytes_never_fail_a_request",
            G + "test_non_utf8_request_id_bytes_reach_the_app_unchanged_and_never_fail"),
           "X-Request-ID bytes decoded as UTF-8: a non-UTF-8 header fails the request"),
    Mutant("http-request-id-prefix", "server/http/params.py", "if _REQUEST_ID.fullmatch(text):",
           "if _REQUEST_ID.match(text):", (R + "test_request_ids_are_echoed_only_when_bounded_and_printable",),
           "a request id whose prefix is safe is echoed whole (too long, control characters)"),
    Mutant("http-positive-allows-inf", "server/http/params.py",
           "if not (math.isfinite(v) and 0 < v <= MAX_NUMBER):",
           "if not (0 < v <= MAX_NUMBER or v == math.inf):",
           (R + "test_multipart_and_json_budgets_follow_one_rule",
            R + "test_numbers_beyond_float_are_422_naming_the_field"),
           "positive-number rule lets infinity through (deadline_ms, flops_budget)"),
    Mutant("sched-nan-not-final", "server/engine/scheduler.py", "if conf != conf:  # NaN", "if False:  # NaN",
           SCHED, "a NaN confidence does not leave as NON_FINITE (runs on, answers garbage)"),
    Mutant("service-nonfinite-answered", "server/service.py", "if f.outcome is Outcome.NON_FINITE:",
           "if False:", (R + "test_overflowing_input_is_422_non_finite_and_charges_nothing",
                         R + "test_overflowing_input_in_a_budgeted_batch_is_refused_too"),
           "a non-finite network output is answered instead of refused (422)"),
    Mutant("img-exif-skipped", "server/images.py", "            img = _upright(img)\n", "",
           (R + "test_exif_orientation_is_applied",), "the EXIF orientation tag is ignored"),
    Mutant("img-trns-ignored", "server/images.py", 'transparent = img.info.get("transparency")',
           "transparent = None", IMG + (R + "test_transparency_has_one_rule_for_every_mode",),
           "a transparent colour (PNG tRNS) is ignored"),
    Mutant("keeper-not-observing", "server/budget/keeper.py", "            self.controller.observe(flops)\n",
           "            pass\n", (B + "test_put_budget_restarts_the_deficit",),
           "answered /classify requests never reach the controller"),
]
