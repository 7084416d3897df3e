"""The compiled loops of ``backtrace.native``: contrastive routing and the add rule's split have the
same bits as the torch operations they replace (NaN, infinities, signed zeros, ties, empty sides,
subnormal sides, strided outputs, float32 and float64), so does a whole explain in every mode; the keyed Poisson weights equal the
numpy draws; and without a compiler, or switched off, everything falls back to the same answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import naive_rules as nr

from governance.backtrace import Backtrace, native
from governance.backtrace.context import safe_div
from governance.backtrace.rules import affine
from governance.stage import keys

DTYPES = (torch.float32, torch.float64)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test builds into its own cache folder, with no library carried over."""
    monkeypatch.setenv("GOVERNANCE_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.delenv("GOVERNANCE_NATIVE", raising=False)


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def _torch_route(Rp, Rn, t, p2, n2):
    """``affine._route`` with its compiled pass switched off (it consumes its 2P/2N buffers)."""
    outs = [torch.full_like(Rp, 7.0) for _ in range(4)]
    affine._route(Rp, Rn, t, p2.clone(), n2.clone(), *outs)
    return outs


def _awkward(shape, dtype, g):
    """Normal values with exact zeros of both signs mixed in."""
    v = torch.randn(shape, generator=g, dtype=dtype)
    m = torch.rand(shape, generator=g)
    v[m < 0.2] = 0.0
    v[(m >= 0.2) & (m < 0.25)] = -0.0
    return v


@pytest.mark.parametrize("dtype", DTYPES)
def test_route_has_the_bits_of_the_torch_operations(dtype):
    assert native.library(native._SOURCE, native._SIGNATURES) is not None, "cc builds the kernels here"
    g = torch.Generator().manual_seed(0)
    tiny = 1e-45 if dtype == torch.float32 else 5e-324
    for _ in range(60):
        n, units = (int(v) for v in torch.randint(1, 40, (2,), generator=g))
        shape = (n, units)
        Rp, Rn, t = (_awkward(shape, dtype, g) for _ in range(3))
        tie = torch.rand(shape, generator=g) < 0.2
        Rn[tie] = Rp[tie]
        p2, n2 = _awkward(shape, dtype, g).abs(), _awkward(shape, dtype, g).abs()
        p2[torch.rand(shape, generator=g) < 0.05] = tiny  # 1/tiny overflows: an empty side
        n2[torch.rand(shape, generator=g) < 0.05] = float("nan")
        t[torch.rand(shape, generator=g) < 0.05] = float("nan")
        want = _torch_route(Rp, Rn, t, p2, n2)
        # the merged layout of the rule: maps on the batch axis, a and b side by side per unit
        buf = torch.full((2 * n, 2 * units), 9.0, dtype=dtype)
        view = buf.view(2, n, 2, units)
        outs = [view[0, :, 0], view[0, :, 1], view[1, :, 0], view[1, :, 1]]
        p2_before, n2_before = p2.clone(), n2.clone()
        assert native.route(Rp, Rn, t, p2, n2, *outs)
        for w, got in zip(want, outs):
            assert torch.equal(_bits(w), _bits(got))
        assert torch.equal(_bits(p2), _bits(p2_before)) and torch.equal(_bits(n2), _bits(n2_before))


@pytest.mark.parametrize("dtype", DTYPES)
def test_share_has_the_bits_of_the_add_rules_torch_operations(dtype):
    """R |a| / (|a| + |b|) and R |b| / (|a| + |b|), 0 where the quotient is not finite: zeros of
    both signs (0/0), infinities and NaN in any operand, subnormal magnitudes, strided inputs."""
    g = torch.Generator().manual_seed(1)
    tiny = 1e-45 if dtype == torch.float32 else 5e-324
    for _ in range(60):
        n, units = (int(v) for v in torch.randint(1, 40, (2,), generator=g))
        R, a, b = (_awkward((n, 2 * units), dtype, g)[:, ::2] for _ in range(3))  # strided rows
        for v in (R, a, b):
            m = torch.rand(v.shape, generator=g)
            v[m < 0.04] = float("nan")
            v[(m >= 0.04) & (m < 0.08)] = float("inf")
            v[(m >= 0.08) & (m < 0.12)] = tiny
        mags = a.abs(), b.abs()
        s = safe_div(R, mags[0] + mags[1])
        want = (s * mags[0], s * mags[1])
        got = native.share(R, a, b)
        assert got is not None
        for w, v in zip(want, got):
            assert torch.equal(_bits(w), _bits(v))
    x = torch.randn(4, 5)
    assert native.share(x, x, x[:, :1]) is None  # a broadcast term: the torch ops take it
    assert native.share(x, x, x.double()) is None


def test_route_declines_what_it_cannot_lay_out_and_writes_nothing():
    x = torch.randn(4, 5)
    outs = [torch.zeros(4, 5) for _ in range(4)]
    assert not native.route(x.half(), x.half(), x.half(), x.half(), x.half(), *[o.half() for o in outs])
    assert not native.route(x, x, x[:, :1], x, x, *outs)  # a broadcast pre-activation
    odd = torch.zeros(5, 4).t()  # no row of contiguous elements shared with the others
    assert not native.route(x, x, x, x, x, odd, *outs[1:])
    assert all(int(o.count_nonzero()) == 0 for o in outs[1:])


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 8 * 8, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.relu(self.conv2(h) + h).flatten(1))


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 3))
    cnn = _CNN()
    cnn.bn.running_mean.uniform_(-0.5, 0.5)
    cnn.bn.running_var.uniform_(0.5, 2.0)
    return [(mlp, torch.randn(33, 12)), (cnn, torch.randn(5, 3, 8, 8))]


@pytest.mark.parametrize("mode", nr.MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_an_explain_has_the_same_bits_with_and_without_the_kernels(dtype, mode, monkeypatch):
    calls: dict[str, list] = {"route": [], "share": []}
    for name, real in (("route", native.route), ("share", native.share)):
        def spy(*args, _real=real, _name=name):
            out = _real(*args)
            calls[_name].append(out is not None and out is not False)
            return out

        monkeypatch.setattr(native, name, spy)
    with nr.one_thread():
        for model, x in _models():
            model = model.to(dtype).eval()
            x = x.to(dtype)
            monkeypatch.setenv("GOVERNANCE_NATIVE", "1")
            fused = Backtrace(model).explain(x, mode=mode, task="multiclass-classification")
            if mode == "contrastive":
                assert any(calls["route"]), "the routing went through the compiled pass"
            if isinstance(model, _CNN):
                assert any(calls["share"]), "the residual add went through the compiled pass"
            for v in calls.values():
                v.clear()
            monkeypatch.setenv("GOVERNANCE_NATIVE", "0")
            with monkeypatch.context() as m:
                m.setattr(affine, "BLOCK_UNITS", 64)  # the torch routing over several blocks
                plain = Backtrace(model).explain(x, mode=mode, task="multiclass-classification")
            pairs = ((fused, plain), (fused.positive, plain.positive), (fused.negative, plain.negative)) \
                if mode == "contrastive" else ((fused, plain),)
            for got, want in pairs:
                assert torch.equal(_bits(got.input_relevance), _bits(want.input_relevance))
                assert list(got.layer_relevance) == list(want.layer_relevance)
                for name, value in want.layer_relevance.items():
                    assert torch.equal(_bits(got.layer_relevance[name]), _bits(value))


@pytest.mark.parametrize(("n", "n_bootstrap"), [(8192, 200), (1, 1), (7, 3), (33, 5), (5, 4)])
def test_poisson_weights_equal_the_numpy_draws(n, n_bootstrap, monkeypatch):
    ids = np.random.default_rng(n).integers(-(2 ** 62), 2 ** 62, size=n)
    k = keys.sample_keys(ids)
    fused = keys.poisson_weights(k, 11, n_bootstrap)
    assert native._libs, "the compiled draws ran"
    monkeypatch.setenv("GOVERNANCE_NATIVE", "0")
    plain = keys.poisson_weights(k, 11, n_bootstrap)
    assert fused.shape == plain.shape == (n_bootstrap, n)
    assert np.array_equal(fused, plain)
    if n * n_bootstrap > 10_000:  # Poisson(1): mean 1
        assert abs(plain.mean() - 1.0) < 0.01


def test_without_a_compiler_everything_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert native.library(native._SOURCE, native._SIGNATURES) is None
    x = torch.randn(3, 4)
    outs = [torch.zeros(3, 4) for _ in range(4)]
    assert not native.route(x, x, x, x.abs(), x.abs(), *outs)
    k = keys.sample_keys(np.arange(10))
    got = keys.poisson_weights(k, 0, 6)
    monkeypatch.setenv("GOVERNANCE_NATIVE", "0")
    assert np.array_equal(got, keys.poisson_weights(k, 0, 6))
    assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").glob("*.so"))


def test_the_library_is_built_once_into_the_cache_and_loaded_again(tmp_path):
    first = native.library(native._SOURCE, native._SIGNATURES)
    built = sorted((tmp_path / "kernels").glob("governance_kernels_*.so"))
    assert first is not None and len(built) == 1
    assert not [p for p in (tmp_path / "kernels").iterdir() if p.suffix != ".so"], "no build leftovers"
    stamp = built[0].stat().st_mtime_ns
    native._libs.clear()
    assert native.library(native._SOURCE, native._SIGNATURES) is not None
    assert built[0].stat().st_mtime_ns == stamp, "loaded from the cache, not rebuilt"
