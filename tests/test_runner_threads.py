"""Several model threads (issue 22): block steps run concurrently, every image is answered once.

The concurrency is shown with the runner's step hook, not with timings: the first
step is held on its thread until a second step has started on another thread.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from model.checkpoint import load
from server.engine.runner import Runner
from server.engine.scheduler import Outcome, Task
from server.settings import COMPUTE_BOUND_FLOPS, Settings


class ExitAt:
    """Image i leaves after exit 1 + i % num_exits (random weights give no useful confidences)."""

    def __init__(self, num_exits: int):
        self.num_exits = num_exits

    def leaves(self, task: Task, confidence: float) -> bool:
        return task.exits_done >= 1 + task.id % self.num_exits

    def may_continue(self, task: Task) -> bool:
        return True


class FixedExit:
    """Leave after exit ``k``."""

    def __init__(self, k: int):
        self.k = k

    def leaves(self, task: Task, confidence: float) -> bool:
        return task.exits_done >= self.k

    def may_continue(self, task: Task) -> bool:
        return True


def _start(ck, model_threads: int, max_batch_size: int = 2) -> Runner:
    r = Runner(ck, max_batch_size=max_batch_size, max_queue_delay_s=0.0, max_queue_size=256, torch_threads=1,
               model_threads=model_threads)
    r.start(warmup_rounds=1)
    end = time.monotonic() + 120.0  # a hang guard, not a speed assumption
    while not r.ready:
        assert time.monotonic() < end, "runner did not warm up"
        time.sleep(0.01)
    return r


def test_two_model_threads_run_two_steps_at_once(tiny_checkpoint):
    ck = load(tiny_checkpoint)
    r = _start(ck, model_threads=2)
    second_started = threading.Event()
    held: list[str] = []
    lock = threading.Lock()

    def hook(block, tasks):
        with lock:
            held.append(threading.current_thread().name)
            first = len(held) == 1
        if first:  # hold the first step until another thread has started a step beside it
            assert second_started.wait(30.0), "no second step started while the first was held"
        else:
            second_started.set()

    r.step_hook = hook
    try:
        async def main():
            images = [np.zeros((1, 28, 28), np.float32) for _ in range(5)]
            futs = r.submit(images, [ExitAt(1)] * 5, [None] * 5, time.monotonic())
            return await asyncio.wait_for(asyncio.gather(*futs), 60.0)

        answers = asyncio.run(main())
    finally:
        r.step_hook = None
        r.stop()
    assert second_started.is_set()
    assert len(set(held[:2])) == 2, held  # two different threads
    assert [a.outcome for a in answers] == [Outcome.CONFIDENT] * 5 and {a.exit for a in answers} == {1}


@pytest.mark.parametrize("model_threads", [1, 3])
def test_answers_do_not_depend_on_the_number_of_model_threads(tiny_checkpoint, model_threads):
    """Same images, each leaving at its own fixed exit: exit, FLOPs and probabilities equal one thread's."""
    ck = load(tiny_checkpoint)
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((1, 28, 28)).astype(np.float32) for _ in range(40)]

    def answers(threads: int):
        r = _start(ck, model_threads=threads, max_batch_size=4)
        try:
            async def main():
                futs = []
                for i, im in enumerate(images):
                    futs += r.submit([im], [FixedExit(1 + i % ck.model.num_exits)], [None], time.monotonic())
                return await asyncio.wait_for(asyncio.gather(*futs), 120.0)

            return asyncio.run(main()), r.scheduler.in_flight
        finally:
            r.stop()

    one, left1 = answers(1)
    many, left2 = answers(model_threads)
    assert left1 == left2 == 0
    assert [a.exit for a in one] == [a.exit for a in many] == [1 + i % ck.model.num_exits for i in range(40)]
    assert [a.flops for a in many] == [ck.exit_flops(lazy=True)[a.exit - 1] for a in one]
    for a, b in zip(one, many):  # other batch compositions: float32 rounding only
        np.testing.assert_allclose(a.probs, b.probs, rtol=0, atol=1e-5)
    assert len({int(np.argmax(a.probs)) for a in one}) > 1


def test_engine_threads_and_batch_default_from_the_checkpoint_cost(monkeypatch):
    import server.settings as settings_mod

    monkeypatch.setattr(settings_mod, "usable_cpus", lambda: 2)
    s = Settings()
    assert s.engine_threads(21.14e6) == (1, 1)  # the shipped model: one model thread, the other core for HTTP
    assert s.engine_threads(COMPUTE_BOUND_FLOPS) == (2, 1)  # compute-bound: a model thread per core
    assert s.engine_threads(1356e6) == (2, 1)
    assert Settings(model_threads=3).engine_threads(21e6) == (3, 1)
    assert Settings(model_threads=2, torch_threads=2).engine_threads(21e6) == (2, 2)
    assert Settings(torch_threads=2).engine_threads(1356e6) == (1, 2)  # the operator chose intra-op threads
    monkeypatch.setattr(settings_mod, "usable_cpus", lambda: 8)
    assert Settings().engine_threads(1356e6) == (4, 1)  # at most 4
    assert Settings().engine_batch(4.8e6) == 64  # the shipped model, CIFAR sizes
    assert Settings().engine_batch(254e6) == 8  # ImageNet MSDNet-5
    assert Settings().engine_batch(5e9) == 1
    assert Settings(max_batch_size=16).engine_batch(254e6) == 16
    with pytest.raises(ValueError, match="model_threads"):
        Runner.__init__(object.__new__(Runner), None, max_batch_size=1, max_queue_delay_s=0, max_queue_size=1,
                        torch_threads=1, model_threads=0)
