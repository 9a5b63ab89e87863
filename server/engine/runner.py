"""Model runner: owns the model and its model threads; executes the scheduler's steps.

The event loop only submits images and awaits futures; every tensor operation
happens on a model thread, with ``torch.set_num_threads(torch_threads)``. With
``model_threads`` > 1 the threads take steps from the one scheduler (under its
lock) and run them concurrently: ONNX Runtime and torch release the GIL inside a
block, so two steps (of different blocks or different batches) compute on two
cores at once. Why threads of one process rather than intra-op threads: on
ImageNet MSDNet-5 a second intra-op thread added 9% (issue 22), a second model
thread nearly doubles the rate (each thread's cost per MAC within 7% of one
thread alone).
Features of images that go on to the next block stay as rows of their step's
batch state and are gathered when that block runs, so exit k+1 resumes from
exit k's features (real early exit, lazy evaluation; ``model.network``).
An image sampled for audit (``Task.audit``, see ``server.engine.audit``) keeps a
copy of its own row when its answer goes out, and runs on to the last exit in
audit steps; the :class:`StepWatch` hears of it, never the budget (``on_done``).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from model.checkpoint import Checkpoint
from model.network import MSDState

from .audit import Auditor, StepWatch
from .backends import make_backend, to_host
from .scheduler import BlockScheduler, Finished, LatencyModel, Outcome, Task  # Finished: re-exported

log = logging.getLogger("msdnet.runner")


@dataclass
class ImageData:
    """Per-image data the runner keeps on a :class:`Task`."""

    image: np.ndarray | None  # (C, H, W) float32 until block 1 runs
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    on_done: Callable[[Task, Outcome], None] | None = None
    batch_state: MSDState | None = None  # the step's batch state holding this image's features
    row: int = 0
    probs: np.ndarray | None = None  # (num_classes,) at the newest exit
    served_exit: int = 0  # an audited image's exit (1-based) and class when it was answered
    served_class: int = -1


class Runner:
    """Runs block steps on a dedicated thread.

    Args:
        checkpoint: the loaded model and metadata.
        max_batch_size, max_queue_delay_s, max_queue_size: scheduler settings.
        torch_threads: intra-op threads of each model thread (and of ONNX Runtime's sessions).
        model_threads: threads that run block steps concurrently (each with ``torch_threads``
            intra-op threads); the scheduler, latency model and answers are shared.
        backend: the registered name of what runs a block step (``server.engine.backends``): ``torch``
            (eager) or ``onnxruntime`` (exported and checked for parity here, so a mismatch stops the
            server from starting). Input batches go to its device; logits come back as host numpy.
        on_step: called after each step with (block 0-based, batch size, seconds, queue depths),
            and with batch size 0 when images leave a queue without a step (deadline, budget).
        trim_interval_s: when the queues run empty, at most this often (seconds; 0 = never)
            hand the C heap's free pages back to the system (:func:`release_free_heap`).
        auditor: samples answered ``auditable`` images for the last exit (``server.engine.audit``);
            None: no audits. ``max_audit_held``: audited images held at once.
        watch: told of confidences, answers and audits (:class:`StepWatch`); audit steps are
            not reported to ``on_step`` (they are no request's work).

    Raises:
        ValueError: ``model_threads`` below 1, or an unknown backend (naming the registered ones).
        server.engine.backends.BackendError: the ONNX Runtime backend fails to build or its parity check.

    Attributes:
        step_hook: test hook, None in production (one attribute test, no other
            cost). When set, called on a model thread with (block 0-based, the
            step's tasks) after the scheduler chose a step and before it runs, so
            a test can hold a step (e.g. wait on a ``threading.Event`` it sets
            later) without racing the CPU.
    """

    step_hook: Callable[[int, list[Task]], None] | None = None

    def __init__(self, checkpoint: Checkpoint, *, max_batch_size: int, max_queue_delay_s: float,
                 max_queue_size: int, torch_threads: int, backend: str = "torch", model_threads: int = 1,
                 on_step: Callable[[int, int, float, list[int]], None] | None = None, trim_interval_s: float = 10.0,
                 auditor: Auditor | None = None, max_audit_held: int = 256, watch: StepWatch | None = None):
        if model_threads < 1:
            raise ValueError(f"model_threads must be at least 1, got {model_threads}")
        self.model = checkpoint.model.eval()
        self.backend = make_backend(backend, self.model, threads=torch_threads)
        cal = checkpoint.calibration
        self.temperatures = list(cal.temperatures) if cal is not None else [1.0] * self.model.num_exits
        self.exit_flops = checkpoint.exit_flops(lazy=True)
        self.num_exits = self.model.num_exits
        self.torch_threads = torch_threads
        self.model_threads = model_threads
        self.scheduler = BlockScheduler(self.num_exits, max_batch_size, max_queue_delay_s, max_queue_size,
                                        LatencyModel(self.num_exits), auditor=auditor, max_audit_held=max_audit_held)
        self.on_step = on_step
        self.watch = watch
        self._cv = threading.Condition()
        self._stop = False
        self._threads: list[threading.Thread] = []
        self.ready = False
        self.trim_interval_s = trim_interval_s
        self._last_trim = time.monotonic()
        self._steps_since_trim = 0

    # ---- event-loop side -------------------------------------------------
    def submit(self, images: list[np.ndarray], policies: list, deadlines: list[float | None],
               arrival: float, on_done: Callable[[Task, Outcome], None] | None = None, auditable: bool = False,
               keys: list[str | None] | None = None) -> list[asyncio.Future]:
        """Queue images; returns one future per image resolving to :class:`Finished`.
        Cancelling a future (its request's client left) stops its image before its
        next block: it leaves with ``Outcome.CANCELLED`` and ``on_done`` is told.
        ``auditable``: the auditor may sample them (``/classify`` images); ``keys``:
        one request id per image (or None) for the watch.

        Raises:
            scheduler.QueueFull: when the queue cannot take them all.
        """
        loop = asyncio.get_running_loop()
        tasks, futures = [], []
        for i, (image, policy, deadline) in enumerate(zip(images, policies, deadlines)):
            fut = loop.create_future()
            task = Task(arrival=arrival, policy=policy, deadline=deadline, state=ImageData(image, fut, loop, on_done),
                        auditable=auditable, key=keys[i] if keys is not None else None)
            fut.add_done_callback(functools.partial(_mark_cancelled, task))
            tasks.append(task)
            futures.append(fut)
        with self._cv:
            self.scheduler.submit(tasks)
            self._cv.notify()
        return futures

    # ---- lifecycle -------------------------------------------------------
    def start(self, warmup_rounds: int = 5) -> None:
        """Start the first model thread; it warms up (seeding the latency model),
        then starts the others and serves."""
        first = threading.Thread(target=self._main, args=(warmup_rounds,), name="msdnet-model", daemon=True)
        self._threads = [first]
        first.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the threads after their current steps; queued images get an error."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        for task in self.scheduler.drain():
            self._resolve_exception(task, RuntimeError("server shutting down"))

    def _main(self, warmup_rounds: int) -> None:
        torch.set_num_threads(self.torch_threads)
        try:
            self._warmup(warmup_rounds)
        except Exception:
            log.exception("warm-up failed")
            return
        with self._cv:
            if self._stop:
                return
            others = [threading.Thread(target=self._serve, name=f"msdnet-model-{i + 1}", daemon=True)
                      for i in range(1, self.model_threads)]
            self._threads.extend(others)
        for thread in others:
            thread.start()
        self.ready = True
        self._serve()

    def _serve(self) -> None:
        with torch.inference_mode():
            self._loop()

    @torch.inference_mode()
    def _warmup(self, rounds: int) -> None:
        """Run every block at batch 1 and at max batch size to seed the latency model."""
        spec = self.model.cfg
        for n in (1, self.scheduler.max_batch_size):
            x = torch.zeros(n, spec.in_channels, spec.image_size, spec.image_size, device=self.backend.device)
            for r in range(rounds + 1):
                state = self.backend.start(x)
                for k in range(self.num_exits):
                    t0 = time.perf_counter()
                    _, state = self.backend.advance(state)
                    if r > 0:  # the first round pays one-off costs
                        self.scheduler.latency.observe(k, n, time.perf_counter() - t0)

    # ---- model thread ----------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                if self._stop:
                    return
                now = time.monotonic()
                step = self.scheduler.next_step(now)
                trim = (step is None and self._steps_since_trim > 0 and self.trim_interval_s > 0
                        and now - self._last_trim >= self.trim_interval_s)
                if not trim and (step is None or isinstance(step, float)):
                    self._cv.wait(timeout=step)
                    continue
                if trim:
                    self._last_trim, self._steps_since_trim = now, 0
                else:
                    self._steps_since_trim += 1
                    if self.model_threads > 1 and any(self.scheduler.queues):
                        self._cv.notify()  # more work waits: another thread may start on it now
            if trim:  # idle: give the heap's free pages back (outside the lock; ~10-20 ms)
                release_free_heap()
                continue
            # The step's tasks live in _step's frame only, so while this thread waits
            # it pins no finished task (nor its future, probabilities or batch state).
            self._step(*step)

    def _step(self, block: int, batch: list[Task], finished: list[tuple[Task, Outcome]]) -> None:
        if not batch and finished and self.on_step is not None:  # they left without a step: depths changed
            with self._cv:  # (before their answers go out, so the answers never precede the gauges)
                depths = [self.scheduler.depth(b) for b in range(self.num_exits)]
            self.on_step(block, 0, 0.0, depths)
        self._finish_all(finished)
        if batch:
            try:
                if self.step_hook is not None:
                    self.step_hook(block, batch)
                self._run(block, batch)
            except Exception as exc:  # a failed step fails its images, not the thread
                log.exception("block %d step failed", block + 1)
                with self._cv:
                    self.scheduler.fail(batch)
                for task in batch:
                    self._resolve_exception(task, exc)

    def _gather(self, block: int, batch: list[Task]) -> MSDState:
        if block == 0:
            x = torch.from_numpy(np.stack([t.state.image for t in batch])).to(self.backend.device)
            for t in batch:
                t.state.image = None
            return self.backend.start(x, lazy=True)
        groups: dict[int, list[Task]] = {}
        for t in batch:
            groups.setdefault(id(t.state.batch_state), []).append(t)
        batch[:] = [t for g in groups.values() for t in g]  # laid out as the joined state
        parts = []
        for g in groups.values():
            st, rows = g[0].state.batch_state, [t.state.row for t in g]
            parts.append(st if rows == list(range(st.batch_size)) else st.select(rows))
        return parts[0] if len(parts) == 1 else MSDState.cat(parts)

    def _run(self, block: int, batch: list[Task]) -> None:
        audit_step = batch[0].audit  # an audit step holds audited images only
        t0 = time.perf_counter()
        state = self._gather(block, batch)
        logits, new_state = self.backend.advance(state)
        probs, finite = _softmax(to_host(logits).astype(np.float64) / self.temperatures[block])
        seconds = time.perf_counter() - t0
        conf = probs.max(axis=1)
        conf[~finite] = np.nan  # the scheduler's sign for "no answer"
        conf = conf.tolist()
        for i, t in enumerate(batch):
            t.state.batch_state, t.state.row, t.state.probs = new_state, i, probs[i]
        with self._cv:
            finished = self.scheduler.complete(block, batch, conf, seconds)
            depths = [self.scheduler.depth(b) for b in range(self.num_exits)]
            if self.model_threads > 1 and any(depths):
                self._cv.notify()  # images went on to the next block: an idle thread may take them
        if audit_step:
            if self.watch is not None:
                self.watch.audit_step(block, len(batch), seconds)
        else:
            if self.watch is not None:
                self.watch.confidences(block, conf)
            if self.on_step is not None:
                self.on_step(block, len(batch), seconds, depths)
        self._finish_all(finished)
        sampled = [t for t, o in finished if t.audit and o is not Outcome.AUDITED]
        if sampled:  # answered: now they may wait for an audit step
            with self._cv:
                self.scheduler.queue_audits(sampled)
                self._cv.notify()

    def _finish_all(self, finished: list[tuple[Task, Outcome]]) -> None:
        """Answer the images that left: one wake-up per event loop, not per image
        (``call_soon_threadsafe`` writes to the loop's self-pipe: a system call)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        watch = self.watch
        for task, outcome in finished:
            data: ImageData = task.state
            if outcome is Outcome.AUDITED:  # its answer went out when it left; the watch hears the last exit's
                data.batch_state = None
                if watch is not None:
                    finite = task.confidence == task.confidence
                    watch.audited(task, data.served_exit, data.served_class,
                                  int(np.argmax(data.probs)) if finite else None)
                continue
            k = task.exits_done
            result = Finished(outcome, k, data.probs, self.exit_flops[k - 1] if k else 0, task.confidence)
            if task.audit:  # sampled (not queued yet): keep a copy of its own row; the step's state is freed
                data.served_exit, data.served_class = k, int(np.argmax(data.probs))
                data.batch_state, data.row = data.batch_state.select([data.row]), 0
            else:
                data.batch_state = None  # free the features
            if data.on_done is not None:
                data.on_done(task, outcome)
            if watch is not None:
                watch.answered(task, result)
            by_loop.setdefault(data.loop, []).append((data.future, result))
        for loop, answers in by_loop.items():
            loop.call_soon_threadsafe(_set_results, answers)

    def _resolve_exception(self, task: Task, exc: BaseException) -> None:
        data: ImageData = task.state
        data.loop.call_soon_threadsafe(_set_exception, data.future, exc)


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim  # the process's own C library; glibc has it, musl and macOS not
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_malloc_trim = _load_malloc_trim()


def release_free_heap() -> bool:
    """Return the free pages of every glibc malloc arena to the system
    (``malloc_trim(0)``); a no-op (False) where the C library is not glibc.

    Why: the block steps allocate feature maps whose size follows the batch size
    (up to ``max_batch_size`` images). After a burst (a backlog, CPU stolen by
    neighbours) the freed maps stay in glibc's arenas as free chunks between live
    ones, which ``free`` does not give back, so RSS ratchets up with each new peak
    (issue 10, item 15: 298 -> 345 MB in 8-10 MB steps; measured here: 458 MiB RSS
    with 128 MiB free in the arenas after an overload, 333 MiB after one trim;
    docs/SOAK.md). Costs about 10-20 ms on this model's heap; see malloc_trim(3).

    Returns:
        True when it trimmed.
    """
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


def _softmax(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise softmax of float64 ``z`` (N, classes), in place, and which rows were
    finite. numpy, not torch: a few microseconds less per step on the model thread."""
    finite = np.isfinite(z).all(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows become NaN, flagged by ``finite``
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
    return z, finite


def _mark_cancelled(task: Task, fut: asyncio.Future) -> None:
    # A bool written on the event loop, read by the scheduler under the model
    # threads' lock: at worst the image runs the step already chosen for it.
    if fut.cancelled():
        task.cancelled = True


def _set_results(answers: list[tuple[asyncio.Future, Finished]]) -> None:
    for fut, value in answers:
        if not fut.done():
            fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
