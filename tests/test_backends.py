"""Block backends (server.engine.backends): the ONNX Runtime per-block engine against torch eager.

Logits agree with eager's (``compare_logits``: within 2e-5 of the largest logit) at every exit with lazy evaluation, at
batch sizes 1, 3 and 64, on states that the runner builds by selecting rows and
joining batches; the exported steps read and write exactly the eager step's
tensors; export leaves the model (and so its FLOPs) unchanged.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from model.checkpoint import load  # noqa: E402
from model.costs import exit_costs  # noqa: E402
from model.network import MSDState  # noqa: E402
from server.engine.backends import (  # noqa: E402
    Backend,
    BackendError,
    backend_names,
    check_parity,
    make_backend,
    register_backend,
    to_host,
    unregister_backend,
)
from server.engine.backends.ort import OrtBackend, step_io  # noqa: E402
from server.engine.parity import ParityFigures, compare_logits  # noqa: E402


@pytest.fixture(scope="module")
def shipped():
    return load()


@pytest.fixture(scope="module")
def ort_backend(shipped, tmp_path_factory):
    return OrtBackend(shipped.model, threads=1, cache_dir=tmp_path_factory.mktemp("onnx"))


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _agrees(a: torch.Tensor, b: torch.Tensor) -> bool:
    fig = compare_logits(a, b)
    return fig.ok and fig.relative < 2e-5


@pytest.mark.parametrize("n", [1, 3, 64])
def test_logits_equal_eager_at_every_exit(shipped, ort_backend, n):
    model = shipped.model
    x = _images(n, seed=n)
    with torch.inference_mode():
        ref, mine = model.start(x, lazy=True), model.start(x, lazy=True)
        for k in range(model.num_exits):
            a, ref = model.advance(ref)
            b, mine = ort_backend.advance(mine)
            assert _agrees(a, b), f"exit {k + 1}"
            # the state holds the same maps as eager's (lazy: the finer scales lag behind)
            assert mine.exits_done == ref.exits_done == k + 1 and mine.lazy
            assert sorted(mine.features) == sorted(ref.features)
            for s in ref.features:
                assert mine.features[s].shape == ref.features[s].shape
                # maps: float32 rounding of a different conv algorithm, relative to the value
                torch.testing.assert_close(mine.features[s], ref.features[s], rtol=1e-5, atol=1e-5)


def test_selected_and_joined_states(shipped, ort_backend):
    """The runner resumes exit k+1 from rows of several exit-k batches (select, then cat)."""
    model = shipped.model
    xa, xb = _images(5, seed=10), _images(3, seed=11)
    with torch.inference_mode():
        _, ea = model.advance(model.start(xa))
        _, eb = model.advance(model.start(xb))
        _, oa = ort_backend.advance(model.start(xa))
        _, ob = ort_backend.advance(model.start(xb))
        eager = MSDState.cat([ea.select([1, 3, 4]), eb])
        mine = MSDState.cat([oa.select(torch.tensor([False, True, False, True, True])), ob])
        direct = model.start(torch.cat([xa[[1, 3, 4]], xb]))  # the same images as one batch from the start
        _, direct = model.advance(direct)
        for k in range(1, model.num_exits):
            a, eager = model.advance(eager)
            b, mine = ort_backend.advance(mine)
            d, direct = model.advance(direct)
            assert b.shape == (6, 10)
            assert _agrees(a, b), f"exit {k + 1}"
            assert _agrees(d, b), f"exit {k + 1}"
        # a state cut down to its last row still matches (batch 1 after a larger batch)
        _, ea2 = model.advance(model.start(xa))
        _, oa2 = ort_backend.advance(model.start(xa))
        a, _ = model.advance(ea2.select([4]))
        b, _ = ort_backend.advance(oa2.select([4]))
        assert _agrees(a, b)


def test_ort_state_resumes_in_eager_and_back(shipped, ort_backend):
    """Both backends share one state representation: either can continue the other's state."""
    model = shipped.model
    x = _images(4, seed=3)
    with torch.inference_mode():
        ref = model.start(x)
        mixed = model.start(x)
        for k in range(model.num_exits):
            a, ref = model.advance(ref)
            b, mixed = (ort_backend if k % 2 == 0 else model).advance(mixed)
            assert _agrees(a, b)


def test_step_io_is_what_eager_reads_and_writes(shipped):
    model = shipped.model
    x = _images(2, seed=5)
    with torch.inference_mode():
        state = model.start(x)
        for k in range(model.num_exits):
            io_ = step_io(model, k, lazy=True)
            # eager's step runs on a state holding only the maps it reads ...
            only = MSDState({s: state.features[s] for s in io_.reads}, k, True)
            logits_only, _ = model.advance(only)
            for s in io_.reads:  # ... and on none of them fewer
                fewer = MSDState({t: state.features[t] for t in io_.reads if t != s}, k, True)
                with pytest.raises(KeyError):
                    model.advance(fewer)
            logits, new = model.advance(state)
            assert torch.equal(logits, logits_only)
            assert set(new.features) == set(io_.writes) | set(io_.carries)
            for s in io_.carries:
                assert new.features[s] is state.features[s]
            for s in io_.writes:
                assert s not in state.features or new.features[s] is not state.features[s]
            state = new
    # the shipped model's plan (lazy): exit 1 computes all scales of its stem; exit 4 only the coarsest two
    assert step_io(model, 0, True).reads == (-1,)
    assert step_io(model, 3, True).reads == (1, 2) and step_io(model, 3, True).writes == (2,)


def test_export_leaves_model_and_flops_unchanged(shipped, tmp_path):
    model = copy.deepcopy(shipped.model).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    backend = OrtBackend(model, threads=1, cache_dir=tmp_path)
    assert not model.training and not any(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    costs = exit_costs(model)
    assert [c.flops_lazy for c in costs] == shipped.exit_flops(lazy=True)
    assert [c.flops for c in costs] == shipped.exit_flops(lazy=False)
    assert backend.export_s > 0
    again = OrtBackend(model, threads=1, cache_dir=tmp_path)  # cached next to the first export
    assert again.export_s == 0.0
    assert again.check_parity(batch_size=2, seed=7).ok


def test_parity_check_refuses_a_diverging_model(shipped, tmp_path):
    model = copy.deepcopy(shipped.model).eval()
    backend = OrtBackend(model, threads=1, cache_dir=tmp_path)
    with torch.no_grad():
        model.classifiers[2].linear.bias += 1e-3  # eager now differs at exit 3 only
    with pytest.raises(BackendError, match="exit 3"):
        backend.check_parity()


def test_make_backend(shipped):
    assert make_backend("torch", shipped.model).name == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend("tensorrt", shipped.model)
    with pytest.raises(ValueError, match="lazy"):
        OrtBackend.advance(_FakeOrt(), MSDState({-1: _images(1, 0)}, 0, False))


def test_an_unknown_backend_name_is_a_value_error_naming_the_known_ones(shipped, tiny_checkpoint):
    from server.engine.runner import Runner

    assert backend_names() == ("onnxruntime", "torch")
    with pytest.raises(ValueError, match=r"^unknown backend 'tensorrt'; one of onnxruntime, torch$"):
        make_backend("tensorrt", shipped.model)
    with pytest.raises(ValueError, match=r"^unknown backend 'cuda'; one of onnxruntime, torch$"):
        Runner(load(tiny_checkpoint), max_batch_size=4, max_queue_delay_s=0.001, max_queue_size=8, torch_threads=1,
               backend="cuda")


def test_the_built_in_backends_are_backends_on_the_cpu(shipped, ort_backend):
    eager = make_backend("torch", shipped.model)
    for b in (eager, ort_backend):
        assert isinstance(b, Backend) and b.device == torch.device("cpu")
    x = _images(2, seed=8)
    assert ort_backend.start(x).features[-1] is x and ort_backend.start(x).lazy
    assert eager.check_parity(batch_size=2) == ParityFigures(0.0, 0.0, 0.0, 0)  # the reference against itself


def test_to_host_gives_the_values_as_numpy_a_view_on_the_cpu():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    a = to_host(t)
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert np.shares_memory(a, t.numpy())


# ---- a backend is one registration (issue 23): registered here, picked by name --------------------


class _Recording:
    """A backend defined in a test file: torch eager that records what the runner hands it,
    and can add ``offset`` to one exit's logits (a wrong backend)."""

    device = torch.device("cpu")

    def __init__(self, model, name: str, wrong_exit: int | None = None):
        self.model, self.name, self.wrong_exit = model.eval(), name, wrong_exit
        self.started: list[tuple] = []
        self.advanced: list[tuple[int, int]] = []

    def start(self, x, lazy=True):
        self.started.append((tuple(x.shape), x.device, lazy))
        return self.model.start(x, lazy)

    def advance(self, state):
        self.advanced.append((state.exits_done, state.batch_size))
        logits, new = self.model.advance(state)
        return (logits + 1e-2 if new.exits_done == self.wrong_exit else logits), new

    def check_parity(self, batch_size=3, seed=0):
        return check_parity(self, self.model, batch_size=batch_size, seed=seed)


@pytest.fixture
def recording():
    made: list[_Recording] = []

    @register_backend("test-recording")
    def build(model, *, threads, cache_dir):
        made.append(_Recording(model, "test-recording"))
        return made[-1]

    yield made
    unregister_backend("test-recording")
    assert "test-recording" not in backend_names()


class _LeaveAt:
    """Policy: every image leaves after exit ``k``."""

    def __init__(self, k: int):
        self.k = k

    def leaves(self, task, confidence: float) -> bool:
        return task.exits_done >= self.k

    def may_continue(self, task) -> bool:
        return True


def test_a_backend_registered_in_a_test_file_is_picked_by_name(recording, tiny_checkpoint):
    import asyncio
    import time

    from server.engine.runner import Runner

    ck = load(tiny_checkpoint)
    assert backend_names() == ("onnxruntime", "test-recording", "torch")
    with pytest.raises(ValueError, match="one of onnxruntime, test-recording, torch$"):
        make_backend("tensorrt", ck.model)
    with pytest.raises(ValueError, match="already registered"):
        register_backend("test-recording")(lambda model, **kw: None)
    r = Runner(ck, max_batch_size=4, max_queue_delay_s=0.0, max_queue_size=8, torch_threads=1,
               backend="test-recording")
    (backend,) = recording
    assert r.backend is backend and isinstance(backend, Backend)
    r._warmup(rounds=1)  # every block at batch 1, then at the max batch size, twice each
    k_all = ck.model.num_exits
    assert backend.started == [((1, 1, 28, 28), torch.device("cpu"), True)] * 2 + [((4, 1, 28, 28),
                                                                                     torch.device("cpu"), True)] * 2
    assert backend.advanced == [(k, n) for n in (1, 4) for _ in range(2) for k in range(k_all)]

    images = [np.random.default_rng(i).standard_normal((1, 28, 28)).astype(np.float32) for i in range(3)]
    backend.started.clear()
    r.start(warmup_rounds=0)
    try:
        async def main():
            futs = r.submit(images, [_LeaveAt(k_all)] * 3, [None] * 3, time.monotonic())
            return await asyncio.wait_for(asyncio.gather(*futs), 60.0)

        answers = asyncio.run(main())
    finally:
        r.stop()
    assert (3, 1, 28, 28) in [shape for shape, _, _ in backend.started]  # the requests' batch, on its device
    with torch.no_grad():
        logits = ck.model(torch.from_numpy(np.stack(images)))[-1].double() / ck.calibration.temperatures[-1]
    want = torch.softmax(logits, 1).numpy()
    assert [a.exit for a in answers] == [k_all] * 3
    for a, w in zip(answers, want):
        np.testing.assert_allclose(a.probs, w, rtol=0, atol=1e-6)


def test_parity_names_the_backend_and_the_exit_it_gets_wrong(shipped, caplog):
    with caplog.at_level("INFO", logger="msdnet.backends"):
        worst = _Recording(shipped.model, "test-good").check_parity(batch_size=2)
    assert worst == ParityFigures(0.0, 0.0, 0.0, 0)
    assert "test-good parity with torch eager over 4 exits: logits 0 of the largest" in caplog.text
    with pytest.raises(BackendError, match=r"^test-off disagrees with torch eager at exit 2: .*refusing to serve"):
        _Recording(shipped.model, "test-off", wrong_exit=2).check_parity()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_backend_is_one_registration_and_the_runner_serves_on_it(tiny_checkpoint):
    """What a CUDA backend file would hold: eager on a copy of the model on the GPU."""
    from server.engine.runner import Runner

    class CudaEager(_Recording):
        device = torch.device("cuda")

        def __init__(self, model):
            super().__init__(copy.deepcopy(model).to(self.device), "test-cuda")
            self.reference = model

        def check_parity(self, batch_size=3, seed=0):
            return check_parity(self, self.reference, batch_size=batch_size, seed=seed)

    register_backend("test-cuda")(lambda model, *, threads, cache_dir: CudaEager(model))
    try:
        ck = load(tiny_checkpoint)
        r = Runner(ck, max_batch_size=4, max_queue_delay_s=0.0, max_queue_size=8, torch_threads=1,
                   backend="test-cuda")
        assert r.backend.check_parity().ok
        r._warmup(rounds=0)
        assert {dev for _, dev, _ in r.backend.started} == {torch.device("cuda", 0)}
    finally:
        unregister_backend("test-cuda")


class _FakeOrt:
    """Just enough of an OrtBackend to reach its argument checks."""

    sessions = [None] * 4
    lazy = True


def test_runner_runs_blocks_on_the_chosen_backend(tiny_checkpoint):
    from server.engine.runner import Runner

    ck = load(tiny_checkpoint)
    runner = Runner(ck, max_batch_size=4, max_queue_delay_s=0.001, max_queue_size=8, torch_threads=1,
                    backend="onnxruntime")
    assert runner.backend.name == "onnxruntime"
    calls = []
    advance = runner.backend.advance
    runner.backend.advance = lambda state: calls.append(state.batch_size) or advance(state)
    runner._warmup(rounds=1)  # every block at batch 1 and at the max batch size, twice (one uncounted)
    assert calls == [1] * (2 * ck.model.num_exits) + [4] * (2 * ck.model.num_exits)
    assert Runner(ck, max_batch_size=4, max_queue_delay_s=0.001, max_queue_size=8,
                  torch_threads=1).backend.name == "torch"


# ---- the parity rule: relative to the logits' size (issue 22) ---------------------------------


def test_compare_logits_is_relative_to_the_logits_scale():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 10, generator=g, dtype=torch.float64).float()
    for scale in (0.25, 40.0, 1419.0):  # an untrained head, a confident one, this project's own initialiser
        a = ref * scale
        noise = a * (1 + 1e-6 * torch.randn(4, 10, generator=g))  # float32 rounding of another algorithm
        fig = compare_logits(a, noise)
        assert fig.ok, (scale, fig)
        assert 1e-7 < fig.relative < 5e-6
    # the same absolute error that is rounding at 1,419 is a wrong result at 0.25
    a = ref * 0.25
    fig = compare_logits(a, a + 1e-3)
    assert not fig.ok and fig.relative > 1e-3


def test_compare_logits_refuses_nan_a_clear_top1_flip_and_probabilities():
    ref = torch.tensor([[5.0, 1.0, 0.0], [2.0, 1.999999, 0.0]])
    flipped = ref.clone()
    flipped[0] = torch.tensor([1.0, 5.0, 0.0])
    fig = compare_logits(ref, flipped)
    assert fig.top1_mismatches == 1 and not fig.ok
    # a near-tie (gap 1e-6, under the allowance) may flip: only the other figures judge it
    tie = ref.clone()
    tie[1] = torch.tensor([1.999999, 2.0, 0.0])
    fig = compare_logits(ref, tie)
    assert fig.top1_mismatches == 0 and fig.ok
    assert not compare_logits(ref, torch.full_like(ref, float("nan"))).ok
    # probabilities: logits of 0 and 1e-3 differ by 1e-3 absolute (2e-4 relative to 5): refused
    assert not compare_logits(torch.tensor([[5.0, 0.0]]), torch.tensor([[5.0, 1e-3]])).ok
    with pytest.raises(ValueError, match="shapes differ"):
        compare_logits(ref, ref[:1])


def test_a_confident_network_passes_parity(shipped, tmp_path):
    """Final linears scaled so the largest logit is ~1,400: the old absolute 1e-5 refused such exports."""
    model = copy.deepcopy(shipped.model).eval()
    with torch.no_grad():
        for head in model.classifiers:
            head.linear.weight.mul_(100.0)
            head.linear.bias.mul_(100.0)
    backend = OrtBackend(model, threads=1, cache_dir=tmp_path)
    assert isinstance(backend.parity, ParityFigures) and backend.parity.ok
    assert backend.parity.absolute > 1e-5  # would have been refused by an absolute 1e-5
    assert backend.parity.relative < 2e-5


def test_a_perturbed_weight_in_the_exported_graph_is_refused(shipped, tmp_path):
    import onnx
    from onnx import numpy_helper

    model = copy.deepcopy(shipped.model).eval()
    OrtBackend(model, threads=1, cache_dir=tmp_path)
    (directory,) = [d for d in tmp_path.iterdir() if d.name.startswith("onnx-")]
    path = directory / "step2.onnx"
    graph = onnx.load(str(path))
    # one element of step 2's first conv weight (block 2's first layer), as a wrong export would
    first_conv = next(n for n in graph.graph.node if n.op_type == "Conv")
    init = next(t for t in graph.graph.initializer if t.name == first_conv.input[1])
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(graph, str(path))
    with pytest.raises(BackendError, match=r"disagrees with torch eager at exit [234]"):
        OrtBackend(model, threads=1, cache_dir=tmp_path)  # a cache hit: loads the perturbed file


@pytest.mark.parametrize("name", ["cifar100-7", "imagenet-5"])
def test_the_papers_networks_pass_parity_at_logits_of_40(name, tmp_path):
    """Issue 22's two refusals: the paper's networks, random weights, each exit's largest logit 40."""
    from loadtest.realsize import build_network

    model = build_network(name).model
    backend = OrtBackend(model, threads=1, cache_dir=tmp_path)
    assert backend.parity.ok
    assert backend.parity.absolute > 1e-6  # float32 rounding is there, at the logits' scale
    assert backend.parity.relative < 2e-5
