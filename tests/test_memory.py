"""Per-request objects do not outlive their request (issue 10, item 15).

After many images through the runner (mixed batch sizes, images leaving at
different exits, an expired deadline), once every answer is in and while the
model thread idles, no :class:`Task`, runner :class:`ImageData`, batch
:class:`MSDState`, :class:`Finished` or request future may still be referenced.
Counted with ``gc`` and weak references, not with RSS (which depends on the
allocator). The RSS side is the soak benchmark, ``make soak``.
"""

from __future__ import annotations

import asyncio
import gc
import time
import weakref

import numpy as np
import pytest

from model.checkpoint import load
from model.network import MSDState
from server.budget.policies import BudgetPolicy
from server.engine.runner import Finished, ImageData, Runner
from server.engine.scheduler import Outcome, Task

KINDS = (Task, ImageData, MSDState, Finished)


def live(kinds=KINDS) -> dict[str, int]:
    """Instances of ``kinds`` reachable after a full collection, by type name."""
    gc.collect()
    out: dict[str, int] = {}
    for o in gc.get_objects():
        if isinstance(o, kinds):
            out[type(o).__name__] = out.get(type(o).__name__, 0) + 1
    return out


async def _wait_ready(runner: Runner, limit_s: float = 120.0) -> None:
    end = time.monotonic() + limit_s  # a bound, not a timing assumption: warm-up is a few steps
    while not runner.ready:
        assert time.monotonic() < end, "runner did not warm up"
        await asyncio.sleep(0.01)


class ByIdPolicy:
    """Image i leaves after exit 1 + i % 3 (random weights give no useful
    confidences), so batch states are split, selected and joined."""

    def leaves(self, task: Task, confidence: float) -> bool:
        return task.exits_done >= 1 + task.id % 3

    def may_continue(self, task: Task) -> bool:
        return True


@pytest.fixture(params=[1, 2], ids=["1-model-thread", "2-model-threads"])
def runner(tiny_checkpoint, request):
    ck = load(tiny_checkpoint)
    r = Runner(ck, max_batch_size=8, max_queue_delay_s=0.001, max_queue_size=1024, torch_threads=1,
               model_threads=request.param)
    r.start(warmup_rounds=1)
    yield r
    r.stop()


def test_no_task_state_or_future_outlives_its_request(runner):
    rng = np.random.default_rng(0)
    policy = ByIdPolicy()
    futures: list[weakref.ref] = []
    outcomes: dict[Outcome, int] = {}
    exits: set[int] = set()

    async def main():
        await _wait_ready(runner)
        assert live() == {}, "objects alive before any request"
        for wave in range(30):
            n = int(rng.integers(1, 20))  # batch sizes vary, as under real load
            images = [rng.standard_normal((1, 28, 28)).astype(np.float32) for _ in range(n)]
            deadlines = [None] * n
            if wave == 7:
                deadlines[0] = time.monotonic() - 1.0  # already passed: EXPIRED, nothing computed
            policies = [policy] * n
            if wave % 5 == 4:  # a /batch-like group: budget for exit 1 and a bit more
                flops = runner.exit_flops
                policies = [BudgetPolicy(n * flops[0] + flops[1] - flops[0], n, (1.0, 1.0, 0.0), flops)] * n
            futs = runner.submit(images, policies, deadlines, time.monotonic())
            futures.extend(weakref.ref(f) for f in futs)
            for f in await asyncio.gather(*futs):
                outcomes[f.outcome] = outcomes.get(f.outcome, 0) + 1
                exits.add(f.exit)
            del futs, images

    asyncio.run(main())
    # The run exercised what it claims to (several exits and outcomes).
    assert {Outcome.CONFIDENT, Outcome.LAST_EXIT, Outcome.EXPIRED, Outcome.BUDGET} <= set(outcomes)
    assert {0, 1, runner.num_exits} <= exits
    assert len(futures) == sum(outcomes.values())
    assert runner.scheduler.in_flight == 0
    # Once the model thread is idle (it may still be returning from the last step's
    # frames when the answers arrive: wait for that, with a bound, not a guess at speed),
    # nothing of the past requests may remain.
    end = time.monotonic() + 30.0
    while live() != {} and time.monotonic() < end:
        time.sleep(0.05)
    assert live() == {}
    assert sum(ref() is not None for ref in futures) == 0


def test_idle_model_thread_gives_free_heap_back_once_per_busy_period(tiny_checkpoint, monkeypatch):
    import server.engine.runner as runner_mod

    calls = []
    monkeypatch.setattr(runner_mod, "release_free_heap", lambda: calls.append(1) or True)
    r = Runner(load(tiny_checkpoint), max_batch_size=8, max_queue_delay_s=0.001, max_queue_size=64,
               torch_threads=1, trim_interval_s=1e-9)
    r.start(warmup_rounds=1)

    async def wave():
        await _wait_ready(r)
        assert calls == []  # warm-up alone does not trim: no served step yet
        futs = r.submit([np.zeros((1, 28, 28), np.float32)] * 3, [ByIdPolicy()] * 3, [None] * 3, time.monotonic())
        await asyncio.gather(*futs)
        end = time.monotonic() + 60.0  # a bound, not a speed assumption
        while not calls:
            assert time.monotonic() < end, "the idle model thread never trimmed"
            await asyncio.sleep(0.01)

    try:
        asyncio.run(wave())
        # Idle since: no further trim without new steps (the thread waits for work).
        with r._cv:
            assert r._steps_since_trim == 0
        assert len(calls) == 1
    finally:
        r.stop()


def test_release_free_heap_calls_glibc_malloc_trim():
    import platform

    from server.engine.runner import release_free_heap

    assert release_free_heap() is (platform.libc_ver()[0] == "glibc")


def test_soak_figures_and_report_markers(tmp_path):
    from loadtest.soak import BEGIN, END, Sample, analyse, write_report

    # RSS rising 10 KiB/s (= 10.24 KB/s) while 100 requests/s are answered.
    samples = [Sample(t, 100_000 + 10 * t, 100 * t, 1.0) for t in range(0, 601, 10)]
    fig = analyse(samples, warmup_s=300)
    assert fig["rss_warm_at_s"] == 300
    # Medians of t = 300..350 s and of t = 550..600 s: RSS at 325 s and at 575 s.
    assert fig["rss_warm_mb"] == pytest.approx((100_000 + 3250) * 1024 / 1e6)
    assert fig["rss_end_mb"] == pytest.approx((100_000 + 5750) * 1024 / 1e6)
    assert fig["growth"] == pytest.approx(2500 / 103_250)  # 2.4%: over the 2% goal
    assert fig["slope_kb_per_min"] == pytest.approx(10.24 * 60)
    assert fig["slope_kb_per_request"] == pytest.approx(10.24 / 100)
    assert fig["plateau"] is False
    assert fig["floor_warm_mb"] == pytest.approx(103_000 * 1024 / 1e6)
    assert fig["floor_end_mb"] == pytest.approx(105_500 * 1024 / 1e6)
    flat = analyse([Sample(t, 100_000 + (t % 20), 100 * t, 1.0) for t in range(0, 601, 10)], warmup_s=300)
    assert flat["plateau"] is True and abs(flat["slope_kb_per_min"]) < 1.0

    doc = tmp_path / "SOAK.md"
    doc.write_text(f"# Notes\n\nkept\n\n{BEGIN}\nold figures\n{END}\n\ntail kept\n")
    write_report(doc, "new figures\n")
    assert doc.read_text() == f"# Notes\n\nkept\n\n{BEGIN}\nnew figures\n{END}\ntail kept\n"
