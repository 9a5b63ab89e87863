"""Server settings, from environment variables (prefix ``MSDNET_``) and CLI flags.

Each name says its unit: ``_ms`` milliseconds, ``_s`` seconds, ``_bytes``,
``_flops`` (multiply-accumulates of convs and linears, MSDNet paper convention).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from model import DEFAULT_CHECKPOINT


def usable_cpus() -> int:
    """CPUs this process may use: its CPU affinity, bounded by the cgroup v2 quota
    (``cpu.max``, e.g. a container's ``--cpus`` or a pod's CPU limit), not
    ``os.cpu_count()`` (the host's)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(float(quota) / float(period) + 0.5)))
    except (OSError, ValueError):
        pass
    return max(1, n)


class Settings(BaseSettings):
    """All settings; ``MSDNET_<NAME>`` in the environment sets ``<name>``.

    Raises:
        pydantic.ValidationError: naming the setting that is out of range.
    """

    model_config = SettingsConfigDict(env_prefix="MSDNET_", extra="ignore")

    checkpoint: Path = Field(DEFAULT_CHECKPOINT, description="Checkpoint to serve (default: the shipped model).")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Measured on 2 cores (docs/BENCHMARKS.md): 2 HTTP workers + the engine process served 1.8x (raw
    # PNG) the requests/s of one process at p99 <= 100 ms; 3 workers did no better.
    workers: int = Field(default_factory=lambda: min(4, usable_cpus()), ge=1, le=64,
                         description="HTTP worker processes; default: usable CPUs, at most 4. 1: the whole "
                                     "replica in one process. N > 1: N uvicorn workers (HTTP, JSON, image "
                                     "decoding) and one engine process (model, scheduler, budget controller) "
                                     "they reach over a Unix socket (server.ipc).")
    engine_address: str | None = Field(None, description="Set by 'msdnet serve --workers N' for its workers: "
                                       "the engine process's Unix socket path. Unset: load the model here.")
    # Defaults measured best on a 2-core machine (docs/PEERS.md): the model thread's
    # intra-op threads leave one core to the event loop and decoding (torch eager with
    # 2 threads there served 13 req/s at the last exit, with 1 thread 164), and ONNX
    # Runtime runs blocks about 2x faster than torch eager at the same thread count.
    torch_threads: int = Field(default_factory=lambda: max(1, min(4, usable_cpus() - 1)), ge=1,
                               description="Intra-op threads of each model thread (torch or ONNX Runtime); "
                                           "default: usable CPUs - 1, at most 4, with one model thread; 1 with "
                                           "several (engine_threads).")
    model_threads: int | None = Field(None, ge=1, le=64,
                                      description="Threads that run block steps concurrently in the engine, each with "
                                                  "MSDNET_TORCH_THREADS intra-op threads; default: chosen at start "
                                                  "from the checkpoint's cost (engine_threads).")
    backend: Literal["torch", "onnxruntime"] = Field(
        "onnxruntime", description="What runs a block step: ONNX Runtime (one session per block, exported at "
                                   "start and checked against torch eager), or torch eager (the reference).")
    max_batch_size: int | None = Field(None, ge=1, le=1024,
                                       description="Images per block step; default: 64, fewer where exit 1 is "
                                                   "costly (about 2 GFLOPs per step: 8 for ImageNet MSDNet-5).")
    max_queue_delay_ms: float = Field(2.0, ge=0, description="Longest wait of block 1 to fill a batch.")
    max_queue_size: int = Field(1024, ge=1, description="Images held at once; more get 503.")
    max_batch_images: int = Field(256, ge=1, description="Images per /batch request.")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Request body limit; more get 413.")
    jpeg_draft: bool = Field(True, description="Decode a large JPEG at 1/2, 1/4 or 1/8 scale first, keeping twice "
                             "the input contract's resize target and 256 pixels a side (libjpeg DCT scaling): a "
                             "12-megapixel photo costs a third to a quarter of the CPU, within 3 grey levels.")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="Width x height limit per image; more get 413.")
    receive_timeout_s: float = Field(30.0, gt=0, description="Time a client has to send a request's headers "
                                     "(from connection open or the previous response) and, again, its body "
                                     "(from the headers); past it: 408 and the connection is closed.")
    max_pending_connections: int = Field(256, ge=1, description="Connections that may wait for their request "
                                         "headers at once; more are closed at once (slow-client bound).")
    top_k: int = Field(5, ge=1)
    target_flops: float | None = Field(None, gt=0, description="Target mean FLOPs per /classify request; "
                                                               "default: the checkpoint's calibrated one.")
    latency_slo_ms: float | None = Field(
        None, gt=0, description="Latency objective per replica (milliseconds, e.g. 100; unset: none). When the "
        "queue would break it at the target, the target in force is lowered (down to exit 1's cost) until it "
        "holds, and raised back when the load falls; only when even exit 1 cannot keep up are requests refused, "
        "at once and before decoding (503, Retry-After). Requests with deadline_ms keep their own.")
    controller: bool = Field(True, description="Tune thresholds online; off: the checkpoint's thresholds.")
    controller_horizon: float = Field(20.0, gt=0, description="Requests over which an overspend is paid back.")
    controller_bias_halflife: float = Field(50.0, gt=0, description="Requests to forget half the bias estimate.")
    agreement_sample: float = Field(0.02, ge=0, le=1, description="Share of answered /classify images that left "
                                    "before the last exit and are carried on to it after their answer has gone out, "
                                    "only with spare capacity (no request queued or running; none while the latency "
                                    "objective is degraded or refusing), to measure agreement with the last exit; "
                                    "0: off.")
    agreement_max_flops_share: float = Field(0.04, gt=0, le=1, description="Those audits' FLOPs stay within this "
                                             "share of the FLOPs served (a sampled image is skipped otherwise; "
                                             "a credit of at most 4 audits absorbs bursts); never charged to the "
                                             "budget controller.")
    agreement_max_held: int = Field(256, ge=1, description="Audited images held at once; past it the oldest "
                                    "waiting one is dropped (msdnet_audit_skipped_total{reason=\"dropped\"}).")
    feedback_store_size: int = Field(100_000, ge=1, description="Recent one-image /classify answers kept for "
                                     "POST /feedback (by request id); older ones are forgotten (about 0.3 KB "
                                     "each with its id).")
    budget_token: SecretStr | None = Field(None, description="Bearer token for PUT /budget; unset: refused.")
    drain_timeout_s: float = Field(10.0, ge=0, description="On SIGTERM, how long in-flight requests may finish.")
    engine_timeout_s: float = Field(30.0, gt=0, description="With --workers N: how long a worker waits for the "
                                    "engine's answer to a request without deadline_ms before answering 503 "
                                    "(a request with deadline_ms waits its deadline plus 1 s, then 504).")
    warmup_rounds: int = Field(5, ge=1, description="Warm-up steps per block and batch size at start.")
    log_level: str = "info"
    access_log: bool = True
    redis_url: str | None = Field(None, description="Redis for fleet mode; unset: local mode.")
    fleet_publish_interval_s: float = Field(0.5, gt=0)
    fleet_stale_after_s: float = Field(10.0, gt=0, description="A replica silent this long leaves the fleet.")
    fleet_horizon: float = Field(200.0, gt=0, description="Requests over which the fleet's overspend is paid "
                                                          "back (longer than local: fleet figures arrive late).")

    def engine_threads(self, last_exit_flops: float) -> tuple[int, int]:
        """(model threads, intra-op threads per model thread) for a network whose
        last exit costs ``last_exit_flops`` (multiply-accumulates, lazy).

        Unset ``model_threads``: a compute-bound network (last exit at least
        ``COMPUTE_BOUND_FLOPS``) gets one model thread per usable CPU, each with one
        intra-op thread, since its blocks, not HTTP, fill the cores; a small one
        gets one model thread and leaves the other cores to HTTP and decoding. An
        explicit ``torch_threads`` with unset ``model_threads`` keeps one model thread
        (the operator chose intra-op parallelism).
        """
        explicit = self.model_fields_set
        if self.model_threads is not None:
            model = self.model_threads
        elif "torch_threads" in explicit:
            model = 1
        else:
            model = min(4, usable_cpus()) if last_exit_flops >= COMPUTE_BOUND_FLOPS else 1
        torch_threads = self.torch_threads if ("torch_threads" in explicit or model == 1) else 1
        return model, torch_threads

    def engine_batch(self, exit1_flops: float) -> int:
        """Images per block step: ``max_batch_size`` if set, else as many as cost about
        ``STEP_FLOPS`` at exit 1, between 1 and 64."""
        if self.max_batch_size is not None:
            return self.max_batch_size
        return max(1, min(64, round(STEP_FLOPS / exit1_flops)))


# Where the network, not HTTP, fills the cores. Measured on 2 cores (issue 22): HTTP, JSON
# and decoding cost about 1.8-2.1 ms of CPU per request; the shipped 28x28 model's last exit
# (21 MFLOPs) about 0.3 ms, CIFAR-100 MSDNet-7's (75 MFLOPs) and ImageNet MSDNet-5's
# (1,356 MFLOPs) several ms to tens of ms.
COMPUTE_BOUND_FLOPS = 50e6
# Images per step: ORT's rate on ImageNet MSDNet-5 (1 thread, per CPU-second) is 35.7 / 40.7 /
# 44.0 / 45.4 / 39.7 GMAC/s at batch 1 / 2 / 4 / 8 / 16; a step-1 batch of 64 would take 0.4 s
# of a 0.5-s objective. About 2 GFLOPs per step: batch 8 there, 64 for CIFAR and smaller.
STEP_FLOPS = 2e9
