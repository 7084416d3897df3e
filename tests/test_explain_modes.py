"""``Backtrace.explain_modes``: several modes over one recorded forward pass, each bit-identical
to its own ``explain`` call (inputs, layers, books, seeds, extras, R+ and R-), in float32 and
float64, on an MLP, a CNN with batch norm, max pooling and a residual add, and an attention
model; and the forward pass is recorded once."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn

import naive_rules as nr

from governance.backtrace import Backtrace, Explanation
from governance.backtrace import engine as engine_mod

MODES = ("signed", "default", "contrastive")


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    with nr.one_thread():
        yield


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = self.pool(torch.relu(self.bn(self.conv(x))))
        h = torch.relu(h + self.conv2(h))
        return torch.softmax(self.fc(self.gap(h).flatten(1)), dim=-1)


class _Attention(nn.Module):
    def __init__(self, d=8, heads=2):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, 3)
        self.h = heads

    def forward(self, x, mask):
        n, t, d = x.shape
        split = lambda y: y.view(n, t, self.h, d // self.h).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        s = q @ k.transpose(-1, -2) / math.sqrt(d // self.h)
        s = s.masked_fill(~mask[:, None, None, :].bool(), torch.finfo(s.dtype).min)
        o = torch.softmax(s, -1) @ v
        o = self.o(o.transpose(1, 2).reshape(n, t, d))
        return self.head(o.mean(1))


def _case(name: str, dtype: torch.dtype):
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(4)
    if name == "mlp":
        m = nn.Sequential(nn.Linear(78, 39), nn.ReLU(), nn.Linear(39, 19), nn.ReLU(),
                          nn.Linear(19, 1), nn.Sigmoid())
        with torch.no_grad():
            m[4].weight.mul_(30.0)  # saturate the sigmoid on both sides for some samples
        x = torch.randn(64, 78, generator=g)
        task = "binary-classification"
    elif name == "cnn":
        m = _CNN()
        with torch.no_grad():
            m.bn.running_mean.uniform_(-0.5, 0.5)
            m.bn.running_var.uniform_(0.5, 2.0)
        x = torch.randn(5, 3, 8, 8, generator=g)
        task = "multiclass-classification"
    else:
        m = _Attention()
        mask = torch.ones(3, 6, dtype=torch.long)
        mask[1, -2:] = 0
        x = {"x": torch.randn(3, 6, 8, generator=g).to(dtype), "mask": mask}
        return m.to(dtype).eval(), x, "multiclass-classification"
    return m.to(dtype).eval(), x.to(dtype), task


def _same(a, b, where: str) -> None:
    """Bit-identical values, recursively through explanations, books, dicts and tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max diff {(a.double() - b.double()).abs().max()}"
    elif dataclasses.is_dataclass(a):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            _same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, (dict,)) or (hasattr(a, "keys") and hasattr(a, "__getitem__")):
        assert list(a.keys()) == list(b.keys()), where
        for k in a.keys():
            _same(a[k], b[k], f"{where}[{k!r}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["mlp", "cnn", "attention"])
def test_explain_modes_equals_separate_explain_calls(name, dtype):
    model, x, task = _case(name, dtype)
    separate = {m: Backtrace(model).explain(x, mode=m, task=task, multiplier=100.0) for m in MODES}
    together = Backtrace(model).explain_modes(x, modes=MODES, task=task, multiplier=100.0)
    assert list(together) == list(MODES)
    for m in MODES:
        assert isinstance(together[m], Explanation) and together[m].mode == m
        _same(together[m], separate[m], f"{name}/{dtype}/{m}")
    assert together["contrastive"].positive is not None  # R+ and R- were compared too


def test_one_recording_for_all_modes(monkeypatch):
    model, x, task = _case("mlp", torch.float64)
    calls = []
    real = engine_mod.record

    def counting(gm, flat):
        calls.append(1)
        return real(gm, flat)

    monkeypatch.setattr(engine_mod, "record", counting)
    bt = Backtrace(model)
    out = bt.explain_modes(x, modes=MODES, task=task)
    assert len(calls) == 1 and set(out) == set(MODES)
    bt.explain(x, mode="default", task=task)
    assert len(calls) == 2


def test_explain_modes_arguments():
    model, x, task = _case("mlp", torch.float64)
    bt = Backtrace(model)
    one = bt.explain_modes(x, modes="default", task=task)  # a single mode as a string
    assert list(one) == ["default"]
    _same(one["default"], bt.explain(x, task=task), "single")
    twice = bt.explain_modes(x, modes=("default", "default", "signed"), task=task)
    assert list(twice) == ["default", "signed"]
    with pytest.raises(ValueError, match="unknown mode 'bogus'"):
        bt.explain_modes(x, modes=("default", "bogus"), task=task)
    with pytest.raises(ValueError, match="at least one mode"):
        bt.explain_modes(x, modes=(), task=task)


def test_target_and_task_inference_shared():
    """Without a task or target, every mode infers the same task and explains the same class."""
    model, x, _ = _case("cnn", torch.float64)
    out = Backtrace(model).explain_modes(x)
    tasks = {e.task for e in out.values()}
    assert tasks == {"multiclass-classification"}
    t0 = out["signed"].target
    for e in out.values():
        assert torch.equal(e.target, t0)
    ref = Backtrace(model).explain(x, mode="contrastive")
    _same(out["contrastive"], ref, "inferred")


def test_sign_of_each_layer_input_checked_once_for_all_modes(monkeypatch):
    """Facts about recorded values (is a layer's input >= 0) are worked out once per recording,
    not once per mode."""
    from governance.backtrace.rules import affine

    model, x, task = _case("mlp", torch.float64)
    calls = []
    real = affine.is_nonnegative

    def counting(t):
        calls.append(t.shape)
        return real(t)

    monkeypatch.setattr(affine, "is_nonnegative", counting)
    Backtrace(model).explain_modes(x, modes=MODES, task=task)
    assert len(calls) == 3  # one per Linear, for three modes


def test_first_call_equals_later_calls_with_two_threads(monkeypatch):
    """A small model records on one thread from its second call on; the first call's walk
    uses a recording made the same way, so the first explanation has the same bits as the
    later ones."""
    model, x, task = _case("mlp", torch.float32)
    threads = []
    real = engine_mod.record

    def spying(gm, flat):
        threads.append(torch.get_num_threads())
        return real(gm, flat)

    monkeypatch.setattr(engine_mod, "record", spying)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        bt = Backtrace(model)
        first = bt.explain_modes(x, modes=MODES, task=task)
        assert threads == [2, 1]  # sized with the caller's threads, then recorded as later calls
        again = bt.explain_modes(x, modes=MODES, task=task)
        assert threads == [2, 1, 1]
    finally:
        torch.set_num_threads(old)
    for m in MODES:
        _same(first[m], again[m], f"first/again {m}")


def test_iter_modes_walks_each_mode_when_asked(monkeypatch):
    """iter_modes: one recording, each mode walked only when the caller takes it, the same
    explanations as explain_modes; its arguments are checked when it is called."""
    model, x, task = _case("cnn", torch.float32)
    bt = Backtrace(model)
    walked: list[str] = []
    real = bt._walk

    def walk(*args, **kwargs):
        walked.append(args[7])  # the mode
        return real(*args, **kwargs)

    monkeypatch.setattr(bt, "_walk", walk)
    steps = bt.iter_modes(x, modes=MODES, task=task)
    assert walked == []
    mode, first = next(steps)
    assert (mode, walked) == ("signed", ["signed"])
    rest = dict(steps)
    assert walked == list(MODES) and list(rest) == ["default", "contrastive"]
    ref = Backtrace(model).explain_modes(x, modes=MODES, task=task)
    for m, e in {"signed": first, **rest}.items():
        _same(e, ref[m], f"iter/{m}")
    with pytest.raises(ValueError, match="unknown mode"):
        bt.iter_modes(x, modes=("bogus",))
