"""Attention (spec section 6) and decomposed normalisations (spec section 5).

The attention rule is checked against a naive per-sample, per-head, per-query loop written
straight from the spec (Python floats, double precision), for ``scaled_dot_product_attention``
and for hand-written eager attention (matmul, bmm, einsum), with every mask kind, grouped-query
attention, causal attention and a custom scale. Hand-written RMS / layer norms must explain
exactly like the fused ops (the statistic carries no relevance).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from governance.backtrace import Backtrace, UnsupportedOperationError
from governance.backtrace.rules.attention import attention_relevance

EPS = 1e-9


def _stab(v: float) -> float:
    return v + (EPS if v >= 0 else -EPS)


# ------------------------------------------------------------------------------------------------
# naive reference (spec 6, one head and one query at a time)
# ------------------------------------------------------------------------------------------------

def naive_attention(q, k, v, R, mask=None, causal=False, scale=None):
    """R_q, R_k, R_v (float64) for O = softmax(Q Kᵀ·scale + M) V, per sample, head and query.

    q: (N, Hq, L, E), k: (N, Hk, S, E), v: (N, Hk, S, Ev), R: (N, Hq, L, Ev); Hq a multiple of Hk
    (grouped-query: head h uses key/value head h // (Hq / Hk)). ``mask``: None, bool (True =
    attend) or float (added to the scaled scores), broadcastable to (N, Hq, L, S). An additive
    float mask is a constant term of the add S·scale + M: its share of R_A is absorbed."""
    q, k, v, R = (t.detach().double() for t in (q, k, v, R))
    N, Hq, L, E = q.shape
    Hk, S = k.shape[1], k.shape[2]
    Ev = v.shape[-1]
    g = Hq // Hk
    sc = 1.0 / math.sqrt(E) if scale is None else scale
    if mask is not None:
        mask = mask.expand(N, Hq, L, S)
    rq = torch.zeros_like(q)
    rk = torch.zeros_like(k)
    rv = torch.zeros_like(v)
    absorbed = 0.0
    for n in range(N):
        for h in range(Hq):
            kh = h // g
            for i in range(L):
                s = [sum(float(q[n, h, i, d]) * float(k[n, kh, j, d]) for d in range(E)) for j in range(S)]
                logits, bias = [], []
                for j in range(S):
                    x = s[j] * sc
                    b = 0.0
                    if causal and j > i:
                        x = -math.inf
                    if mask is not None:
                        m = mask[n, h, i, j]
                        if mask.dtype == torch.bool:
                            x = x if bool(m) else -math.inf
                        else:
                            b = float(m)
                            x = x + b
                    logits.append(x)
                    bias.append(b)
                top = max(logits)
                if top == -math.inf:
                    a = [0.0] * S
                else:
                    ex = [math.exp(x - top) if x != -math.inf else 0.0 for x in logits]
                    tot = sum(ex)
                    a = [e / tot for e in ex]
                o = [sum(a[j] * float(v[n, kh, j, d]) for j in range(S)) for d in range(Ev)]
                rn = [float(R[n, h, i, d]) / _stab(2 * o[d]) for d in range(Ev)]
                for j in range(S):
                    # 1. O = A V
                    r_a = sum(rn[d] * float(v[n, kh, j, d]) for d in range(Ev)) * a[j]
                    for d in range(Ev):
                        rv[n, kh, j, d] += a[j] * rn[d] * float(v[n, kh, j, d])
                    # 2. softmax: R_S = R_A (minus an additive bias's share)
                    r_s = r_a
                    if r_a != 0.0 and bias[j] != 0.0:
                        ms, mb = abs(s[j] * sc), abs(bias[j])
                        r_s = r_a * ms / (ms + mb) if math.isfinite(mb) else 0.0
                        absorbed += r_a - r_s
                    # 3. S = Q Kᵀ
                    rs = r_s / _stab(2 * s[j])
                    for d in range(E):
                        rq[n, h, i, d] += rs * float(k[n, kh, j, d]) * float(q[n, h, i, d])
                        rk[n, kh, j, d] += rs * float(q[n, h, i, d]) * float(k[n, kh, j, d])
    return rq, rk, rv, absorbed


# ------------------------------------------------------------------------------------------------
# modules whose inputs are Q, K, V directly (the seed is 100·O: regression)
# ------------------------------------------------------------------------------------------------

class SDPA(nn.Module):
    def __init__(self, mask=None, causal=False, scale=None, gqa=False):
        super().__init__()
        self.register_buffer("mask", mask)
        self.causal, self.scale, self.gqa = causal, scale, gqa

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal,
                                              scale=self.scale, enable_gqa=self.gqa)


class Eager(nn.Module):
    """softmax(q @ kᵀ · scale + mask) @ v written out (the mask as a float buffer)."""

    def __init__(self, mask=None, causal=False, scale=None, form="matmul"):
        super().__init__()
        self.register_buffer("mask", mask)
        self.causal, self.scale, self.form = causal, scale, form

    def forward(self, q, k, v):
        L, S = q.shape[-2], k.shape[-2]
        sc = 1.0 / math.sqrt(q.shape[-1]) if self.scale is None else self.scale
        if self.form == "einsum":
            s = torch.einsum("nhld,nhsd->nhls", q, k)
        elif self.form == "bmm":
            s = torch.bmm(q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2)).unflatten(0, q.shape[:2])
        else:
            s = q @ k.transpose(-1, -2)
        s = s * sc
        if self.causal:
            s = s + torch.triu(torch.full((L, S), float("-inf")), 1)
        if self.mask is not None:
            s = s + self.mask
        a = torch.softmax(s, dim=-1)
        if self.form == "einsum":
            return torch.einsum("nhls,nhsd->nhld", a, v)
        if self.form == "bmm":
            return torch.bmm(a.flatten(0, 1), v.flatten(0, 1)).unflatten(0, q.shape[:2])
        return a @ v


def _qkv(n=2, hq=2, hk=2, L=4, S=4, e=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, hq, L, e, generator=g), torch.randn(n, hk, S, e, generator=g),
            torch.randn(n, hk, S, e, generator=g))


def _padding_bool(n=2, S=4):
    m = torch.ones(n, 1, 1, S, dtype=torch.bool)
    m[1, ..., S - 1:] = False
    return m


def _float_mask(n=2, L=4, S=4, seed=1):
    """A T5-like relative bias plus a padding mask at the dtype's minimum."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(1, 1, L, S, generator=g).expand(n, 1, L, S).clone()
    m[1, ..., S - 1] = torch.finfo(torch.float32).min
    return m


CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "bool-padding": dict(mask=_padding_bool()),
    "float-bias-and-padding": dict(mask=_float_mask()),
    "scale": dict(scale=0.7),
}


def _check(got, want, tol=2e-5):
    scale = max(float(want.abs().max()), 1e-6)
    assert float((got.double() - want).abs().max()) <= tol * scale


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_equals_naive_loop(case):
    kw = CASES[case]
    q, k, v = _qkv()
    model = SDPA(**kw)
    exp = Backtrace(model).explain((q, k, v), task="regression")
    R = 100.0 * model(q, k, v)
    rq, rk, rv, _ = naive_attention(q, k, v, R, mask=kw.get("mask"), causal=kw.get("causal", False),
                                    scale=kw.get("scale"))
    ir = exp.input_relevance
    _check(ir["q"], rq)
    _check(ir["k"], rk)
    _check(ir["v"], rv)


@pytest.mark.parametrize("form", ["matmul", "bmm", "einsum"])
@pytest.mark.parametrize("case", ["plain", "causal", "float-bias-and-padding"])
def test_eager_attention_equals_naive_loop(case, form):
    kw = CASES[case]
    q, k, v = _qkv()
    model = Eager(form=form, **kw)
    exp = Backtrace(model).explain((q, k, v), task="regression")
    R = 100.0 * model(q, k, v)
    rq, rk, rv, absorbed = naive_attention(q, k, v, R, mask=kw.get("mask"), causal=kw.get("causal", False))
    ir = exp.input_relevance
    _check(ir["q"], rq)
    _check(ir["k"], rk)
    _check(ir["v"], rv)
    # books: the seed = input relevance + the bias-absorbed share, nothing NaN
    total = float(exp.input_total().sum())
    absorbed_books = float(exp.books[""].bias_absorbed.sum())
    assert math.isfinite(absorbed_books)
    assert abs(absorbed_books - absorbed) <= 1e-4 * abs(float(exp.seed_relevance.sum()))
    assert abs(total + absorbed_books - float(exp.seed_relevance.sum())) <= 1e-4 * float(exp.seed_relevance.abs().sum())


def test_grouped_query_attention_equals_naive_loop():
    q, k, v = _qkv(hq=4, hk=2)
    model = SDPA(gqa=True, causal=True)
    exp = Backtrace(model).explain((q, k, v), task="regression")
    rq, rk, rv, _ = naive_attention(q, k, v, 100.0 * model(q, k, v), causal=True)
    _check(exp.input_relevance["q"], rq)
    _check(exp.input_relevance["k"], rk)
    _check(exp.input_relevance["v"], rv)


def test_rule_function_direct_and_halves():
    """attention_relevance: V gets half of R_O, Q and K a quarter each (up to the stabiliser)."""
    q, k, v = _qkv(n=3, hq=2, L=5, S=6, e=4, seed=3)
    R = torch.rand(3, 2, 5, 4) + 0.1
    rq, rk, rv, absorbed = attention_relevance(q, k, v, R)
    tot = float(R.sum())
    assert abs(float(rv.sum()) - tot / 2) < 1e-4 * tot
    assert abs(float(rq.sum()) - tot / 4) < 1e-4 * tot
    assert abs(float(rk.sum()) - tot / 4) < 1e-4 * tot
    want = naive_attention(q, k, v, R)
    _check(rq, want[0])
    _check(rk, want[1])
    _check(rv, want[2])


# ------------------------------------------------------------------------------------------------
# attention inside models: masks give exactly 0, eager == SDPA, MultiheadAttention
# ------------------------------------------------------------------------------------------------

class TinyAttention(nn.Module):
    """x -> q/k/v projections -> attention (eager or SDPA) -> out projection -> token 0 / last."""

    def __init__(self, d=8, heads=2, impl="sdpa", causal=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, 3)
        self.h, self.impl, self.causal = heads, impl, causal

    def forward(self, x, mask):
        n, t, d = x.shape
        split = lambda y: y.view(n, t, self.h, d // self.h).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        keep = mask[:, None, None, :].bool()
        if self.causal:
            keep = keep & torch.ones(t, t, dtype=torch.bool).tril()
        if self.impl == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        elif self.impl == "masked_fill":  # DistilBERT-style eager attention
            s = q @ k.transpose(-1, -2) / math.sqrt(d // self.h)
            s = s.masked_fill(~keep, torch.finfo(torch.float32).min)
            o = torch.softmax(s, -1) @ v
        elif self.impl == "where":
            s = q @ k.transpose(-1, -2) / math.sqrt(d // self.h)
            s = torch.where(keep, s, torch.tensor(float("-inf")))
            o = torch.softmax(s, -1) @ v
        else:
            bias = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
            s = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(d // self.h)) + bias
            o = torch.softmax(s, -1) @ v
        o = self.o(o.transpose(1, 2).reshape(n, t, d))
        return self.head(o[:, -1] if self.causal else o[:, 0])


def _tokens(n=2, t=6, d=8, seed=0):
    x = torch.randn(n, t, d, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, -2:] = 0
    return x, mask


@pytest.mark.parametrize("impl", ["sdpa", "eager", "masked_fill", "where"])
def test_padded_tokens_get_exactly_zero(impl):
    x, mask = _tokens()
    for mode in ("default", "contrastive", "signed"):
        exp = Backtrace(TinyAttention(impl=impl)).explain((x, mask), task="multiclass-classification", mode=mode)
        r = exp.input_relevance["x"]
        assert torch.isfinite(r).all()
        assert (r[1, -2:] == 0).all()
        assert (r[0].abs().sum(-1) > 0).all() and (r[1, :-2].abs().sum(-1) > 0).all()


def test_causal_future_tokens_get_exactly_zero():
    x, _ = _tokens()
    mask = torch.ones(2, 6, dtype=torch.long)

    class Prefix(TinyAttention):
        def forward(self, x, mask):  # explain position 3 of a causal model: 4, 5 are the future
            n, t, d = x.shape
            split = lambda y: y.view(n, t, self.h, d // self.h).transpose(1, 2)  # noqa: E731
            o = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                               is_causal=True)
            return self.head(self.o(o.transpose(1, 2).reshape(n, t, d))[:, 3])

    r = Backtrace(Prefix()).explain((x, mask), task="multiclass-classification").input_relevance["x"]
    assert (r[:, 4:] == 0).all()
    assert (r[:, :4].abs().sum(-1) > 0).all()


def test_eager_and_sdpa_models_explain_alike():
    x, mask = _tokens()
    for causal in (False, True):
        for mode in ("default", "contrastive"):
            a = Backtrace(TinyAttention(impl="sdpa", causal=causal)).explain((x, mask), mode=mode,
                                                                            task="multiclass-classification")
            for impl in ("eager", "masked_fill", "where"):
                b = Backtrace(TinyAttention(impl=impl, causal=causal)).explain((x, mask), mode=mode,
                                                                              task="multiclass-classification")
                ra, rb = a.input_relevance["x"], b.input_relevance["x"]
                assert float((ra - rb).abs().max()) <= 1e-5 * float(ra.abs().max()), impl


def test_multihead_attention_with_and_without_weights():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()

    class M(nn.Module):
        def __init__(self, need_weights):
            super().__init__()
            self.mha, self.need_weights = mha, need_weights

        def forward(self, x, pad):
            return self.mha(x, x, x, key_padding_mask=pad, need_weights=self.need_weights)[0][:, 0]

    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    ra = Backtrace(M(False)).explain((x, pad), task="regression").input_relevance["x"]
    rb = Backtrace(M(True)).explain((x, pad), task="regression").input_relevance["x"]
    assert float((ra - rb).abs().max()) <= 1e-5 * float(ra.abs().max())
    assert (ra[1, 3:] == 0).all() and (rb[1, 3:] == 0).all()
    assert torch.isfinite(ra).all() and float(ra.abs().sum()) > 0
    c = Backtrace(M(True)).explain((x, pad), task="regression", mode="contrastive")
    assert torch.isfinite(c.input_relevance["x"]).all()


def test_product_of_two_activations_splits_in_halves():
    class Bilinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3, bias=False), nn.Linear(4, 5, bias=False)

        def forward(self, x):
            return (self.a(x).transpose(-1, -2) @ self.b(x)).flatten(1)  # (N, 3*5)

    torch.manual_seed(0)
    x = torch.randn(2, 6, 4)
    m = Bilinear()
    exp = Backtrace(m).explain(x, task="regression")
    # both halves reach x through bias-free linears: the total is conserved
    assert torch.allclose(exp.input_total(), exp.seed_relevance, rtol=1e-4, atol=1e-6)
    books = exp.books
    assert torch.allclose(books["a"].relevance_in, exp.seed_relevance.double() / 2, rtol=1e-4, atol=1e-6)
    assert torch.allclose(books["b"].relevance_in, exp.seed_relevance.double() / 2, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# decomposed norms: the statistic carries no relevance (spec 5)
# ------------------------------------------------------------------------------------------------

class Normed(nn.Module):
    """Linear -> norm (fused or written out) -> Linear, no biases: relevance is conserved."""

    def __init__(self, norm: str, d=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.out = nn.Linear(d, d, bias=False), nn.Linear(d, 2, bias=False)
        self.w = nn.Parameter(torch.rand(d) + 0.5)
        self.norm = norm

    def forward(self, x):
        h = self.inp(x)
        eps = 1e-5
        if self.norm == "rms_fused":
            h = F.rms_norm(h, (h.shape[-1],), self.w, eps)
        elif self.norm == "rms_hf":  # LLaMA / T5 style
            var = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
            h = self.w * (h * torch.rsqrt(var + eps))
        elif self.norm == "ln_fused":
            h = F.layer_norm(h, (h.shape[-1],), self.w, None, eps)
        elif self.norm == "ln_rsqrt":
            c = h - h.mean(-1, keepdim=True)
            h = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps) * self.w
        elif self.norm == "ln_div":
            mu = h.mean(-1, keepdim=True)
            var = h.var(-1, keepdim=True, unbiased=False)
            h = (h - mu) / torch.sqrt(var + eps) * self.w
        return self.out(h)


def test_decomposed_rms_norm_equals_fused():
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    fused = Backtrace(Normed("rms_fused")).explain(x, task="regression")
    hand = Backtrace(Normed("rms_hf")).explain(x, task="regression")
    assert torch.allclose(fused.input_relevance, hand.input_relevance, rtol=1e-5, atol=1e-6)
    # bias-free: everything reaches the input (the statistic took nothing)
    assert torch.allclose(hand.input_total(), hand.seed_relevance, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["ln_rsqrt", "ln_div"])
def test_decomposed_layer_norm_passes_relevance_through(norm):
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    fused = Backtrace(Normed("ln_fused")).explain(x, task="regression")
    hand = Backtrace(Normed(norm)).explain(x, task="regression")
    # the centring x - mean(x) splits by the add rule (|x| vs |mean|), so compare the books:
    # the norm passes what arrives at its output to its input, with nothing dropped
    for exp in (fused, hand):
        assert torch.isfinite(exp.input_relevance).all()
    b = hand.books
    rows = hand.layer_summary()
    assert float(rows["dropped"].abs().max()) <= 1e-4 * float(hand.seed_relevance.abs().max())
    assert torch.allclose(b["out"].relevance_in, hand.seed_relevance.double(), rtol=1e-5)


def test_statistic_op_reached_by_relevance_is_an_error():
    class Poly(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, x):
            return self.lin(x.pow(2))  # a feature, not a normaliser

    with pytest.raises(UnsupportedOperationError, match="aten.pow"):
        Backtrace(Poly()).explain(torch.randn(2, 4), task="regression")


def test_gating_product_gives_half_to_each_factor():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.g, self.u, self.d = (nn.Linear(4, 4, bias=False) for _ in range(3))

        def forward(self, x):
            return self.d(F.silu(self.g(x)) * self.u(x))  # SwiGLU

    exp = Backtrace(Gate()).explain(torch.randn(2, 4), task="regression")
    half = exp.seed_relevance.double() / 2
    assert torch.allclose(exp.books["g"].relevance_in, half, rtol=1e-5)
    assert torch.allclose(exp.books["u"].relevance_in, half, rtol=1e-5)


@pytest.mark.parametrize("act", ["gelu_tanh", "quick_gelu", "silu"])
def test_written_out_activation_equals_fused(act):
    """x·f(x) written element-wise is an activation: relevance passes through to x (spec 5),
    exactly as the fused op (no pre-activation below -6 here, so no saturation either)."""

    class Act(nn.Module):
        def __init__(self, written: bool):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)
            self.written = written

        def forward(self, x):
            h = self.a(x)
            if act == "gelu_tanh":
                h = (0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))
                     if self.written else F.gelu(h, approximate="tanh"))
            elif act == "quick_gelu":
                h = h * torch.sigmoid(1.702 * h) if self.written else F.silu(h)
            else:
                h = h * torch.sigmoid(h) if self.written else F.silu(h)
            return self.b(h)

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    written = Backtrace(Act(True)).explain(x, task="regression")
    # everything that left the last layer arrives at the first one's output
    b = written.books
    assert torch.allclose(b["a"].relevance_in, b["b"].relevance_out, rtol=1e-5, atol=1e-7)
    if act != "quick_gelu":  # the same function as the fused op: the same relevance
        fused = Backtrace(Act(False)).explain(x, task="regression")
        assert torch.allclose(fused.input_relevance, written.input_relevance, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["default", "signed", "contrastive"])
def test_einsum_with_a_parameter_is_affine(mode):
    """An einsum of an activation and a weight is the unified affine rule (spec 3 / 4)."""

    class M(nn.Module):
        def __init__(self, use_einsum):
            super().__init__()
            torch.manual_seed(0)
            self.w = nn.Parameter(torch.randn(5, 4))
            self.head = nn.Linear(5, 3)
            self.use_einsum = use_einsum

        def forward(self, x):
            h = torch.einsum("btd,od->bto", x, self.w) if self.use_einsum else F.linear(x, self.w)
            return self.head(torch.relu(h).mean(1))

    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    a = Backtrace(M(True)).explain(x, mode=mode, task="multiclass-classification")
    b = Backtrace(M(False)).explain(x, mode=mode, task="multiclass-classification")
    assert torch.allclose(a.input_relevance, b.input_relevance, rtol=1e-5, atol=1e-6)
