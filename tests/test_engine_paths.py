"""The fast paths of the engine (issue 14) against the naive rules of spec sections 3, 3b, 4 and 6.

The affine rules take P and N from S = |W||x| and the recorded W x, recompute units whose
smaller side is tiny (and every row holding one) from one-signed sums, and split relevance by
one of three routes: one stacked product for x >= 0, the |W| / W identity for mixed signs, the
one-signed products where the identity would cancel. Each test builds a layer on which the route
under test runs, checks that it ran (a spy on the engine's own decision), and compares the
relevance with the naive per-unit loops of ``naive_rules.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import naive_rules as nr
from naive_rules import DTYPE, MODES

from governance.backtrace.rules import affine, attention


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    with nr.one_thread():
        yield


def _task(mode):
    return "bbox-regression" if mode == "contrastive" else "regression"


@pytest.fixture
def routes(monkeypatch):
    """What the affine rule decided, per call: nonneg input, rows recomputed, one-signed split."""
    seen: list[dict] = []
    orig_pos_neg, orig_split = affine.pos_neg2, affine.split_by_sign

    def pos_neg2(u, x, S, nonneg, bias_abs):
        P2, N2, rows = orig_pos_neg(u, x, S, nonneg, bias_abs)
        total = int(torch.tensor(x.shape[:u.row_dims]).prod()) if u.row_dims else 1
        seen.append({"nonneg": nonneg, "rows": None if rows is None else len(rows), "of": total})
        return P2, N2, rows

    def split_by_sign(u, x, nonneg, rows):
        out = orig_split(u, x, nonneg, rows)
        seen[-1]["by_sign"] = out
        return out

    monkeypatch.setattr(affine, "pos_neg2", pos_neg2)
    monkeypatch.setattr(affine, "split_by_sign", split_by_sign)
    return seen


def _tokens_with_one_signed_units(n=3, t=5, d=24, seed=0):
    """Mixed-sign tokens; token 0 of every sample has a single non-zero input, so every unit of
    that row has one contribution (one side exactly empty): those rows must be recomputed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d, generator=g, dtype=DTYPE)
    x[:, 0] = 0.0
    x[:, 0, 3] = 1.5
    return x


@pytest.mark.parametrize("mode", MODES)
def test_mixed_inputs_identity_and_recomputed_rows(mode, routes):
    """Linear + tanh on (N, T, d) tokens with mixed signs: most rows take the |W| / W identity,
    the rows with one-signed units are recomputed exactly; both match the naive loops."""
    torch.manual_seed(1)
    lin = nn.Linear(24, 16).to(DTYPE)
    x = _tokens_with_one_signed_units()
    model = nn.Sequential(lin, nn.Tanh()).eval()
    with torch.no_grad():
        y = model(x)
    R, _ = nr.seed(_task(mode), y, mode=mode)
    flat = nr._each_map(R, mode, lambda r: r.reshape(-1, 16))
    exp_R = nr._each_map(nr.linear_rule(x.reshape(-1, 24), lin.weight, lin.bias, flat, mode, "tanh").relevance,
                         mode, lambda r: r.reshape(x.shape))
    nr.check_engine(model, x, mode, exp_R, f"tokens identity {mode}", task=_task(mode))
    if mode == "contrastive":
        (r,) = routes
        assert not r["nonneg"] and not r["by_sign"]
        assert r["of"] == 15 and 3 <= r["rows"] < 15  # token 0 of each sample at least


@pytest.mark.parametrize("mode", MODES)
def test_nonnegative_inputs_one_stacked_product(mode, routes):
    """ReLU -> Conv2d -> tanh: the convolution's input is >= 0, so the split is one product on
    the stacked coefficients of both sides (and both maps)."""
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 5, 3, padding=1).to(DTYPE)
    x = torch.randn(2, 3, 6, 5, dtype=DTYPE)
    model = nn.Sequential(nn.ReLU(), conv, nn.Tanh(), nn.Flatten()).eval()
    with torch.no_grad():
        y = model(x)
        t = conv(x.relu())
    R, _ = nr.seed(_task(mode), y, mode=mode)
    R = nr._each_map(R, mode, lambda r: r.reshape(t.shape))
    exp_R = nr.conv_rule(x.relu(), conv.weight, conv.bias, R, mode, "tanh", padding=1).relevance
    nr.check_engine(model, x, mode, exp_R, f"relu conv {mode}", task=_task(mode))
    if mode == "contrastive":
        (r,) = routes
        assert r["nonneg"] and r["by_sign"]


@pytest.mark.parametrize("mode", MODES)
def test_small_fan_in_every_row_recomputed(mode, routes):
    """A 2-channel 3x3 convolution on mixed-sign images: its border units have few inputs, so
    every row holds a unit with a tiny side and the whole layer takes the one-signed products
    (inputs of both signs and both sides stacked into one product)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 4, 3, padding=1).to(DTYPE)
    x = torch.randn(3, 2, 5, 5, dtype=DTYPE)
    x[:, :, 0, 0] = 0.0
    x[:, 1, 0, 1] = 0.0
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten()).eval()
    with torch.no_grad():
        y = model(x)
        t = conv(x)
    R, _ = nr.seed(_task(mode), y, mode=mode)
    R = nr._each_map(R, mode, lambda r: r.reshape(t.shape))
    exp_R = nr.conv_rule(x, conv.weight, conv.bias, R, mode, "tanh", padding=1).relevance
    nr.check_engine(model, x, mode, exp_R, f"small fan-in conv {mode}", task=_task(mode))
    if mode == "contrastive":
        (r,) = routes
        assert not r["nonneg"] and r["by_sign"] and r["rows"] == r["of"]


class BatchedConstant(nn.Module):
    """x @ C with a constant C per sample: no single rows can be recomputed (row_dims 0)."""

    def __init__(self, c: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("c", c)

    def forward(self, x):
        return torch.tanh(x @ self.c)


@pytest.mark.parametrize("mode", MODES)
def test_matmul_with_batched_constant(mode, routes):
    g = torch.Generator().manual_seed(4)
    c = torch.randn(2, 6, 4, generator=g, dtype=DTYPE)
    x = torch.randn(2, 3, 6, generator=g, dtype=DTYPE)
    x[0, 0] = 0.0
    x[0, 0, 2] = -1.0  # one-signed units in sample 0
    model = BatchedConstant(c).eval()
    with torch.no_grad():
        y = model(x)
    R, _ = nr.seed(_task(mode), y, mode=mode)
    parts = [nr.linear_rule(x[b], c[b].T, None, nr._each_map(R, mode, lambda r: r[b]), mode, "tanh").relevance
             for b in range(2)]
    if mode == "contrastive":
        exp_R = (torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    else:
        exp_R = torch.stack(parts)
    nr.check_engine(model, x, mode, exp_R, f"batched constant {mode}", task=_task(mode))
    if mode == "contrastive":
        (r,) = routes
        assert r["by_sign"]  # not separable: never the cancelling identity


@pytest.mark.parametrize("mode", MODES)
def test_float32_identity_within_rounding(mode, routes):
    """A float32 Linear(48 -> 32) on mixed inputs (the identity route) against the float64 naive
    loops on the same float32 values: float32 round-off only."""
    torch.manual_seed(5)
    lin = nn.Linear(48, 32)
    x = torch.randn(16, 48)
    model = nn.Sequential(lin, nn.Tanh()).eval()
    with torch.no_grad():
        y = model(x)
    R, _ = nr.seed(_task(mode), y, mode=mode)
    exp_R = nr.linear_rule(x.double(), lin.weight.double(), lin.bias.double(), R, mode, "tanh").relevance
    nr.check_engine(model, x, mode, exp_R, f"f32 identity {mode}", task=_task(mode), rtol=1e-5)
    if mode == "contrastive":
        (r,) = routes
        assert not r["by_sign"] and r["rows"] is None


def test_routing_blocks_do_not_change_results(monkeypatch):
    """The contrastive routing runs over blocks of rows: any block size gives the same bits."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1),
                          nn.Flatten(), nn.Linear(4 * 36, 3)).eval()
    x = torch.randn(5, 3, 6, 6)
    ref = nr.explain(model, x, "contrastive", task="multiclass-classification")
    monkeypatch.setattr(affine, "BLOCK_UNITS", 1)  # one row per block
    got = nr.explain(model, x, "contrastive", task="multiclass-classification")
    assert torch.equal(ref.positive.input_relevance, got.positive.input_relevance)
    assert torch.equal(ref.negative.input_relevance, got.negative.input_relevance)


def test_net_layer_relevance_is_positive_minus_negative():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    exp = nr.explain(model, torch.randn(4, 6), "contrastive", task="multiclass-classification")
    assert sorted(exp.layer_relevance) == sorted(exp.positive.layer_relevance)
    for name, net in exp.layer_relevance.items():
        assert torch.equal(net, exp.positive.layer_relevance[name] - exp.negative.layer_relevance[name])


def test_stab_in_arithmetic_matches_the_definition():
    """stab(v) = v + 1e-9·sign(v) with sign(0) = +1, also for -0.0 (spec 6), bit for bit."""
    v = torch.cat([torch.tensor([0.0, -0.0, 1e-12, -1e-12, 5.0, -5.0]), torch.randn(1000)])
    for k in (1, 2):
        u = v * k
        assert torch.equal(attention.stab(v, k), torch.where(u >= 0, u + 1e-9, u - 1e-9))


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_padding_mask_shortcut_equals_the_add_rule(mode, monkeypatch):
    """An additive mask of 0 and finfo.min only masks: skipping its add-rule share gives exactly
    the relevance the full share computation gives."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 7, 7)
    mask[0, ..., 5:] = torch.finfo(torch.float32).min
    R = torch.randn(2, 4, 7, 8, generator=g)
    R = (R.abs(), R.abs() * 0.5) if mode == "contrastive" else R
    fast = attention.attention_relevance(q, k, v, R, mask=mask)
    monkeypatch.setattr(attention, "_masks_only", lambda bias, s: False)
    full = attention.attention_relevance(q, k, v, R, mask=mask)
    for a, b in zip(fast if mode == "contrastive" else (fast,), full if mode == "contrastive" else (full,)):
        for x, y in zip(a[:3], b[:3]):
            assert torch.equal(x, y)
        assert float(b[3].abs().max()) == 0.0  # the full computation absorbs nothing either


def test_two_threads_give_the_same_relevance_and_restore_the_setting():
    """The walk runs on one thread and its big products on the caller's threads; results agree
    with a one-thread run to float rounding, and the caller's thread count is restored."""
    from governance.backtrace import Backtrace

    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 4)).eval()
    x = torch.randn(64, 3, 8, 8)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = Backtrace(model).explain(x, mode="contrastive", task="multiclass-classification")
        torch.set_num_threads(2)
        two = Backtrace(model).explain(x, mode="contrastive", task="multiclass-classification")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)
    scale = float(one.positive.input_relevance.abs().max())
    assert float((one.positive.input_relevance - two.positive.input_relevance).abs().max()) <= 1e-5 * scale
    assert float((one.negative.input_relevance - two.negative.input_relevance).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_rows_relevance_does_not_depend_on_its_batch(dtype, routes):
    """Most rows but not all hold one-signed units (a single non-zero input): the recomputed rows
    and the identity rows must each get the same formula whatever else is in the batch, so a
    sample's relevance explained in its batch, alone, or in another batch differs only by the
    matrix library's rounding (a few ulps: BLAS sums a row differently for other batch sizes),
    never by the identity-versus-one-signed difference (up to 1e-5 relative in float32)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 2)).to(dtype).eval()
    g = torch.Generator().manual_seed(5)
    x = torch.zeros(10, 24, dtype=dtype)
    x[torch.arange(8), torch.arange(8) * 3] = torch.linspace(-1.5, 1.5, 8, dtype=dtype)
    x[8:] = torch.randn(2, 24, generator=g, dtype=dtype)
    whole = nr.explain(model, x, "contrastive", task="bbox-regression")
    assert any(r["rows"] is not None and r["of"] // 2 < r["rows"] < r["of"] and not r["by_sign"]
               for r in routes), routes
    eps = torch.finfo(dtype).eps
    for idx in ([9], [8], [0], [2, 9, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]):
        part = nr.explain(model, x[idx], "contrastive", task="bbox-regression")
        for side in ("positive", "negative"):
            a = getattr(whole, side).input_relevance[idx]
            b = getattr(part, side).input_relevance
            scale = a.abs().max()
            assert (a - b).abs().max() <= 8 * eps * scale, (idx, side, ((a - b).abs().max() / scale).item())


class _Rearranging(nn.Module):
    """transpose, permute, expand, slice (with a step and negative bounds) and cat (two relevant
    operands and a constant one) between two linear layers."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)
        self.register_buffer("const", torch.full((1, 4, 2), 0.5))

    def forward(self, x):  # x: (n, 4, 6)
        h = torch.relu(self.a(x)).transpose(1, 2)               # (n, 8, 4)
        h = h.permute(0, 2, 1)                                   # (n, 4, 8)
        left, right = h[:, :, :4], h[:, :, -6:-1:2]              # slices
        h = torch.cat([right, self.const.expand(x.shape[0], 4, 2), left[:, :, 1:]], dim=-1)  # (n, 4, 8)
        h = h[:, :1].expand(-1, 4, -1) + h                       # expand of a relevant value
        return self.b(h).sum(1)


@pytest.mark.parametrize("mode", MODES)
def test_direct_shape_transposes_equal_the_vjp(mode, monkeypatch):
    """The shape ops' written-out transposes give exactly the relevance their traced VJPs give,
    and every one of them took the direct route."""
    from governance.backtrace.rules import shape

    torch.manual_seed(10)
    model = _Rearranging().to(DTYPE).eval()
    x = torch.randn(5, 4, 6, dtype=DTYPE)
    taken: list[str] = []
    orig = shape._direct

    def spy(ctx, node, name, leaves, r0):
        fn = orig(ctx, node, name, leaves, r0)
        if fn is not None:
            taken.append(name)
        return fn

    monkeypatch.setattr(shape, "_direct", spy)
    fast = nr.explain(model, x, mode, task="multiclass-classification")
    assert {"transpose", "permute", "slice", "cat", "expand"} <= set(taken), taken
    monkeypatch.setattr(shape, "_direct", lambda *a: None)
    traced = nr.explain(model, x, mode, task="multiclass-classification")
    maps = ("positive", "negative") if mode == "contrastive" else (None,)
    for side in maps:
        a = getattr(fast, side) if side else fast
        b = getattr(traced, side) if side else traced
        assert torch.equal(a.input_relevance, b.input_relevance)
        for name in b.layer_relevance:
            assert torch.equal(a.layer_relevance[name], b.layer_relevance[name]), name


class _LastToken(nn.Module):
    """Linear + tanh over every token, a head on the last token only: the token layer's relevance
    is non-zero on one row of each sample."""

    def __init__(self, head_weight_zero: bool = False):
        super().__init__()
        self.lin = nn.Linear(24, 16)
        self.head = nn.Linear(16, 3)
        if head_weight_zero:
            with torch.no_grad():
                self.head.weight.zero_()

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x))[:, -1])


@pytest.fixture
def live_rows(monkeypatch):
    """How many rows the affine rule ran on, per call that took the live-rows route."""
    seen: list[tuple[int, int]] = []
    orig = affine._on_rows

    def spy(ctx, node, u, R, live):
        seen.append((len(live), int(torch.tensor(ctx.value(u.x_node).shape[:-1]).prod())))
        return orig(ctx, node, u, R, live)

    monkeypatch.setattr(affine, "_on_rows", spy)
    return seen


def _last_token_expected(model, x, mode):
    """The naive rules: the head on the last token, its relevance placed on the last row of each
    sample (zeros elsewhere), the token layer on every row."""
    n, t, d = x.shape
    with torch.no_grad():
        h = torch.tanh(model.lin(x))
        y = model.head(h[:, -1])
    R, _ = nr.seed(_task(mode), y, mode=mode)
    r_last = nr.linear_rule(h[:, -1], model.head.weight, model.head.bias, R, mode).relevance

    def place(r):
        full = torch.zeros(n, t, 16, dtype=DTYPE)
        full[:, -1] = r
        return full.reshape(-1, 16)

    flat = nr._each_map(r_last, mode, place)
    res = nr.linear_rule(x.reshape(-1, d), model.lin.weight, model.lin.bias, flat, mode, "tanh")
    return nr._each_map(res.relevance, mode, lambda r: r.reshape(x.shape))


@pytest.mark.parametrize("mode", MODES)
def test_live_rows_match_the_naive_rules(mode, live_rows, monkeypatch):
    """A linear map whose relevance sits on a few token rows runs on those rows only (rows with
    one-signed units among them): the naive loops' relevance, and the same books as the
    whole-tensor route."""
    torch.manual_seed(11)
    model = _LastToken().to(DTYPE).eval()
    x = _tokens_with_one_signed_units(n=4, t=6)
    x[1, -1] = 0.0
    x[1, -1, 3] = 0.7  # a live row with one-signed units (recomputed exactly)
    exp = nr.check_engine(model, x, mode, _last_token_expected(model, x, mode), f"live rows {mode}",
                          task=_task(mode))
    assert live_rows == [(4, 24)]
    monkeypatch.setattr(affine, "LIVE_ROW_FRACTION", -1.0)  # the whole-tensor route
    whole = nr.explain(model, x, mode, task=_task(mode))
    for side in (("positive", "negative") if mode == "contrastive" else (None,)):
        a = getattr(exp, side) if side else exp
        b = getattr(whole, side) if side else whole
        assert torch.allclose(a.input_relevance, b.input_relevance, rtol=1e-12, atol=0)
        for name, books in b.books.items():
            for field in ("relevance_in", "relevance_out", "bias_absorbed", "saturation_rerouted"):
                got, want = getattr(a.books[name], field), getattr(books, field)
                assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-12, atol=1e-300), (name, field)


@pytest.mark.parametrize("mode", MODES)
def test_live_rows_none_and_batch_independent(mode, live_rows):
    """No live row at all (a head with zero weights passes nothing back): zeros, no failure; and
    a sample's relevance does not depend on the batch it is explained in."""
    torch.manual_seed(12)
    dead = _LastToken(head_weight_zero=True).to(DTYPE).eval()
    x = torch.randn(3, 5, 24, dtype=DTYPE)
    got = nr.explain(dead, x, mode, task=_task(mode))
    assert live_rows == [(0, 15)]
    assert float(got.input_relevance.abs().max()) == 0.0
    model = _LastToken().to(DTYPE).eval()
    whole = nr.explain(model, x, mode, task=_task(mode))
    for i in range(3):
        alone = nr.explain(model, x[i:i + 1], mode, task=_task(mode))
        assert torch.allclose(alone.input_relevance, whole.input_relevance[i:i + 1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_weight_cache_same_bits_and_never_stale(mode, monkeypatch):
    """Derived weights (|W|, 2W⁺, 2|W⁻|, their stacks) kept across calls give the same bits as
    computing them per call, and a weight changed in place or by assigning ``.data`` is re-read."""
    from governance.backtrace import Backtrace, weight_cache

    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Unflatten(1, (1, 8)), nn.Conv1d(1, 3, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(18, 3)).eval()
    x = torch.randn(5, 6)
    bt = Backtrace(model)

    def run():
        exp = bt.explain(x, mode=mode, task=_task(mode))
        return exp.input_relevance.clone()

    weight_cache.clear()
    first, again = run(), run()
    monkeypatch.setattr(weight_cache, "BUDGET_BYTES", 0)  # nothing kept: computed per call
    weight_cache.clear()
    assert torch.equal(first, again) and torch.equal(first, run())
    monkeypatch.undo()
    run()  # fill the cache again
    with torch.no_grad():
        model[0].weight.mul_(-0.5)  # in place: the version counter moves
    changed = run()
    weight_cache.clear()
    assert torch.equal(changed, run()) and not torch.equal(changed, first)
    run()
    model[-1].weight.data = torch.randn(3, 18)  # new storage
    swapped = run()
    weight_cache.clear()
    assert torch.equal(swapped, run()) and not torch.equal(swapped, changed)


@pytest.mark.parametrize("width", [12, 160])
@pytest.mark.parametrize("mode", MODES)
def test_small_linear_on_nonnegative_input_exact_sums(mode, width, monkeypatch):
    """ReLU -> Linear -> sigmoid with saturated units: a linear map of at most
    ``SMALL_LINEAR_WEIGHTS`` weights on x >= 0 takes P and N from the one-signed sums (no S,
    no recomputed rows: ``pos_neg2`` is not called); a larger one keeps S and the recorded
    W x. Both match the naive loops in every mode."""
    torch.manual_seed(5)
    lin = nn.Linear(width, 128 if width > 12 else 6).to(DTYPE)
    with torch.no_grad():
        lin.weight.mul_(8.0)  # some units beyond the sigmoid's bounds on either side
    calls: list[bool] = []
    orig = affine.pos_neg2

    def pos_neg2(u, x, S, nonneg, bias_abs):
        calls.append(nonneg)
        return orig(u, x, S, nonneg, bias_abs)

    monkeypatch.setattr(affine, "pos_neg2", pos_neg2)
    small = lin.weight.numel() <= affine.SMALL_LINEAR_WEIGHTS
    assert small == (width == 12)
    x = torch.randn(7, width, dtype=DTYPE)
    model = nn.Sequential(nn.ReLU(), lin, nn.Sigmoid()).eval()
    with torch.no_grad():
        y = model(x)
        t = lin(x.relu())
    assert bool((t < -4).any()) and bool((t > 4).any())
    R, _ = nr.seed(_task(mode), y, mode=mode)
    exp_R = nr.linear_rule(x.relu(), lin.weight, lin.bias, R, mode, "sigmoid").relevance
    nr.check_engine(model, x, mode, exp_R, f"relu linear({width}) sigmoid {mode}", task=_task(mode))
    # the saturated default/signed path and contrastive both need P and N: S only for the large map
    assert calls == ([] if small else [True])
