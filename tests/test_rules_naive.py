"""Each relevance rule of spec/backtrace-rules.md, in each mode, against naive per-unit loops.

The naive loops live in ``naive_rules.py``. The first tests here check the naive reference
itself (its unit enumeration reproduces PyTorch's forward; its per-unit rule gives hand-computed
numbers); the rest build a tiny module whose forward is exactly the op under test, explain it
with the engine and compare ``input_relevance`` with the naive loop applied to the same seed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import naive_rules as nr
from naive_rules import DTYPE, MODES


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    with nr.one_thread():
        yield


def _seed_for(y, mode, task="regression", **kw):
    R, _ = nr.seed(task, y, mode=mode, **kw)
    return R


def _task(mode):
    # contrastive: the bbox seed (R+ = 100·y, R- = 100·(1 − y)) puts both maps on every unit,
    # so every routing branch of spec 4 is exercised; default/signed: the regression seed.
    return "bbox-regression" if mode == "contrastive" else "regression"


_map = nr._each_map  # R+ and R- each through the same naive rule in contrastive mode


# ============================================================================================
# 0. the naive reference checks itself
# ============================================================================================


def test_naive_unit_rule_by_hand():
    # one unit: z = (3, -1, 0), b = 1 -> P = 3, N = 1, t = 3; den = 3 + 1 + 1 = 5
    u = nr.unit_default(10.0, [(0, 3.0), (1, -1.0), (2, 0.0)], 1.0)
    assert u.shares == {0: 6.0, 1: 2.0} and u.bias == 2.0
    u = nr.unit_default(10.0, [(0, 3.0), (1, -1.0), (2, 0.0)], 1.0, signed=True)
    assert u.shares == {0: 6.0, 1: -2.0}
    # relu, t = 3 - 5 - 1 = -3 < 0: P := 0, den = N + |b| = 6
    u = nr.unit_default(12.0, [(0, 3.0), (1, -5.0)], -1.0, nr.SATURATION["relu"])
    assert u.shares == {1: 10.0} and u.bias == 2.0
    # tanh, t = 5 - 1 = 4 > 2: N := 0, den = P = 5
    u = nr.unit_default(10.0, [(0, 5.0), (1, -1.0)], 0.0, nr.SATURATION["tanh"])
    assert u.shares == {0: 10.0} and u.bias == 0.0
    # P = N = b = 0 passes nothing
    u = nr.unit_default(10.0, [(0, 0.0)], 0.0)
    assert u.shares == {} and u.dropped == 10.0
    # contrastive, t > 0, R+ > R-: positive contributors get R+ (in R+), negative get R- (in R-)
    u = nr.unit_contrastive(6.0, 2.0, [(0, 3.0), (1, -1.0), (2, 1.0)], 0.0)
    assert u.plus == {0: 4.5, 2: 1.5} and u.minus == {1: 2.0}
    # t > 0, R- > R+: positive contributors get R- (into R-), negative get R+ (into R+)
    u = nr.unit_contrastive(2.0, 6.0, [(0, 3.0), (1, -1.0)], 0.0)
    assert u.minus == {0: 6.0} and u.plus == {1: 2.0}
    # t < 0, R+ > R-: negative contributors get R+ (into R+), positive the R- (into R-)
    u = nr.unit_contrastive(6.0, 2.0, [(0, 1.0), (1, -3.0)], 0.0)
    assert u.plus == {1: 6.0} and u.minus == {0: 2.0}
    # tie: positive contributors take the R- amount, negative the R+ amount, for either sign of t
    for zs in ([(0, 3.0), (1, -1.0)], [(0, 1.0), (1, -3.0)]):
        u = nr.unit_contrastive(5.0, 5.0, zs, 0.0)
        assert u.minus == {0: 5.0} and u.plus == {1: 5.0}
    # t = 0 with both sides: nothing passes
    u = nr.unit_contrastive(5.0, 3.0, [(0, 2.0), (1, -3.0)], 1.0)
    assert u.plus == {} and u.minus == {} and u.dropped == 8.0
    # only positive contributions (t = 0 here): both maps to them, regardless of t
    u = nr.unit_contrastive(5.0, 3.0, [(0, 1.0), (1, 3.0)], -4.0)
    assert u.plus == {0: 1.25, 1: 3.75} and u.minus == {0: 0.75, 1: 2.25}
    # only negative contributions
    u = nr.unit_contrastive(4.0, 8.0, [(0, -1.0), (1, -3.0)], 9.0)
    assert u.plus == {0: 1.0, 1: 3.0} and u.minus == {0: 2.0, 1: 6.0}


CONV_CASES = {
    "conv1d_s2_p1_g2": dict(nd=1, cin=4, cout=6, k=3, L=(9,), stride=2, padding=1, dilation=1, groups=2),
    "conv1d_same_even": dict(nd=1, cin=3, cout=4, k=4, L=(8,), stride=1, padding="same", dilation=1, groups=1),
    "conv1d_dil2_same_even": dict(nd=1, cin=2, cout=2, k=2, L=(7,), stride=1, padding="same", dilation=3, groups=1),
    "conv1d_dil2_p2": dict(nd=1, cin=2, cout=3, k=3, L=(10,), stride=1, padding=2, dilation=2, groups=1),
    "conv2d_mixed_g2": dict(nd=2, cin=2, cout=4, k=(3, 2), L=(7, 6), stride=(2, 1), padding=(1, 0),
                            dilation=(1, 2), groups=2),
    "conv2d_same_even": dict(nd=2, cin=2, cout=3, k=(2, 4), L=(5, 6), stride=1, padding="same", dilation=1, groups=1),
    "conv2d_depthwise": dict(nd=2, cin=3, cout=3, k=3, L=(5, 5), stride=2, padding=1, dilation=1, groups=3),
    "conv2d_k1_pad_only_border": dict(nd=2, cin=2, cout=3, k=1, L=(3, 4), stride=1, padding=1, dilation=1, groups=1),
    "conv3d": dict(nd=3, cin=2, cout=2, k=2, L=(3, 4, 3), stride=(1, 2, 1), padding=1, dilation=1, groups=1),
    "conv3d_dil_g2": dict(nd=3, cin=2, cout=4, k=(2, 2, 1), L=(4, 3, 3), stride=1, padding=(1, 0, 0),
                          dilation=(2, 1, 1), groups=2),
}

CONVT_CASES = {
    "convT1d_s2_op1_g2": dict(nd=1, cin=4, cout=4, k=3, L=(5,), stride=2, padding=1, output_padding=1,
                              dilation=1, groups=2),
    "convT1d_dil2": dict(nd=1, cin=2, cout=3, k=2, L=(4,), stride=3, padding=0, output_padding=0,
                         dilation=2, groups=1),
    "convT2d": dict(nd=2, cin=2, cout=3, k=(2, 3), L=(3, 4), stride=(2, 1), padding=(0, 1),
                    output_padding=(1, 0), dilation=(1, 2), groups=1),
}


def _conv_module(c, transposed=False):
    cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}[c["nd"]] if transposed else \
        {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[c["nd"]]
    kw = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["groups"])
    if transposed:
        kw["output_padding"] = c["output_padding"]
    return cls(c["cin"], c["cout"], c["k"], **kw)


def _conv_kw(c, transposed=False):
    kw = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["groups"])
    if transposed:
        kw["output_padding"] = c["output_padding"]
    return kw


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_naive_conv_units_match_torch(name):
    c = CONV_CASES[name]
    torch.manual_seed(0)
    m = _conv_module(c).double()
    x = torch.randn(2, c["cin"], *c["L"], dtype=torch.float64)
    units, out_shape = nr.conv_units(tuple(x.shape[1:]), m.weight, m.bias, **_conv_kw(c))
    ref = m(x)
    assert tuple(ref.shape[1:]) == tuple(out_shape)
    assert torch.allclose(nr.affine_forward(x, units).reshape(ref.shape), ref, atol=1e-12)


@pytest.mark.parametrize("name", list(CONVT_CASES))
def test_naive_conv_transpose_units_match_torch(name):
    c = CONVT_CASES[name]
    torch.manual_seed(0)
    m = _conv_module(c, transposed=True).double()
    x = torch.randn(2, c["cin"], *c["L"], dtype=torch.float64)
    units, out_shape = nr.conv_transpose_units(tuple(x.shape[1:]), m.weight, m.bias, **_conv_kw(c, True))
    ref = m(x)
    assert tuple(ref.shape[1:]) == tuple(out_shape)
    assert torch.allclose(nr.affine_forward(x, units).reshape(ref.shape), ref, atol=1e-12)


def test_naive_pooling_and_bn_match_torch():
    torch.manual_seed(0)
    x = torch.randint(-3, 4, (2, 2, 7, 6)).double()
    for kw in (dict(kernel=3, stride=2, padding=1), dict(kernel=(2, 3), stride=(1, 2), padding=1, dilation=(2, 1))):
        ref = F.max_pool2d(x, kw["kernel"], kw["stride"], kw["padding"], kw.get("dilation", 1))
        assert torch.equal(nr.maxpool_forward(x, **kw), ref)
    wins, O = nr.adaptive_windows((7,), 4)
    assert [w[0][0] for w in wins.values()] == [0, 1, 3, 5] and [len(w) for w in wins.values()] == [2, 3, 3, 2]
    lin = nn.Linear(3, 4).double()
    bn = nn.BatchNorm1d(4).double().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    W2, b2 = nr.fold_bn(lin.weight, lin.bias, bn)
    xx = torch.randn(5, 3, dtype=torch.float64)
    assert torch.allclose(xx @ W2.T + b2, bn(lin(xx)), atol=1e-12)
    units = nr.batchnorm_units((4,), bn)
    assert torch.allclose(nr.affine_forward(xx[:, :1].expand(5, 4) * 1.0, units), bn(xx[:, :1].expand(5, 4)), atol=1e-12)


# ============================================================================================
# 1. Linear followed by each activation of the saturation table (spec 3, 3b, 4)
# ============================================================================================

ACTS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "relu6": nn.ReLU6,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "none": None,
}

MARGIN = 1e-3


def _linear_case(act: str, bias: bool = True, n=6, n_in=5, n_out=8):
    """A Linear layer and inputs, with: biases of both signs, an all-zero input row, a unit with
    P = N = b = 0, a unit with only a bias, and (for bounded activations) units saturating on
    each side, every pre-activation away from the bounds (except exact zeros, which are exact in
    any precision)."""
    lo, hi = nr.SATURATION[act]
    for s in range(200):
        g = torch.Generator().manual_seed(1000 + s)
        W = torch.randn(n_out, n_in, generator=g, dtype=torch.float64) * 2.5
        b = torch.randn(n_out, generator=g, dtype=torch.float64) * 2.0
        x = torch.randn(n, n_in, generator=g, dtype=torch.float64)
        x[1] = 0.0
        W[3] = 0.0
        b[3] = 0.0
        W[5] = 0.0
        b[0] = b[0].abs() + 0.5
        b[1] = -b[1].abs() - 0.5
        if not bias:
            b = torch.zeros_like(b)
        t = x @ W.T + b
        nz = t != 0
        ok = True
        for bound, side in ((lo, -1), (hi, 1)):
            if bound is None:
                continue
            if ((t - bound).abs()[nz] < MARGIN).any():
                ok = False
            if side < 0 and not (t < bound).any():
                ok = False
            if side > 0 and not (t > bound).any():
                ok = False
        if ok:
            lin = nn.Linear(n_in, n_out, bias=bias).to(DTYPE)
            with torch.no_grad():
                lin.weight.copy_(W)
                if bias:
                    lin.bias.copy_(b)
            return lin, x.to(DTYPE), t
    raise AssertionError("no case found")


def _act_model(lin, act):
    if ACTS[act] is None:
        return nn.Sequential(lin)
    return nn.Sequential(lin, ACTS[act]())


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("mode", MODES)
def test_linear_activation_output_seed(mode, act, bias):
    """Linear -> activation, seeded at the output (regression: R = 100·y; contrastive: bbox)."""
    lin, x, _ = _linear_case(act, bias)
    model = _act_model(lin, act).eval()
    with torch.no_grad():
        y = model(x)
    R = _seed_for(y, mode, _task(mode))
    exp_R = nr.linear_rule(x, lin.weight, lin.bias, R, mode, act).relevance
    nr.check_engine(model, x, mode, exp_R, f"linear+{act} {mode}", task=_task(mode))


@pytest.mark.parametrize("act", [a for a in ACTS])
@pytest.mark.parametrize("mode", ["default", "signed"])
def test_linear_activation_unit_seed_every_unit(mode, act):
    """Every (sample, unit) pair explained with a unit seed (multiclass, seed="unit", explicit
    target), so units whose activation output is 0 (relu below 0) still carry relevance and the
    saturation of the side they zero is visible."""
    lin, x, t = _linear_case(act)
    n, n_out = x.shape[0], lin.out_features
    xs = x.repeat_interleave(n_out, 0)
    target = torch.arange(n_out).repeat(n)
    model = _act_model(lin, act).eval()
    R = torch.zeros(n * n_out, n_out, dtype=torch.float64)
    R[torch.arange(n * n_out), target] = 100.0
    if act in ("relu", "relu6", "leaky_relu"):
        assert ((t < 0) & (t.abs() > MARGIN)).any()  # some units do saturate
    exp_R = nr.linear_rule(xs, lin.weight, lin.bias, R, mode, act).relevance
    exp = nr.check_engine(model, xs, mode, exp_R, f"linear+{act} unit seed {mode}",
                          task="multiclass-classification", target=target, seed="unit")
    assert torch.equal(exp.target.long().cpu(), target)


@pytest.mark.parametrize("mode", MODES)
def test_linear_softmax_final_layer(mode):
    """Linear -> softmax at the final layer (saturation (-1, 2)), every unit as target."""
    for s in range(100):
        g = torch.Generator().manual_seed(50 + s)
        lin = nn.Linear(4, 5).to(DTYPE)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(5, 4, generator=g, dtype=torch.float64) * 1.5)
            lin.bias.copy_(torch.randn(5, generator=g, dtype=torch.float64))
        x = torch.randn(4, 4, generator=g, dtype=torch.float64)
        t = lin(x).detach()
        if (t < -1).any() and (t > 2).any() and ((t + 1).abs().min() > MARGIN) and ((t - 2).abs().min() > MARGIN):
            break
    model = nn.Sequential(lin, nn.Softmax(dim=-1)).eval()
    xs = x.repeat_interleave(5, 0).to(DTYPE)
    target = torch.arange(5).repeat(4)
    with torch.no_grad():
        y = model(xs)
    R, tg = nr.seed("multiclass-classification", y, mode=mode, target=target)
    assert tg == target.tolist()
    exp_R = nr.linear_rule(xs, lin.weight, lin.bias, R, mode, "softmax").relevance
    nr.check_engine(model, xs, mode, exp_R, f"linear+softmax {mode}", task="multiclass-classification",
                    target=target)


def _hand_linear(rows, bias=None):
    W = torch.tensor(rows, dtype=DTYPE)
    lin = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None).to(DTYPE)
    with torch.no_grad():
        lin.weight.copy_(W)
        if bias is not None:
            lin.bias.copy_(torch.tensor(bias, dtype=DTYPE))
    return lin


# hand-built contrastive cases, exact in binary floating point; bbox seed R+ = 100·y,
# R- = 100·(1 − y). (name, first layer rows, bias, x, flip: a second layer y = −h, expected
# R+, expected R-)
CONTRASTIVE_HAND = [
    # t = 0.5 > 0, y = 0.5: tie R+ = R- = 50 -> positive contributor takes R- (into R-),
    # the negative one the R+ amount (into R+)
    ("tie_t_pos", [[2.0, -1.0]], None, [1.0, 1.5], False, [0.0, 50.0], [50.0, 0.0]),
    # h = t = -0.5 < 0, y = -h = 0.5: tie at h (the flip passes both maps whole)
    ("tie_t_neg", [[1.0, -2.0]], None, [1.0, 0.75], True, [0.0, 50.0], [50.0, 0.0]),
    # t = 0.75 > 0: R+ = 75 > R- = 25: positive contributors R+ ∝ z/P, negative R-
    ("t_pos_plus_larger", [[2.0, 1.0, -1.0]], [-0.25], [1.0, 1.0, 2.0], False, [50.0, 25.0, 0.0], [0.0, 0.0, 25.0]),
    # t = 0.25 > 0: R- = 75 > R+ = 25: positive contributors take the R- amount (into R-)
    ("t_pos_minus_larger", [[1.0, -1.0]], [0.25], [1.0, 1.0], False, [0.0, 25.0], [75.0, 0.0]),
    # h = -0.75 < 0, y = 0.75: R+ = 75 > R-: negative contributors take R+ (into R+)
    ("t_neg_plus_larger", [[1.0, -1.0]], [-0.75], [1.0, 1.0], True, [0.0, 75.0], [25.0, 0.0]),
    # h = -0.25, y = 0.25: R- = 75 > R+: negative contributors take R- (into R-)
    ("t_neg_minus_larger", [[1.0, -2.0]], [0.75], [1.0, 1.0], True, [25.0, 0.0], [0.0, 75.0]),
    # t = 0 with both sides: nothing passes (y = 0: R+ = 0, R- = 100)
    ("t_zero", [[1.0, -1.0]], [1.0], [2.0, 3.0], False, [0.0, 0.0], [0.0, 0.0]),
    # only positive contributions, t = 0: the first bullet of spec 4 applies, not "t = 0"
    ("only_pos_t_zero", [[1.0, 3.0]], [-4.0], [1.0, 1.0], False, [0.0, 0.0], [25.0, 75.0]),
    # only positive, y = 0.25
    ("only_pos", [[1.0, 3.0]], [-3.75], [1.0, 1.0], False, [6.25, 18.75], [18.75, 56.25]),
    # only negative, y = 0.5: both maps ∝ |z| / N
    ("only_neg", [[-1.0, -3.0]], [4.5], [1.0, 1.0], False, [12.5, 37.5], [12.5, 37.5]),
]


@pytest.mark.parametrize("case", CONTRASTIVE_HAND, ids=[c[0] for c in CONTRASTIVE_HAND])
def test_contrastive_hand_cases(case):
    name, rows, bias, xv, flip, exp_p, exp_n = case
    lin = _hand_linear(rows, bias)
    layers = [lin]
    if flip:
        layers.append(_hand_linear([[-1.0]]))
    model = nn.Sequential(*layers).eval()
    x = torch.tensor([xv], dtype=DTYPE)
    with torch.no_grad():
        y = model(x)
    (Rp, Rn), _ = nr.seed("bbox-regression", y, mode="contrastive")
    if flip:  # the flip unit has the single positive contribution (−1)·h > 0: both maps pass whole
        Rp, Rn = nr.linear_rule(lin(x).detach(), layers[1].weight, None, (Rp, Rn), "contrastive").relevance
    naive = nr.linear_rule(x, lin.weight, lin.bias, (Rp, Rn), "contrastive").relevance
    expected = (torch.tensor([exp_p], dtype=torch.float64), torch.tensor([exp_n], dtype=torch.float64))
    # the naive loop gives the hand-computed numbers ...
    nr.compare_rel(naive, expected, "contrastive", f"naive {name}", rtol=1e-12)
    # ... and so must the engine
    nr.check_engine(model, x, "contrastive", expected, f"contrastive {name}", task="bbox-regression")


@pytest.mark.parametrize("side", ["above", "below"])
@pytest.mark.parametrize("act", ["sigmoid", "tanh"])
def test_contrastive_ignores_saturation(act, side):
    """Spec 4 has no saturation ("No saturation and no bias absorption"): a sigmoid/tanh unit
    with t = ±5 beyond its bounds still passes the zeroed side its share (t > 0: the positive
    contributor takes the larger amount, the negative one the smaller; t < 0 the reverse)."""
    rows = [[6.0, -1.0]] if side == "above" else [[1.0, -6.0]]
    lin = _hand_linear(rows, None)
    model = nn.Sequential(lin, ACTS[act]()).eval()
    x = torch.tensor([[1.0, 1.0]], dtype=DTYPE)
    with torch.no_grad():
        y = model(x)
    (Rp, Rn), _ = nr.seed("bbox-regression", y, mode="contrastive")
    rp, rn = float(Rp[0, 0]), float(Rn[0, 0])
    exp_p = torch.zeros(1, 2, dtype=torch.float64)
    exp_n = torch.zeros(1, 2, dtype=torch.float64)
    pos_i, neg_i = 0, 1
    larger_to = pos_i if side == "above" else neg_i
    smaller_to = neg_i if side == "above" else pos_i
    if rp > rn:
        exp_p[0, larger_to] = rp
        exp_n[0, smaller_to] = rn
    else:
        exp_n[0, larger_to] = rn
        exp_p[0, smaller_to] = rp
    assert min(abs(rp), abs(rn)) > 1e-3  # both sides carry something visible
    naive = nr.linear_rule(x, lin.weight, None, (Rp, Rn), "contrastive", act).relevance
    nr.compare_rel(naive, (exp_p, exp_n), "contrastive", "naive", rtol=1e-12)
    nr.check_engine(model, x, "contrastive", (exp_p, exp_n), f"contrastive no saturation {act} {side}",
                    task="bbox-regression")


# ============================================================================================
# 2. convolutions
# ============================================================================================

CONV_ACTS = {"conv1d_s2_p1_g2": "tanh", "conv1d_same_even": "leaky_relu", "conv1d_dil2_same_even": "none",
             "conv1d_dil2_p2": "sigmoid", "conv2d_mixed_g2": "tanh", "conv2d_same_even": "sigmoid",
             "conv2d_depthwise": "silu", "conv2d_k1_pad_only_border": "tanh", "conv3d": "tanh", "conv3d_dil_g2": "leaky_relu",
             "convT1d_s2_op1_g2": "tanh", "convT1d_dil2": "sigmoid", "convT2d": "leaky_relu"}


def _conv_case(name, transposed):
    c = (CONVT_CASES if transposed else CONV_CASES)[name]
    act = CONV_ACTS[name]
    lo, hi = nr.SATURATION[act]
    for s in range(200):
        torch.manual_seed(200 + s)
        m = _conv_module(c, transposed).to(DTYPE)
        with torch.no_grad():
            m.weight.mul_(6.0)
            m.bias.uniform_(-1.5, 1.5)
        x = torch.randn(2, c["cin"], *c["L"], dtype=DTYPE)
        with torch.no_grad():
            t = m(x)
        ok = True
        for bound in (lo, hi):
            if bound is not None and ((t - bound).abs().min() < MARGIN):
                ok = False
        if lo is not None and not (t < lo).any():
            ok = False
        if hi is not None and not (t > hi).any():
            ok = False
        if ok:
            return c, act, m, x
    raise AssertionError("no conv case")


@pytest.mark.parametrize("name", list(CONV_CASES) + list(CONVT_CASES))
@pytest.mark.parametrize("mode", MODES)
def test_conv(mode, name):
    transposed = name in CONVT_CASES
    c, act, conv, x = _conv_case(name, transposed)
    layers = [conv] + ([] if ACTS[act] is None else [ACTS[act]()])
    model = nn.Sequential(*layers, nn.Flatten()).eval()
    with torch.no_grad():
        y = model(x)
    R = _seed_for(y, mode, _task(mode))
    out_shape = (y.shape[0],) + tuple(conv(x).shape[1:])
    R = _map(R, mode, lambda r: r.reshape(out_shape))
    fn = nr.conv_transpose_rule if transposed else nr.conv_rule
    exp_R = fn(x, conv.weight, conv.bias, R, mode, act, **_conv_kw(c, transposed)).relevance
    nr.check_engine(model, x, mode, exp_R, f"{name}+{act} {mode}", task=_task(mode))


# ============================================================================================
# 3. batch norm
# ============================================================================================


def _randomise_bn(bn, g):
    with torch.no_grad():
        C = bn.num_features
        bn.running_mean.copy_(torch.randn(C, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(C, generator=g, dtype=torch.float64) * 2 + 0.3)
        bn.weight.copy_(torch.randn(C, generator=g, dtype=torch.float64) * 1.5)
        bn.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
    return bn.eval()


@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv2d_bn_no_affine"])
@pytest.mark.parametrize("mode", MODES)
def test_batchnorm_folded(mode, kind):
    """Conv/Linear -> BN -> tanh: the naive loop runs on W' = W·γ/√(var+eps),
    b' = (b − μ)·γ/√(var+eps) + β, with tanh's saturation on the folded pre-activation."""
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    if kind == "linear":
        layer = nn.Linear(5, 6).to(DTYPE)
        bn = _randomise_bn(nn.BatchNorm1d(6).to(DTYPE), g)
        x = torch.randn(4, 5, generator=g, dtype=DTYPE)
    elif kind == "conv2d":
        layer = nn.Conv2d(2, 3, 3, padding=1, stride=1).to(DTYPE)
        bn = _randomise_bn(nn.BatchNorm2d(3).to(DTYPE), g)
        x = torch.randn(2, 2, 4, 4, generator=g, dtype=DTYPE)
    else:  # BN without γ, β (affine=False): γ = 1, β = 0 in the fold
        layer = nn.Conv2d(2, 3, 3, padding=1, stride=1).to(DTYPE)
        bn = nn.BatchNorm2d(3, affine=False).to(DTYPE).eval()
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(3, generator=g, dtype=torch.float64))
            bn.running_var.copy_(torch.rand(3, generator=g, dtype=torch.float64) * 2 + 0.3)
        x = torch.randn(2, 2, 4, 4, generator=g, dtype=DTYPE)
    with torch.no_grad():
        layer.weight.mul_(4.0)
    model = nn.Sequential(layer, bn, nn.Tanh(), nn.Flatten()).eval()
    with torch.no_grad():
        t = bn(layer(x))
        y = model(x)
    assert (t < -2).any() and (t > 2).any() and ((t.abs() - 2).abs().min() > MARGIN)
    W2, b2 = nr.fold_bn(layer.weight, layer.bias, bn)
    R = _map(_seed_for(y, mode, _task(mode)), mode, lambda r: r.reshape(t.shape))
    if kind == "linear":
        exp_R = nr.linear_rule(x, W2, b2, R, mode, "tanh").relevance
    else:
        exp_R = nr.conv_rule(x, W2, b2, R, mode, "tanh", padding=1).relevance
    nr.check_engine(model, x, mode, exp_R, f"{kind}+bn folded {mode}", task=_task(mode))


def fold_bn_transposed(W, b, bn, groups):
    """BN after a transposed conv: the output channel oc = g·(C_out/groups) + ocl is dim 1 of
    W (C_in, C_out/groups, *K): W'[ic, ocl] = W[ic, ocl]·γ_oc/√(var_oc+eps) for ic in group g,
    b'_oc = (b_oc − μ_oc)·γ_oc/√(var_oc+eps) + β_oc (a loop over channels)."""
    import math

    W2 = W.detach().to(torch.float64).clone()
    cin, cout_g = W2.shape[0], W2.shape[1]
    cin_g = cin // groups
    bl = nr.flat(b)
    b2 = []
    for oc in range(cout_g * groups):
        g, ocl = divmod(oc, cout_g)
        scale = float(bn.weight[oc]) / math.sqrt(float(bn.running_var[oc]) + bn.eps)
        for ic in range(g * cin_g, (g + 1) * cin_g):
            W2[ic, ocl] = W2[ic, ocl] * scale
        b2.append((bl[oc] - float(bn.running_mean[oc])) * scale + float(bn.bias[oc]))
    return W2, torch.tensor(b2, dtype=torch.float64)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("mode", MODES)
def test_batchnorm_after_conv_transpose(mode, groups):
    """ConvTranspose2d -> BN -> tanh: the BN folds along the transposed weight's output axis."""
    g = torch.Generator().manual_seed(8)
    torch.manual_seed(8)
    conv = nn.ConvTranspose2d(4, 4, 2, stride=2, groups=groups).to(DTYPE)
    bn = _randomise_bn(nn.BatchNorm2d(4).to(DTYPE), g)
    with torch.no_grad():
        conv.weight.mul_(5.0)
    x = torch.randn(2, 4, 2, 3, generator=g, dtype=DTYPE)
    model = nn.Sequential(conv, bn, nn.Tanh(), nn.Flatten()).eval()
    with torch.no_grad():
        t = bn(conv(x))
        y = model(x)
    assert (t < -2).any() and (t > 2).any() and ((t.abs() - 2).abs().min() > MARGIN)
    W2, b2 = fold_bn_transposed(conv.weight, conv.bias, bn, groups)
    with torch.no_grad():
        assert torch.allclose(F.conv_transpose2d(x, W2, b2, stride=2, groups=groups), t, atol=1e-12)
    R = _map(_seed_for(y, mode, _task(mode)), mode, lambda r: r.reshape(t.shape))
    exp_R = nr.conv_transpose_rule(x, W2, b2, R, mode, "tanh", stride=2, groups=groups).relevance
    nr.check_engine(model, x, mode, exp_R, f"convT+bn folded g{groups} {mode}", task=_task(mode))


@pytest.mark.parametrize("mode", MODES)
def test_batchnorm_standalone(mode):
    """BN that follows no conv/linear: a per-channel affine map with the section-3 rule
    (each element is a unit with the single contribution a_c·x and bias β − μ·a_c)."""
    g = torch.Generator().manual_seed(3)
    bn = _randomise_bn(nn.BatchNorm2d(3).to(DTYPE), g)
    model = nn.Sequential(bn, nn.Flatten()).eval()
    x = torch.randn(2, 3, 2, 3, generator=g, dtype=DTYPE)
    with torch.no_grad():
        y = model(x)
    R = _map(_seed_for(y, mode, _task(mode)), mode, lambda r: r.reshape(x.shape))
    exp_R = nr.batchnorm_rule(x, bn, R, mode).relevance
    nr.check_engine(model, x, mode, exp_R, f"standalone bn {mode}", task=_task(mode))


# ============================================================================================
# 4. pooling and reductions
# ============================================================================================


class Op(nn.Module):
    """A module whose forward is exactly ``fn``."""

    def __init__(self, fn, **params):
        super().__init__()
        self.fn = fn
        for k, v in params.items():
            if isinstance(v, nn.Parameter):
                setattr(self, k, v)
            else:
                self.register_buffer(k, v)

    def forward(self, x):
        return self.fn(self, x)


MAXPOOL_CASES = {
    "max1d_k3_s2_p1": (1, dict(kernel=3, stride=2, padding=1, dilation=1)),
    "max1d_k2_s1_d2": (1, dict(kernel=2, stride=1, padding=0, dilation=2)),
    "max2d_k3_s1_p1": (2, dict(kernel=3, stride=1, padding=1, dilation=1)),
    "max2d_mixed": (2, dict(kernel=(2, 3), stride=(1, 2), padding=1, dilation=(2, 1))),
    "max1d_k4_s2_ceil": (1, dict(kernel=4, stride=2, padding=0, dilation=1, ceil_mode=True)),
    # non-overlapping windows (stride = kernel), the last row / column left out of every window
    "max1d_k2_s2_tiled_crop": (1, dict(kernel=2, stride=2, padding=0, dilation=1)),
    "max2d_k2_s2_tiled_crop": (2, dict(kernel=2, stride=2, padding=0, dilation=1)),
    "max2d_k2x3_tiled_crop": (2, dict(kernel=(2, 3), stride=(2, 3), padding=0, dilation=1)),
    "max2d_k3x2_s3x2_tiled_ceil": (2, dict(kernel=(3, 2), stride=(3, 2), padding=0, dilation=1, ceil_mode=True)),
    "max2d_k2_s2_ceil": (2, dict(kernel=2, stride=2, padding=0, dilation=1, ceil_mode=True)),
}


@pytest.mark.parametrize("name", list(MAXPOOL_CASES))
@pytest.mark.parametrize("mode", MODES)
def test_maxpool(mode, name):
    """Overlapping, padded and dilated windows on small integers (many ties: shared equally;
    all-negative windows next to the padding: the padding never wins)."""
    nd, kw = MAXPOOL_CASES[name]
    torch.manual_seed(11)
    shape = (2, 2, 9) if nd == 1 else (2, 2, 5, 6)
    x = torch.randint(-3, 3, shape).to(DTYPE)
    x[0, 0].fill_(-2.0)  # one map all equal and negative
    pool = (nn.MaxPool1d if nd == 1 else nn.MaxPool2d)(kw["kernel"], kw["stride"], kw["padding"], kw["dilation"],
                                                       ceil_mode=kw.get("ceil_mode", False))
    model = nn.Sequential(pool, nn.Flatten()).eval()
    with torch.no_grad():
        y = model(x)
        py = pool(x)
    assert torch.equal(nr.maxpool_forward(x, **kw), py.double())
    if kw.get("ceil_mode"):  # the case does produce a clipped last window
        assert nr.pool_windows(shape[2:], kw["kernel"], kw["stride"], kw["padding"], 1, True)[1] != \
            nr.pool_windows(shape[2:], kw["kernel"], kw["stride"], kw["padding"], 1, False)[1]
    R = _map(_seed_for(y, mode, _task(mode)), mode, lambda r: r.reshape(py.shape))
    exp_R = nr.maxpool_rule(x, R, mode, **kw)
    nr.check_engine(model, x, mode, exp_R, f"{name} {mode}", task=_task(mode))


AVGPOOL_CASES = {
    "avg1d_k3_s2_p1": (1, dict(kernel=3, stride=2, padding=1)),
    "avg1d_k4_s1": (1, dict(kernel=4, stride=1, padding=0)),
    "avg2d_k3_s1_p1": (2, dict(kernel=3, stride=1, padding=1)),
    "avg2d_k2_s1_p1": (2, dict(kernel=(2, 3), stride=(1, 2), padding=(1, 1))),
    "avg2d_k3_s2_p1_nopadcount": (2, dict(kernel=3, stride=2, padding=1), dict(count_include_pad=False)),
    "avg1d_k2_s2_ceil": (1, dict(kernel=2, stride=2, padding=0, ceil_mode=True), dict(ceil_mode=True)),
    "avg2d_k3_s2_p1_ceil": (2, dict(kernel=3, stride=2, padding=1, ceil_mode=True), dict(ceil_mode=True)),
}


@pytest.mark.parametrize("name", list(AVGPOOL_CASES))
@pytest.mark.parametrize("mode", MODES)
def test_avgpool(mode, name):
    nd, kw, *extra = AVGPOOL_CASES[name]
    torch.manual_seed(12)
    shape = (2, 2, 9) if nd == 1 else (2, 2, 5, 6)
    x = torch.randn(shape, dtype=DTYPE)
    pool = (nn.AvgPool1d if nd == 1 else nn.AvgPool2d)(kw["kernel"], kw["stride"], kw["padding"],
                                                       **(extra[0] if extra else {}))
    if name.endswith("ceil"):
        assert nr.pool_windows(shape[2:], kw["kernel"], kw["stride"], kw["padding"], 1, True)[1] != \
            nr.pool_windows(shape[2:], kw["kernel"], kw["stride"], kw["padding"], 1, False)[1]
    model = nn.Sequential(pool, nn.Flatten()).eval()
    with torch.no_grad():
        y = model(x)
        py = pool(x)
    R = _map(_seed_for(y, mode, _task(mode)), mode, lambda r: r.reshape(py.shape))
    exp_R = nr.avgpool_rule(x, R, mode, **kw)
    nr.check_engine(model, x, mode, exp_R, f"{name} {mode}", task=_task(mode))


ADAPTIVE_CASES = {
    "adaptive_avg1d_7to4": (nn.AdaptiveAvgPool1d(4), (2, 2, 7), 4, "avg"),
    "adaptive_avg2d_5x7to2x3": (nn.AdaptiveAvgPool2d((2, 3)), (2, 2, 5, 7), (2, 3), "avg"),
    "adaptive_avg1d_3to5_upsample": (nn.AdaptiveAvgPool1d(5), (2, 2, 3), 5, "avg"),
    "global_avg2d": (nn.AdaptiveAvgPool2d(1), (2, 3, 3, 4), 1, "avg"),
    "global_avg1d": (nn.AdaptiveAvgPool1d(1), (2, 3, 5), 1, "avg"),
    "adaptive_max2d_5x7to2x3": (nn.AdaptiveMaxPool2d((2, 3)), (2, 2, 5, 7), (2, 3), "max"),
}


def _adaptive_max_rule(x, R, mode, out_size):
    """Max rule over adaptive windows (winner(s) take the window's relevance, ties share)."""
    wins, _ = nr.adaptive_windows(list(x.shape[2:]), out_size)
    return nr.max_windows_rule(x, R, mode, wins)


@pytest.mark.parametrize("name", list(ADAPTIVE_CASES))
@pytest.mark.parametrize("mode", MODES)
def test_adaptive_and_global_pool(mode, name):
    pool, shape, out_size, kind = ADAPTIVE_CASES[name]
    torch.manual_seed(13)
    x = torch.randn(shape, dtype=DTYPE) if kind == "avg" else torch.randint(-2, 3, shape).to(DTYPE)
    model = nn.Sequential(pool, nn.Flatten()).eval()
    with torch.no_grad():
        y = model(x)
        py = pool(x)
    R = _map(_seed_for(y, mode, _task(mode)), mode, lambda r: r.reshape(py.shape))
    if kind == "avg":
        exp_R = nr.adaptive_avgpool_rule(x, R, mode, out_size)
    else:
        exp_R = _adaptive_max_rule(x, R, mode, out_size)
    nr.check_engine(model, x, mode, exp_R, f"{name} {mode}", task=_task(mode))


REDUCE_CASES = {
    "sum_dim1": (lambda m, x: x.sum(dim=1), (1,), False),
    "sum_dims12_keep": (lambda m, x: x.sum(dim=(1, 2), keepdim=True), (1, 2), True),
    "mean_dim2": (lambda m, x: x.mean(dim=2), (2,), False),
    "mean_dims23": (lambda m, x: x.mean(dim=(2, 3)), (2, 3), False),
    "mean_neg_dim": (lambda m, x: x.mean(dim=-1), (3,), False),
}


@pytest.mark.parametrize("name", list(REDUCE_CASES))
@pytest.mark.parametrize("mode", MODES)
def test_sum_mean(mode, name):
    fn, dims, keep = REDUCE_CASES[name]
    torch.manual_seed(14)
    x = torch.randn(2, 3, 4, 2, dtype=DTYPE)
    model = Op(fn).eval()
    with torch.no_grad():
        y = model(x)
    R = _seed_for(y, mode, _task(mode))
    exp_R = nr.reduce_rule(x, R, mode, dims, keepdim=keep)
    nr.check_engine(model, x, mode, exp_R, f"{name} {mode}", task=_task(mode))


# ============================================================================================
# 5. elementwise arithmetic, pass-through ops
# ============================================================================================


BIN_CASES = ["add", "add_bcast", "sub", "mul_two", "mul_two_bcast", "add_same_operand", "mul_same_operand"]


@pytest.mark.parametrize("name", BIN_CASES)
@pytest.mark.parametrize("mode", MODES)
def test_binary_ops_of_two_activations(mode, name):
    """a = x[:, :4], b = x[:, 4:] (or x[:, 4:5] broadcast): add / sub share ∝ |term|; a product
    of two activations gives each factor half."""
    torch.manual_seed(15)
    x = torch.randn(3, 8, dtype=DTYPE)
    fns = {
        "add": lambda m, x: x[:, :4] + x[:, 4:],
        "add_bcast": lambda m, x: x[:, :4] + x[:, 4:5],
        "sub": lambda m, x: x[:, :4] - x[:, 4:],
        "mul_two": lambda m, x: x[:, :4] * x[:, 4:],
        "mul_two_bcast": lambda m, x: x[:, :4] * x[:, 4:5],
        # both operands the very same tensor: each of the two terms/factors still gets its
        # share, and both shares land on it (x + x: R/2 + R/2; x * x: R/2 + R/2)
        "add_same_operand": lambda m, x: (lambda a: a + a)(x[:, :4]),
        "mul_same_operand": lambda m, x: (lambda a: a * a)(x[:, :4]),
    }
    model = Op(fns[name]).eval()
    with torch.no_grad():
        y = model(x)
    R = _seed_for(y, mode, _task(mode))
    a = x[:, :4]
    b = x[:, 4:5] if "bcast" in name else x[:, 4:]
    if name == "add_same_operand":
        (ra, rb), _ = nr.add_rule([a, a], R, mode)
        exp_R = _map(R, mode, lambda r: torch.cat([r.double(), torch.zeros(3, 4, dtype=torch.float64)], 1))
        naive_sum = (ra[0] + rb[0], ra[1] + rb[1]) if mode == "contrastive" else ra + rb
        nr.compare_rel(_map(naive_sum, mode, lambda r: torch.cat([r, torch.zeros(3, 4, dtype=torch.float64)], 1)),
                       exp_R, mode, "naive x + x", rtol=1e-12)
        nr.check_engine(model, x, mode, exp_R, f"{name} {mode}", task=_task(mode))
        return
    if name == "mul_same_operand":
        ra, rb = nr.mul_two_rule(tuple(a.shape), tuple(a.shape), R, mode)
        naive_sum = (ra[0] + rb[0], ra[1] + rb[1]) if mode == "contrastive" else ra + rb
        exp_R = _map(naive_sum, mode, lambda r: torch.cat([r, torch.zeros(3, 4, dtype=torch.float64)], 1))
        nr.check_engine(model, x, mode, exp_R, f"{name} {mode}", task=_task(mode))
        return
    if name.startswith("add"):
        (ra, rb), _ = nr.add_rule([a, b], R, mode)
    elif name == "sub":
        (ra, rb), _ = nr.sub_rule(a, b, R, mode)
    else:
        ra, rb = nr.mul_two_rule(tuple(a.shape), tuple(b.shape), R, mode)

    def place(pa, pb):
        out = torch.zeros(3, 8, dtype=torch.float64)
        out[:, :4] += pa
        out[:, 4:4 + pb.shape[1]] += pb
        return out

    if mode == "contrastive":
        exp_R = (place(ra[0], rb[0]), place(ra[1], rb[1]))
    else:
        exp_R = place(ra, rb)
    nr.check_engine(model, x, mode, exp_R, f"{name} {mode}", task=_task(mode))


CONST_CASES = ["add_scalar", "add_buffer", "add_param", "radd_scalar", "sub_scalar", "rsub_scalar",
               "sub_buffer", "mul_scalar", "mul_param", "rmul_buffer", "div_scalar", "div_buffer"]


@pytest.mark.parametrize("name", CONST_CASES)
@pytest.mark.parametrize("mode", MODES)
def test_ops_with_constants(mode, name):
    """Adding a constant / buffer / parameter = a bias (its share is absorbed); sub likewise on
    the signed terms; mul or div by a constant: all to the activation."""
    torch.manual_seed(16)
    x = torch.randn(3, 5, dtype=DTYPE)
    c = torch.tensor([0.7, -1.3, 0.2, -0.1, 2.0], dtype=DTYPE)
    params = {}
    if name in ("add_buffer", "sub_buffer", "rmul_buffer", "div_buffer"):
        params["c"] = c.clone()
    if name in ("add_param", "mul_param"):
        params["c"] = nn.Parameter(c.clone())
    fns = {
        "add_scalar": (lambda m, x: x + 0.7, [("const", 0.7)], "add"),
        "radd_scalar": (lambda m, x: -0.4 + x, [("const", -0.4)], "add"),
        "add_buffer": (lambda m, x: x + m.c, [("const", c)], "add"),
        "add_param": (lambda m, x: x + m.c, [("const", c)], "add"),
        "sub_scalar": (lambda m, x: x - 0.5, [("const", -0.5)], "add"),
        "rsub_scalar": (lambda m, x: 0.5 - x, None, "rsub"),
        "sub_buffer": (lambda m, x: x - m.c, [("const", -c)], "add"),
        "mul_scalar": (lambda m, x: x * 3.0, None, "mul"),
        "mul_param": (lambda m, x: x * m.c, None, "mul"),
        "rmul_buffer": (lambda m, x: m.c * x, None, "mul"),
        "div_scalar": (lambda m, x: x / 4.0, None, "mul"),
        "div_buffer": (lambda m, x: x / m.c, None, "mul"),
    }
    fn, consts, kind = fns[name]
    model = Op(fn, **params).eval()
    with torch.no_grad():
        y = model(x)
    R = _seed_for(y, mode, _task(mode))
    if kind == "add":
        (rx,), absorbed = nr.add_rule([x] + consts, R, mode)
    elif kind == "rsub":
        (rx,), absorbed = nr.add_rule([("const", 0.5), -x], R, mode)
    else:
        rx = nr.mul_const_rule(R, mode)
        absorbed = None
    exp = nr.check_engine(model, x, mode, rx, f"{name} {mode}", task=_task(mode))
    if absorbed is not None and mode != "contrastive":
        # the absorbed share is the difference between the seed and the input total
        lost = exp.seed_relevance.double() - exp.input_total().double()
        nr.compare(lost, absorbed, 1e-9 if DTYPE == torch.float64 else 1e-5, f"{name} absorbed",
                   atol=1e-9)


PASS_CASES = {
    "softmax": lambda m, x: torch.softmax(x, dim=-1),
    "log_softmax": None,
    "relu": lambda m, x: torch.relu(x),
    "sigmoid": lambda m, x: torch.sigmoid(x),
    "tanh": lambda m, x: torch.tanh(x),
    "gelu": lambda m, x: F.gelu(x),
    "silu": lambda m, x: F.silu(x),
    "leaky_relu": lambda m, x: F.leaky_relu(x, 0.2),
    "dropout_eval": lambda m, x: F.dropout(x, 0.5, training=False),
    "contiguous": lambda m, x: x.transpose(1, 2).contiguous().transpose(1, 2),
    # spec 5: "division by an activation-derived normaliser: all to the numerator"
    "div_by_activation_normaliser": lambda m, x: x / (x.sum(-1, keepdim=True) + 10.0),
}
PASS_CASES.pop("log_softmax")


@pytest.mark.parametrize("name", list(PASS_CASES) + ["layer_norm", "layer_norm_affine", "rms_norm", "identity"])
@pytest.mark.parametrize("mode", MODES)
def test_passthrough_ops(mode, name):
    """Activations, softmax, layer norm, dropout (eval), identity: relevance passes unchanged."""
    torch.manual_seed(17)
    x = torch.randn(3, 2, 5, dtype=DTYPE)
    if name == "layer_norm":
        model = nn.LayerNorm(5, elementwise_affine=False).to(DTYPE)
    elif name == "layer_norm_affine":
        model = nn.LayerNorm(5).to(DTYPE)
        with torch.no_grad():
            model.weight.uniform_(-2, 2)
            model.bias.uniform_(-1, 1)
    elif name == "rms_norm":
        model = nn.RMSNorm(5).to(DTYPE)
        with torch.no_grad():
            model.weight.uniform_(-2, 2)
    elif name == "identity":
        model = nn.Sequential(nn.Identity(), nn.Dropout(0.3))
    else:
        model = Op(PASS_CASES[name])
    model.eval()
    with torch.no_grad():
        y = model(x)
    R = _seed_for(y, mode, _task(mode))
    nr.check_engine(model, x, mode, nr.passthrough_rule(R, mode), f"{name} {mode}", task=_task(mode))


SHAPE_CASES = {
    "reshape": lambda x: x.reshape(x.shape[0], 4, 6),
    "view": lambda x: x.view(x.shape[0], -1),
    "flatten": lambda x: torch.flatten(x, 1),
    "unflatten": lambda x: x.unflatten(2, (2, 2)),
    "permute": lambda x: x.permute(0, 3, 1, 2),
    "transpose": lambda x: x.transpose(1, 3),
    "slice": lambda x: x[:, 1:, :, ::2],
    "slice_neg": lambda x: x[..., -3:-1],
    "select": lambda x: x[:, 1],
    "select_last": lambda x: x[:, :, -1, :],
    "index_repeat": lambda x: x[:, :, [2, 0, 2, 1]],
    "expand": lambda x: x[:, :, :1, :].expand(-1, -1, 5, -1),
    "unsqueeze_expand": lambda x: x.unsqueeze(1).expand(-1, 3, -1, -1, -1),
    "squeeze": lambda x: x[:, :, 1:2].squeeze(2),
    "unsqueeze": lambda x: x.unsqueeze(-1),
    "split_cat": lambda x: torch.cat(list(reversed(torch.split(x, [1, 2, 1], dim=2))), dim=2),
    "chunk_cat": lambda x: torch.cat(torch.chunk(x, 2, dim=2)[::-1], dim=1),
    "cat_dup": lambda x: torch.cat([x, x[:, :1]], dim=1),
    "stack": lambda x: torch.stack([x[:, 0], x[:, 1] , x[:, 0]], dim=-1),
}


@pytest.mark.parametrize("name", list(SHAPE_CASES))
@pytest.mark.parametrize("mode", MODES)
def test_shape_ops(mode, name):
    """Shape ops move relevance exactly as they move values (duplicates sum, slices leave 0)."""
    torch.manual_seed(18)
    x = torch.randn(2, 2, 4, 3, dtype=DTYPE)
    fn = SHAPE_CASES[name]
    model = Op(lambda m, x: fn(x)).eval()
    with torch.no_grad():
        y = model(x)
    R = _seed_for(y, mode, _task(mode))
    (rx,) = nr.shape_rule(fn, [x], R, mode)
    nr.check_engine(model, x, mode, rx, f"{name} {mode}", task=_task(mode))


# ============================================================================================
# 6. matmul with a parameter, Linear on token sequences
# ============================================================================================


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("mode", MODES)
def test_matmul_with_parameter(mode, shape):
    """x @ W with W a parameter is an affine map without bias: unit j is column j of W."""
    torch.manual_seed(19)
    W = nn.Parameter(torch.randn(5, 4, dtype=DTYPE) * 2)
    model = Op(lambda m, x: x @ m.W, W=W).eval()
    x = torch.randn(*shape, dtype=DTYPE)
    with torch.no_grad():
        y = model(x)
    R = _seed_for(y, mode, _task(mode))
    # tokens are independent samples of the same affine map
    xf = x.reshape(-1, 5)
    Rf = _map(R, mode, lambda r: r.reshape(-1, 4))
    exp_R = _map(nr.linear_rule(xf, W.detach().T, None, Rf, mode).relevance, mode, lambda r: r.reshape(shape))
    nr.check_engine(model, x, mode, exp_R, f"matmul param {shape} {mode}", task=_task(mode))


@pytest.mark.parametrize("mode", MODES)
def test_linear_on_token_sequences(mode):
    """nn.Linear on (N, T, d) followed by tanh: every token is a unit set of its own."""
    lin, x, _ = _linear_case("tanh")
    xs = x.reshape(2, 3, 5)
    model = nn.Sequential(lin, nn.Tanh()).eval()
    with torch.no_grad():
        y = model(xs)
    R = _seed_for(y, mode, _task(mode))
    Rf = _map(R, mode, lambda r: r.reshape(6, -1))
    exp_R = _map(nr.linear_rule(x, lin.weight, lin.bias, Rf, mode, "tanh").relevance, mode,
                 lambda r: r.reshape(2, 3, 5))
    nr.check_engine(model, xs, mode, exp_R, f"linear tokens {mode}", task=_task(mode))


@pytest.mark.parametrize("between", ["dropout_eval", "unflatten"])
@pytest.mark.parametrize("mode", ["default", "signed"])
def test_saturation_seen_through_identity_ops(mode, between):
    """Linear -> Dropout(eval) -> sigmoid (or Linear -> unflatten -> sigmoid): the ops between
    change no value (spec 5: "pass through" / "move relevance exactly as the op moves values"),
    so the layer's output still feeds the sigmoid and its saturation applies (spec 3: "When the
    layer's output feeds an activation φ ..."). Reading of the spec; see the test report."""
    lin, x, _ = _linear_case("sigmoid")
    if between == "dropout_eval":
        model = nn.Sequential(lin, nn.Dropout(0.2), nn.Sigmoid())
    else:
        model = nn.Sequential(lin, nn.Unflatten(1, (2, 4)), nn.Sigmoid(), nn.Flatten())
    model.eval()
    with torch.no_grad():
        y = model(x)
    R = _seed_for(y, mode, "regression")
    exp_R = nr.linear_rule(x, lin.weight, lin.bias, R, mode, "sigmoid").relevance
    nr.check_engine(model, x, mode, exp_R, f"saturation through {between} {mode}")


# ============================================================================================
# 7. the same rules on float32 models (what users run): float32 round-off only
# ============================================================================================


@pytest.mark.parametrize("name", ["conv2d_mixed_g2", "conv1d_same_even", "conv3d", "convT2d"])
@pytest.mark.parametrize("mode", MODES)
def test_conv_float32(mode, name):
    transposed = name in CONVT_CASES
    c, act, conv, x = _conv_case(name, transposed)
    conv = conv.float()
    x = x.float()
    layers = [conv] + ([] if ACTS[act] is None else [ACTS[act]()])
    model = nn.Sequential(*layers, nn.Flatten()).eval()
    with torch.no_grad():
        y = model(x)
        t = conv(x)
    lo, hi = nr.SATURATION[act]
    for bound in (lo, hi):
        if bound is not None:
            assert (t - bound).abs().min() > 1e-4
    R = _map(_seed_for(y, mode, _task(mode)), mode, lambda r: r.reshape(t.shape))
    fn = nr.conv_transpose_rule if transposed else nr.conv_rule
    exp_R = fn(x, conv.weight, conv.bias, R, mode, act, **_conv_kw(c, transposed)).relevance
    nr.check_engine(model, x, mode, exp_R, f"{name}+{act} f32 {mode}", task=_task(mode), rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_linear_and_pooling_float32(mode):
    lin, x, _ = _linear_case("tanh")
    lin = lin.float()
    x = x.float()
    model = nn.Sequential(lin, nn.Tanh()).eval()
    with torch.no_grad():
        y = model(x)
    R = _seed_for(y, mode, _task(mode))
    exp_R = nr.linear_rule(x, lin.weight, lin.bias, R, mode, "tanh").relevance
    nr.check_engine(model, x, mode, exp_R, f"linear+tanh f32 {mode}", task=_task(mode), rtol=1e-5)
    torch.manual_seed(12)
    x = torch.randn(2, 2, 5, 6)
    for pool, rule in ((nn.MaxPool2d(3, 1, 1), lambda x, R: nr.maxpool_rule(x, R, mode, 3, 1, 1)),
                       (nn.AvgPool2d(3, 2, 1), lambda x, R: nr.avgpool_rule(x, R, mode, 3, 2, 1))):
        model = nn.Sequential(pool, nn.Flatten()).eval()
        with torch.no_grad():
            y = model(x)
            py = pool(x)
        R = _map(_seed_for(y, mode, _task(mode)), mode, lambda r: r.reshape(py.shape))
        nr.check_engine(model, x, mode, rule(x, R), f"{type(pool).__name__} f32 {mode}", task=_task(mode), rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_batchnorm_after_activation_is_not_folded(mode):
    """Conv -> ReLU -> BN: the BN does not directly follow the conv, so it is a standalone
    per-channel affine map (spec 5) and the conv keeps its own weights with ReLU saturation."""
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    conv = nn.Conv1d(2, 3, 3, padding=1).to(DTYPE)
    bn = _randomise_bn(nn.BatchNorm1d(3).to(DTYPE), g)
    model = nn.Sequential(conv, nn.ReLU(), bn, nn.Flatten()).eval()
    x = torch.randn(2, 2, 6, generator=g, dtype=DTYPE)
    with torch.no_grad():
        h = torch.relu(conv(x))
        y = model(x)
    R = _map(_seed_for(y, mode, _task(mode)), mode, lambda r: r.reshape(h.shape))
    Rh = nr.batchnorm_rule(h, bn, R, mode).relevance
    exp_R = nr.conv_rule(x, conv.weight, conv.bias, Rh, mode, "relu", padding=1).relevance
    nr.check_engine(model, x, mode, exp_R, f"conv-relu-bn {mode}", task=_task(mode))
