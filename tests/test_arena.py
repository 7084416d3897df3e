"""The engine's CPU memory arena (governance/backtrace/arena.py): torch's CPU allocator while an
explain call runs, keeping large blocks between calls. It may only change where tensors live,
never a value, and it must hand memory back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from torch import nn

from governance.backtrace import Backtrace, arena
from governance.tasks import MODES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Net(nn.Module):
    """Convolutions with batch norm, a residual add, overlapping max pooling and a linear head:
    activations of 2-8 MiB at batch 32, so the rules' tensors come from the arena."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1))
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.head = nn.Linear(16 * 32 * 32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        return self.head(self.pool(h).flatten(1))


def _model_and_batch() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = _Net()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval(), torch.randn(32, 3, 64, 64)


def _explain_all(bt: Backtrace, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    out = {}
    for mode in MODES:
        e = bt.explain(x, mode=mode, task="multiclass-classification")
        out[mode] = (e.input_relevance.clone(), {k: v.clone() for k, v in e.layer_relevance.items()})
    return out


def _fill_idle_with_nan() -> None:
    """Blocks of 1 to 32 MiB, written with NaN and freed inside the arena: later tensors from
    these blocks start as NaN where fresh memory starts as zeros."""
    with arena.scope() as on:
        assert on
        held = [torch.full((size << 18,), float("nan")) for size in (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32)]
        del held


def test_the_arena_builds_where_there_is_a_cxx_compiler():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine")
    assert arena.available(), "c++ builds the arena against torch's c10 here"


@pytest.mark.skipif(not arena.available(), reason="the arena is not built here")
def test_relevance_has_the_same_bits_in_and_out_of_the_arena(monkeypatch):
    model, x = _model_and_batch()
    with monkeypatch.context() as m:
        m.setenv("GOVERNANCE_ARENA", "0")
        assert not arena.available()
        plain = _explain_all(Backtrace(model), x)
    bt = Backtrace(model)
    before = arena.stats()
    for _ in range(2):  # the second pass takes blocks the first one freed
        _fill_idle_with_nan()
        got = _explain_all(bt, x)
        for mode in MODES:
            assert torch.equal(got[mode][0], plain[mode][0]), mode
            assert got[mode][1].keys() == plain[mode][1].keys()
            for k, v in plain[mode][1].items():
                assert torch.equal(got[mode][1][k], v), (mode, k)
    after = arena.stats()
    assert after.hits > before.hits, "the explain calls took blocks from the arena"


@pytest.mark.skipif(not arena.available(), reason="the arena is not built here")
def test_a_repeated_call_reuses_the_arenas_blocks():
    model, x = _model_and_batch()
    bt = Backtrace(model)
    for _ in range(2):
        bt.explain(x, mode="contrastive", task="multiclass-classification")
    warm = arena.stats()
    bt.explain(x, mode="contrastive", task="multiclass-classification")
    again = arena.stats()
    assert again.misses == warm.misses, "a call of the same shapes allocated new blocks"
    assert again.hits > warm.hits
    assert again.held <= 2 * again.peak, "idle blocks beyond the peak in use are given back"


@pytest.mark.skipif(not arena.available(), reason="the arena is not built here")
def test_torchs_allocator_is_back_outside_the_call():
    model, x = _model_and_batch()
    Backtrace(model).explain(x, task="multiclass-classification")
    before = arena.stats()
    big = torch.ones(8 << 20)  # 32 MiB after the call: torch's own allocator
    after = arena.stats()
    assert (after.hits, after.misses, after.in_use) == (before.hits, before.misses, before.in_use)
    del big


@pytest.mark.skipif(not arena.available(), reason="the arena is not built here")
def test_the_profiler_sees_the_arenas_allocations():
    """The benchmark's memory table sums the profiler's memory events: the arena reports each
    allocation and free as torch's allocator does."""
    from torch.profiler import ProfilerActivity, profile

    def events(on: bool) -> list[tuple[str, int, int]]:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, arena.scope(on) as got:
            assert got is on
            t = torch.ones(1 << 20)  # 4 MiB: from the arena when it is on
            del t
        return [(e.name, e.cpu_memory_usage, e.self_cpu_memory_usage) for e in prof.events()
                if e.cpu_memory_usage or e.self_cpu_memory_usage]

    assert events(True) == events(False)
    assert ("[memory]", -(4 << 20), -(4 << 20)) in events(True)


@pytest.mark.skipif(not arena.available(), reason="the arena is not built here")
def test_threads_explaining_at_once_get_the_same_bits():
    model, x = _model_and_batch()
    alone = Backtrace(model).explain(x, mode="contrastive", task="multiclass-classification").input_relevance
    got: dict[int, torch.Tensor] = {}
    bts = [Backtrace(model) for _ in range(3)]
    for bt in bts:  # graph capture (torch.export) one at a time: it is not thread-safe
        bt.explain(x, mode="contrastive", task="multiclass-classification")

    def run(i: int) -> None:
        got[i] = bts[i].explain(x, mode="contrastive", task="multiclass-classification").input_relevance

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 3
    for v in got.values():
        assert torch.equal(v, alone)


@pytest.mark.skipif(not arena.available(), reason="the arena is not built here")
def test_idle_memory_goes_back_when_the_last_backtrace_goes():
    """In a fresh process, so that no other test's Backtrace holds the arena."""
    script = textwrap.dedent("""
        import gc, torch
        from governance.backtrace import Backtrace, arena
        from tests.test_arena import _model_and_batch
        model, x = _model_and_batch()
        bt = Backtrace(model)
        for _ in range(2):
            e = bt.explain(x, mode="contrastive", task="multiclass-classification")
        s = arena.stats()
        assert s.holders == 1 and s.idle > 0 and s.in_use > 0, s
        arena.release()
        s = arena.stats()
        assert s.idle == 0 and s.held == s.in_use, s
        e = bt.explain(x, mode="default", task="multiclass-classification")
        del bt
        gc.collect()
        s = arena.stats()
        assert s.holders == 0 and s.idle == 0 and s.in_use > 0, s
        del e
        gc.collect()
        s = arena.stats()
        assert s.held == 0 and s.in_use == 0, s
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_switched_off_the_arena_changes_nothing(monkeypatch):
    monkeypatch.setenv("GOVERNANCE_ARENA", "0")
    assert arena.stats() is None and not arena.available()
    with arena.scope() as on:
        assert on is False
    model, x = _model_and_batch()
    e = Backtrace(model).explain(x[:4], task="multiclass-classification")
    assert torch.isfinite(e.input_relevance).all()
