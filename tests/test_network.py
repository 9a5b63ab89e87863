"""Real early exit: staged forward, resumption, splitting, and module-call counts."""

from __future__ import annotations

import pytest
import torch

from model.network import MSDNet, MSDState


@pytest.fixture
def tiny(tiny_config):
    model = MSDNet(tiny_config).eval()
    # Non-trivial BN statistics so that eval mode is not an identity.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("lazy", [False, True])
def test_staged_logits_equal_full_forward(tiny, lazy):
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        full = tiny(x)
        state = tiny.start(x, lazy=lazy)
        for k in range(tiny.num_exits):
            logits, state = tiny.advance(state)
            assert torch.allclose(logits, full[k], atol=1e-5), k
    assert state.exits_done == tiny.num_exits
    with pytest.raises(ValueError, match="last exit"):
        tiny.advance(state)


def test_split_and_resume_by_exit(tiny):
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        full = tiny(x)
        logits1, state = tiny.advance(tiny.start(x))
        assert torch.allclose(logits1, full[0], atol=1e-5)
        leave = torch.tensor([True, False, True, False, False, True])
        gone, stay = state.select(leave), state.select(~leave)
        assert gone.batch_size == 3 and stay.batch_size == 3
        logits2, _ = tiny.advance(stay)
        assert torch.allclose(logits2, full[1][~leave], atol=1e-5)
        # Re-join two halves of different origin and resume.
        a, b = stay.select([0]), stay.select([1, 2])
        joined = MSDState.cat([b, a])
        logits2b, _ = tiny.advance(joined)
        assert torch.allclose(logits2b, full[1][~leave][[1, 2, 0]], atol=1e-5)
    with pytest.raises(ValueError, match="same exit"):
        MSDState.cat([stay, tiny.start(x)])


def _block_modules(model, block):
    mods = set(model.blocks[block].modules()) | set(model.classifiers[block].modules())
    return mods


def _count_calls(model, fn):
    calls = {}
    handles = [m.register_forward_hook(lambda mod, i, o: calls.__setitem__(mod, calls.get(mod, 0) + 1))
               for m in model.modules()]
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in handles:
            h.remove()
    return calls


@pytest.mark.parametrize("lazy", [False, True])
def test_exit_1_runs_no_module_of_later_blocks(tiny, lazy):
    x = torch.randn(2, 1, 28, 28)
    state = {}
    calls = _count_calls(tiny, lambda: state.setdefault("s", tiny.advance(tiny.start(x, lazy=lazy))[1]))
    later = set().union(*(_block_modules(tiny, b) for b in range(1, tiny.num_exits)))
    assert not (set(calls) & later)
    assert any(m in calls for m in tiny.classifiers[0].modules())
    # Resuming runs block 2 and nothing of block 1 (eager) again: each module at most once overall.
    calls2 = _count_calls(tiny, lambda: tiny.advance(state["s"]))
    assert any(m in calls2 for m in _block_modules(tiny, 1))
    assert not any(m in calls2 for m in tiny.classifiers[0].modules())
    assert not any(m in calls2 for m in tiny.stem.modules())
    if not lazy:
        assert not any(m in calls2 for m in tiny.blocks[0].modules())
    both = {m: calls.get(m, 0) + calls2.get(m, 0) for m in set(calls) | set(calls2)}
    assert max(both.values()) == 1  # nothing recomputed


def test_lazy_defers_finer_scales_of_the_last_layer(tiny):
    """Under lazy evaluation exit 1 skips block 1's finer-scale work that only
    later exits need; exit 2 does the scale next to the coarsest, and by the last
    exit every deferred unit has run exactly once."""
    x = torch.randn(1, 1, 28, 28)
    last = tiny.blocks[0][-1]
    fine_units = [u for s, u in zip(last.scales, last.units) if s < tiny.cfg.n_scales - 1]
    assert fine_units
    holder = {}
    calls = _count_calls(tiny, lambda: holder.setdefault("s", tiny.advance(tiny.start(x, lazy=True))[1]))
    assert not any(m in calls for u in fine_units for m in u.modules())
    def rest():
        state = holder["s"]
        for _ in range(tiny.num_exits - 1):
            _, state = tiny.advance(state)
            if state.exits_done == 2:
                holder["after2"] = dict(calls_rest)

    calls_rest: dict = {}
    handles = [m.register_forward_hook(lambda mod, i, o: calls_rest.__setitem__(mod, calls_rest.get(mod, 0) + 1))
               for m in tiny.modules()]
    with torch.no_grad():
        rest()
    for h in handles:
        h.remove()
    next_finest = fine_units[-1]  # scale S-2
    assert next_finest.regular[-1] in holder["after2"]
    assert all(calls_rest.get(u.regular[-1]) == 1 for u in fine_units)
