"""The compiled loops of ``backtrace.native``: contrastive routing, the add rule's split, the default
rule's quotient, pos_neg2's sides, the identity split's sums and mix, the books' row adds and the
saturation and sign probes have the same bits (or decisions) as the torch operations they replace (NaN, infinities, signed zeros, ties, empty sides, subnormal sides, strided
outputs, float32 and float64), so does a whole explain in every mode (its books within float64
rounding); the books' row sums are float64 sums that do not depend on the batch; the keyed Poisson
weights equal the numpy draws; and without a compiler, or switched off, everything falls back to
the same answer."""

from __future__ import annotations

import math

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


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_quotient_has_the_bits_of_the_default_rules_torch_operations(dtype):
    g = torch.Generator().manual_seed(1)
    tiny = 1e-45 if dtype == torch.float32 else 5e-324
    layouts = [((37, 11), (11,)), ((5, 6, 4, 3), (6, 1, 1)), ((3, 7, 9), (9,)), ((8, 13), None),
               ((2, 3, 5, 4, 4), (5, 1, 1)), ((4, 6, 3, 3), (1, 6, 1, 1))]
    for shape, bshape in layouts * 8:
        S = _awkward(shape, dtype, g).abs()
        R = _awkward(shape, dtype, g)
        flat_s, flat_r = S.view(-1), R.view(-1)
        flat_s[::17] = float("inf")
        flat_s[3::19] = tiny
        flat_r[::23] = float("nan")
        b = None
        if bshape is not None:
            b = torch.rand(bshape, generator=g, dtype=dtype)
            b.view(-1)[0] = 0.0
        want = safe_div(R, S.clone().add_(b) if b is not None else S.clone())
        got = S.clone()
        absorbed = native.bias_quotient(R, got, b)
        assert absorbed is not None
        assert torch.equal(_bits(got), _bits(want))
        if b is None:
            assert absorbed.numel() == 0
            continue
        unit_b = b  # one value per unit: (C, 1, 1) and (1, C, 1, 1) alike
        while unit_b.dim() > 1 and unit_b.shape[0] == 1:
            unit_b = unit_b[0]
        axis = want.dim() - unit_b.dim()
        inner = math.prod(want.shape[axis + 1:])
        summed = want.to(torch.float64).reshape(-1, unit_b.shape[0], inner).sum(2)
        ref = (summed * unit_b.reshape(-1).to(torch.float64)).sum(1)
        assert absorbed.dtype == torch.float64 and absorbed.shape == ref.shape
        assert torch.allclose(absorbed, ref, rtol=1e-12, atol=0.0, equal_nan=True)


def test_bias_quotient_declines_what_it_cannot_lay_out_and_writes_nothing():
    S, R = torch.rand(6, 4) + 1.0, torch.randn(6, 4)
    before = S.clone()
    assert native.bias_quotient(R, S.t(), torch.rand(6)) is None  # not contiguous
    assert native.bias_quotient(R.double(), S, torch.rand(4)) is None  # two dtypes
    assert native.bias_quotient(R, S, torch.rand(6, 1)) is None  # a bias along the batch
    assert native.bias_quotient(R, S, torch.rand(3)) is None  # not one value per unit
    assert native.bias_quotient(R, S, torch.rand(4).double()) is None
    assert torch.equal(S, before)


def _torch_sides(S, D, b, frows):
    """pos_neg2's torch operations: (2P, 2N, flagged, flag rows)."""
    kappa = affine.PRECISION_MARGIN
    m = D.abs().add_(S, alpha=-(1.0 - 2.0 * kappa))
    if b is not None:
        m.add_(b, alpha=2.0 * kappa)
    flagged = m.numel() > 0 and bool(m.max() > 0)
    rows = m.reshape(frows, -1).amax(1).gt(0)
    return torch.add(S, D), S - D, flagged, rows


@pytest.mark.parametrize("dtype", DTYPES)
def test_sides_have_the_bits_and_decisions_of_pos_neg2s_torch_operations(dtype):
    g = torch.Generator().manual_seed(4)
    kappa = affine.PRECISION_MARGIN
    layouts = [((37, 11), (11,), 37), ((5, 6, 4, 3), (6, 1, 1), 5), ((3, 7, 9), (9,), 3), ((8, 13), None, 8),
               ((4, 6, 3, 3), (1, 6, 1, 1), 4), ((6, 5), (5,), 1), ((3, 7, 9), (9,), 21)]
    flagged_some = False
    for shape, bshape, frows in layouts * 6:
        D = _awkward(shape, dtype, g)
        S = D.abs() + torch.rand(shape, generator=g, dtype=dtype) * 3.0  # |D| <= S, as S = P + N
        one_sided = torch.rand(shape, generator=g) < 0.05
        S[one_sided] = D[one_sided].abs()  # one side empty: flagged
        b = torch.rand(bshape, generator=g, dtype=dtype) if bshape is not None else None
        P2, N2, flagged, rows = _torch_sides(S, D, b, frows)
        got_s = S.clone()
        out = native.sides(got_s, D, b, -(1.0 - 2.0 * kappa), 2.0 * kappa, frows)
        assert out is not None
        got_p, count, flags = out
        assert torch.equal(_bits(got_p), _bits(P2)) and torch.equal(_bits(got_s), _bits(N2))
        assert (count > 0) is flagged and torch.equal(flags.bool(), rows) and count == int(rows.sum())
        flagged_some |= flagged
    assert flagged_some
    # at the test's threshold (S = |D| / (1 - 2κ)) the rounding decides: one fused multiply-add or
    # a rounded product and sum flag different units; the kernel rounds as torch does here
    D = torch.randn(4099, 1, generator=g, dtype=dtype)  # one unit per row: a flag per element
    S = D.abs() / (1.0 - 2.0 * kappa)
    for bias in (None, torch.full((1,), 1e-30, dtype=dtype)):
        P2, N2, flagged, rows = _torch_sides(S.clone(), D, bias, 4099)
        got = native.sides(S.clone(), D, bias, -(1.0 - 2.0 * kappa), 2.0 * kappa, 4099)
        assert torch.equal(got[2].bool(), rows) and 0 < got[1] < 4099
    S, D = torch.rand(4, 3, dtype=dtype) + 1.0, torch.zeros(4, 3, dtype=dtype)
    D[0, 0] = float("nan")  # the torch code's max is NaN: nothing flagged
    D[1, 1] = 5.0
    assert native.sides(S.clone(), D, None, -(1.0 - 2.0 * kappa), 2.0 * kappa, 4)[1] == -1
    assert _torch_sides(S, D, None, 4)[2] is False
    assert native.sides(S, D.t().contiguous().t(), None, -0.9, 0.1, 4) is None  # not contiguous
    before = S.clone()
    assert native.sides(S, D, torch.rand(4, dtype=dtype), -0.9, 0.1, 4) is None  # a bias along the batch
    assert native.sides(S, D, None, -0.9, 0.1, 5) is None  # rows that do not divide the tensor
    assert torch.equal(S, before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_diff_and_mix_have_the_bits_of_the_identity_splits_torch_operations(dtype):
    g = torch.Generator().manual_seed(5)
    for shape, maps in (((7, 13), 2), ((3, 4, 5), 1), ((9, 2, 3, 3), 2)):
        a, b = _awkward((maps * shape[0], *shape[1:]), dtype, g), _awkward((maps * shape[0], *shape[1:]), dtype, g)
        b.view(-1)[::11] = float("inf")
        want_a = a.clone().add_(b)
        want_b = torch.add(want_a, b, alpha=-2.0)
        assert native.sum_diff(a, b)
        assert torch.equal(_bits(a), _bits(want_a)) and torch.equal(_bits(b), _bits(want_b))
        x = _awkward(shape, dtype, g)
        gg, hh = _awkward(a.shape, dtype, g), _awkward(a.shape, dtype, g)
        want = gg.clone().view(maps, *shape).mul_(x.abs()).add_(hh.clone().view(maps, *shape).mul_(x))
        g2, h2 = gg.clone(), hh.clone()
        assert native.mix(gg, hh, x.abs(), x) and native.mix(g2, h2, None, x)  # |x| given, or taken in the pass
        assert torch.equal(_bits(gg), _bits(want.view(gg.shape))) and torch.equal(_bits(g2), _bits(gg))
    x = torch.randn(4, 6, dtype=dtype)
    assert not native.mix(torch.zeros(8, 6, dtype=dtype), torch.zeros(8, 6, dtype=dtype), x.abs(), x.t().contiguous().t())
    assert not native.sum_diff(torch.zeros(3, dtype=dtype), torch.zeros(4, dtype=dtype))


def test_add_rows_has_the_bits_of_index_add():
    g = torch.Generator().manual_seed(6)
    src = torch.randn(25, 17, generator=g, dtype=torch.float64) * torch.logspace(-8, 8, 17, dtype=torch.float64)
    index, take = torch.randint(0, 9, (40,), generator=g), torch.randint(0, 25, (40,), generator=g)
    want = torch.zeros(9, 17, dtype=torch.float64).index_add_(0, index, src[take])
    got = torch.zeros(9, 17, dtype=torch.float64)
    assert native.add_rows(got, index, src, take)
    assert torch.equal(_bits(got), _bits(want))
    assert not native.add_rows(got, index, src.float(), take)
    assert not native.add_rows(got, index[:-1], src, take)


@pytest.mark.parametrize("dtype", DTYPES)
def test_probes_decide_as_the_torch_operations(dtype):
    g = torch.Generator().manual_seed(2)
    for _ in range(60):
        shape = tuple(int(v) for v in torch.randint(1, 30, (2,), generator=g))
        t, R = _awkward(shape, dtype, g), _awkward(shape, dtype, g)
        pick = torch.rand(shape, generator=g)
        R[pick < 0.5] = 0.0  # relevance only on some units
        if bool(pick[0, 0] < 0.1):
            R.view(-1)[-1] = float("nan")
        if bool(pick[0, 0] > 0.9):
            R.view(-1)[0] = float("inf")
        for bound in (0.0, -0.5, 1.0):
            for below in (True, False):
                compare = torch.lt if below else torch.gt
                want = int(torch.count_nonzero(compare(t, bound).to(dtype).mul_(R))) > 0
                assert native.any_beyond(t, R, bound, below) is want
        x = _awkward(shape, dtype, g)
        for v in (x, x.abs(), x.abs().index_fill_(1, torch.tensor([0]), float("nan"))):
            assert native.all_nonnegative(v) is bool(v.min() >= 0)
    assert native.any_beyond(torch.zeros(3, 4), torch.ones(4, 3).t(), 0.0, True) is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_sums_add_each_row_in_float64_whatever_the_batch(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, 7, generator=g, dtype=dtype) * torch.logspace(-3, 3, 7, dtype=dtype)
    ref = x.to(torch.float64).reshape(40, -1).sum(1)
    got = native.row_sums(x, 40)
    assert got.dtype == torch.float64 and torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(native.row_sums(x, 40, absolute=True), x.to(torch.float64).abs().reshape(40, -1).sum(1),
                          rtol=1e-12)
    w = torch.randn(21, generator=g, dtype=torch.float64)
    assert torch.allclose(native.row_sums(x, 40, weights=w), x.to(torch.float64).reshape(40, -1) @ w,
                          rtol=1e-10, atol=1e-10)
    # a row's sum has the same bits in any batch that holds it
    assert torch.equal(native.row_sums(x[7:9].contiguous(), 2), got[7:9])
    assert native.row_sums(x, 39) is None and native.row_sums(x.transpose(0, 1), 3) is None


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
    calls: dict[str, list] = {name: [] for name in ("route", "share", "bias_quotient", "any_beyond", "sides",
                                                     "sum_diff", "mix", "add_rows")}
    for name in calls:
        real = getattr(native, name)

        def spy(*args, _real=real, _name=name):
            out = _real(*args)  # route: False when declined; the others: None
            calls[_name].append(out is not None and (out is not False or _name == "any_beyond"))
            return out

        monkeypatch.setattr(native, name, spy)
    with nr.one_thread():
        for model, x in _models():
            model = model.to(dtype).eval()
            x = x.to(dtype)
            monkeypatch.setenv("GOVERNANCE_NATIVE", "1")
            fused = Backtrace(model).explain(x, mode=mode, task="multiclass-classification")
            assert any(calls["add_rows"]), "the books went through the compiled pass"
            if mode == "contrastive":
                assert any(calls["route"]), "the routing went through the compiled pass"
                assert any(calls["sum_diff"]) and any(calls["mix"]), "the identity split went through the compiled passes"
            if mode == "contrastive" and isinstance(model, _CNN):
                assert any(calls["sides"]), "pos_neg2's sides went through the compiled pass"
            if isinstance(model, _CNN):
                assert any(calls["share"]), "the residual add went through the compiled pass"
            if mode != "contrastive":
                assert any(calls["bias_quotient"]), "the default rule's quotient went through the compiled pass"
                assert any(calls["any_beyond"]), "the saturation probe went through the compiled pass"
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
                for name, book in want.books.items():  # the books' sums: float64 rounding apart
                    for field in ("relevance_in", "relevance_out", "abs_relevance_in", "bias_absorbed"):
                        assert torch.allclose(getattr(got.books[name], field), getattr(book, field),
                                              rtol=1e-5, atol=1e-9), (name, field)


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
