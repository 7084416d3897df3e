"""Naive reference implementations of the DLBacktrace relevance rules.

Written straight from ``../shared/spec/backtrace-rules.md`` (the source of truth), as plain,
deliberately slow Python loops over samples, units, inputs and windows: the opposite of the
engine's vectorised code, so that an error in one is unlikely to be repeated in the other.
Every number here is a Python float (double precision); tensors are only used to carry shapes
in and out.

Conventions
-----------
* A *unit* is ``(contribs, b)``: ``contribs`` a list of ``(i, w_ji)`` with ``i`` a flat index
  into one sample's input, ``b`` the bias (0.0 when there is none).
* Relevance arguments are batch first and shaped like the tensor they belong to. In
  contrastive mode a relevance is the pair ``(R_plus, R_minus)``.
* Modes: ``"default"`` (spec 3), ``"signed"`` (spec 3b), ``"contrastive"`` (spec 4).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
from dataclasses import dataclass, field

import torch

MODES = ("default", "signed", "contrastive")

#: spec 3, saturation table: activation -> (l, u); None = no bound on that side.
SATURATION: dict[str, tuple[float | None, float | None]] = {
    "relu": (0.0, None),
    "leaky_relu": (0.0, None),
    "relu6": (0.0, None),
    "sigmoid": (-4.0, 4.0),
    "tanh": (-2.0, 2.0),
    "softmax": (-1.0, 2.0),
    "silu": (-6.0, None),
    "swish": (-6.0, None),
    "gelu": (-6.0, None),
    "identity": (None, None),
    "none": (None, None),
}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def flat(t: torch.Tensor) -> list[float]:
    """One sample (or any tensor) as a flat list of Python floats."""
    return [float(v) for v in t.detach().to(torch.float64).reshape(-1).tolist()]


def to_tensor(values: list[list[float]], shape) -> torch.Tensor:
    """A list of per-sample flat lists back into a float64 tensor of ``(N, *shape)``."""
    return torch.tensor(values, dtype=torch.float64).reshape(len(values), *shape)


def ravel(idx, shape) -> int:
    """Row-major flat index of the multi-index ``idx`` in ``shape``."""
    k = 0
    for i, s in zip(idx, shape):
        k = k * s + i
    return k


def unravel(k: int, shape) -> tuple[int, ...]:
    out = []
    for s in reversed(shape):
        out.append(k % s)
        k //= s
    return tuple(reversed(out))


def prod(xs) -> int:
    p = 1
    for v in xs:
        p *= int(v)
    return p


def compare(got: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "",
            atol: float = 0.0) -> tuple[float, float]:
    """Assert ``max|got - expected| <= rtol * max|expected| + atol``; return (abs, rel) error.

    When ``GOV_NAIVE_ERRLOG`` names a file, every comparison is appended to it (JSON lines)
    so the errors actually measured can be reported.
    """
    got = got.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values in the engine's result"
    err = float((got - expected).abs().max()) if got.numel() else 0.0
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    rel = err / scale if scale > 0 else err
    log = os.environ.get("GOV_NAIVE_ERRLOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({"what": what, "abs": err, "rel": rel, "scale": scale}) + "\n")
    assert err <= rtol * scale + atol, (
        f"{what}: max abs error {err:.3e} (relative {rel:.3e}) > rtol {rtol:g} x scale {scale:.3e}"
        f" + atol {atol:g}\n got={got.reshape(-1)[:12].tolist()}\n exp={expected.reshape(-1)[:12].tolist()}"
    )
    return err, rel


# --------------------------------------------------------------------------------------------
# spec section 2: seeding
# --------------------------------------------------------------------------------------------


def seed(task: str, y: torch.Tensor, mode: str = "default", target=None, multiplier: float = 100.0,
         kind: str = "output", threshold: float = 0.5):
    """Spec section 2, per sample.

    | task | default | contrastive (R+, R-) |
    | binary-classification | multiplier·p | R+ = multiplier·p, R- = multiplier·(1 − p) |
    | multiclass-classification | multiplier·y[target] at target, 0 elsewhere |
    |     R+ = multiplier·y[target] at target; R- = multiplier·y everywhere except target |
    | regression | multiplier·y | R+ = multiplier·max(y,0), R- = multiplier·max(−y,0) |
    | bbox-regression | multiplier·y on every output | R+ = multiplier·y, R- = multiplier·(1 − y) |
    | binary-segmentation | multiplier·p where p > threshold else 0 | R+ as default;
    |     R- = multiplier·(1 − p) at those pixels |
    | generation | multiplier·y[target_token] at the last position | as multiclass |

    ``target`` defaults to the argmax of the output per sample. ``kind="unit"``: 1.0 ·
    multiplier at the target. Returns (R, target) with R a tensor shaped like y or the pair
    (R+, R-) in contrastive mode; target is a list of ints or None.
    """
    y = y.detach().to(torch.float64).contiguous()
    n = y.shape[0]
    Rp = torch.zeros_like(y)
    Rn = torch.zeros_like(y)
    tgt = None
    if task == "binary-classification":
        for s in range(n):
            for k in range(y[s].numel()):
                p = float(y[s].reshape(-1)[k])
                Rp[s].view(-1)[k] = multiplier * (1.0 if kind == "unit" else p)
                Rn[s].view(-1)[k] = multiplier * (1.0 - p)
    elif task in ("multiclass-classification", "generation"):
        tgt = []
        for s in range(n):
            row = y[s] if task == "multiclass-classification" else y[s, -1]
            vals = flat(row)
            if target is None:
                best = 0
                for c in range(len(vals)):
                    if vals[c] > vals[best]:
                        best = c
                t = best
            else:
                t = int(target[s]) if hasattr(target, "__len__") else int(target)
            tgt.append(t)
            for c in range(len(vals)):
                if task == "multiclass-classification":
                    idx = (s, c)
                else:
                    idx = (s, y.shape[1] - 1, c)
                if c == t:
                    Rp[idx] = multiplier * (1.0 if kind == "unit" else vals[c])
                else:
                    Rn[idx] = multiplier * vals[c]
    elif task == "regression":
        for s in range(n):
            for k in range(y[s].numel()):
                v = float(y[s].reshape(-1)[k])
                if mode == "contrastive":
                    Rp[s].view(-1)[k] = multiplier * max(v, 0.0)
                    Rn[s].view(-1)[k] = multiplier * max(-v, 0.0)
                else:
                    Rp[s].view(-1)[k] = multiplier * v
    elif task == "bbox-regression":
        for s in range(n):
            for k in range(y[s].numel()):
                v = float(y[s].reshape(-1)[k])
                Rp[s].view(-1)[k] = multiplier * v
                Rn[s].view(-1)[k] = multiplier * (1.0 - v)
    elif task == "binary-segmentation":
        for s in range(n):
            for k in range(y[s].numel()):
                p = float(y[s].reshape(-1)[k])
                if p > threshold:
                    Rp[s].view(-1)[k] = multiplier * p
                    Rn[s].view(-1)[k] = multiplier * (1.0 - p)
    else:
        raise ValueError(task)
    if mode == "contrastive":
        return (Rp, Rn), tgt
    return Rp, tgt


# --------------------------------------------------------------------------------------------
# spec sections 3, 3b, 4: one affine unit
# --------------------------------------------------------------------------------------------


@dataclass
class UnitResult:
    shares: dict = field(default_factory=dict)  # i -> R_i (default/signed)
    plus: dict = field(default_factory=dict)  # i -> R+_i (contrastive)
    minus: dict = field(default_factory=dict)  # i -> R-_i (contrastive)
    bias: float = 0.0  # share absorbed by the bias
    dropped: float = 0.0  # relevance that arrived and passed nowhere
    rerouted: bool = False  # a side was zeroed by saturation
    rerouted_amount: float = 0.0  # what the zeroed side would have received unsaturated


def unit_default(R_j: float, contribs, b: float, sat=(None, None), signed: bool = False) -> UnitResult:
    """Spec 3 (and 3b when ``signed``) for one unit; ``contribs`` are ``(i, z_ji)``.

        P_j = Σ_i max(z_ji, 0),  N_j = Σ_i max(−z_ji, 0),  t_j = P_j − N_j + b_j
        default: R_i = Σ_j R_j · |z_ji| / (P_j + N_j + |b_j|)
        signed:  R_i = Σ_j R_j ·  z_ji  / (P_j + N_j + |b_j|)
        saturation (l, u) of the following activation: t_j < l -> P_j := 0, t_j > u -> N_j := 0,
        "with the zeroed side removed from both the numerator and the denominator".
        "A unit with P_j = N_j = |b_j| = 0 passes nothing (no NaN, no inf)."
    """
    P = 0.0
    N = 0.0
    for _, z in contribs:
        if z > 0:
            P += z
        elif z < 0:
            N += -z
    t = P - N + b
    lo, hi = sat
    keep_pos = not (lo is not None and t < lo)
    keep_neg = not (hi is not None and t > hi)
    den = (P if keep_pos else 0.0) + (N if keep_neg else 0.0) + abs(b)
    res = UnitResult(rerouted=(not keep_pos and P > 0) or (not keep_neg and N > 0))
    full = P + N + abs(b)
    if res.rerouted and full > 0:
        res.rerouted_amount = R_j * ((0.0 if keep_pos else P) + (0.0 if keep_neg else N)) / full
    if den == 0.0:
        res.dropped = R_j
        return res
    for i, z in contribs:
        if (z > 0 and keep_pos) or (z < 0 and keep_neg):
            res.shares[i] = res.shares.get(i, 0.0) + R_j * (z if signed else abs(z)) / den
    res.bias = R_j * abs(b) / den
    return res


def unit_contrastive(Rp_j: float, Rn_j: float, contribs, b: float) -> UnitResult:
    """Spec 4 for one unit; ``contribs`` are ``(i, z_ji)``.

        - only positive contributions: R+_i += R+_j · z_ji / P_j, R-_i += R-_j · z_ji / P_j
          over the positive contributors; likewise with |z_ji| / N_j when only negative ones.
        - otherwise t_j = P_j + b_j − N_j:
          t_j > 0: positive contributors receive the larger of R+_j, R-_j (∝ z_ji / P_j),
                   negative contributors the smaller (∝ |z_ji| / N_j);
          t_j < 0: negative contributors the larger, positive contributors the smaller;
          each amount stays in the map it came from;
          tie R+_j = R-_j: positive contributors take the R- amount, negative ones the R+
          amount; t_j = 0: nothing passes.
        (No saturation and no bias absorption in this mode.)
    """
    pos = [(i, z) for i, z in contribs if z > 0]
    neg = [(i, -z) for i, z in contribs if z < 0]
    P = sum(z for _, z in pos)
    N = sum(z for _, z in neg)
    res = UnitResult()

    def give(target: dict, members, total, amount):
        for i, z in members:
            target[i] = target.get(i, 0.0) + amount * z / total

    if pos and not neg:
        give(res.plus, pos, P, Rp_j)
        give(res.minus, pos, P, Rn_j)
        return res
    if neg and not pos:
        give(res.plus, neg, N, Rp_j)
        give(res.minus, neg, N, Rn_j)
        return res
    if not pos and not neg:
        res.dropped = Rp_j + Rn_j
        return res
    t = P + b - N
    if t == 0.0:
        res.dropped = Rp_j + Rn_j
        return res
    if Rp_j == Rn_j:
        give(res.minus, pos, P, Rn_j)
        give(res.plus, neg, N, Rp_j)
        return res
    # (map, amount) of the larger and the smaller
    larger = (res.plus, Rp_j) if Rp_j > Rn_j else (res.minus, Rn_j)
    smaller = (res.minus, Rn_j) if Rp_j > Rn_j else (res.plus, Rp_j)
    if t > 0:
        give(larger[0], pos, P, larger[1])
        give(smaller[0], neg, N, smaller[1])
    else:
        give(larger[0], neg, N, larger[1])
        give(smaller[0], pos, P, smaller[1])
    return res


# --------------------------------------------------------------------------------------------
# affine layers as lists of units
# --------------------------------------------------------------------------------------------


@dataclass
class LayerResult:
    relevance: object  # tensor shaped like x, or (R+, R-) in contrastive mode
    bias: torch.Tensor  # (N,) absorbed by biases
    dropped: torch.Tensor  # (N,) passed nowhere
    rerouted_units: int = 0
    rerouted: torch.Tensor | None = None  # (N,) relevance saturation moved to the other side


def affine_forward(x: torch.Tensor, units) -> torch.Tensor:
    """t_j = Σ_i w_ji x_i + b_j per sample, by loops (to check the unit enumeration)."""
    out = []
    for s in range(x.shape[0]):
        xs = flat(x[s])
        out.append([sum(w * xs[i] for i, w in c) + b for c, b in units])
    return torch.tensor(out, dtype=torch.float64)


def affine_rule(x: torch.Tensor, units, R, mode: str, act: str = "none") -> LayerResult:
    """Apply the per-unit rule of ``mode`` to every unit and every sample.

    ``R`` is (N, n_units) (any shape whose per-sample flattening follows the unit order), or
    the pair (R+, R-) in contrastive mode. Returns the input relevance shaped like ``x``.
    """
    n = x.shape[0]
    n_in = prod(x.shape[1:])
    sat = SATURATION[act]
    outs, outs_p, outs_n, biases, drops, moved = [], [], [], [], [], []
    rerouted = 0
    for s in range(n):
        xs = flat(x[s])
        if mode == "contrastive":
            rp = flat(R[0][s])
            rn = flat(R[1][s])
            accp = [0.0] * n_in
            accn = [0.0] * n_in
        else:
            rs = flat(R[s])
            acc = [0.0] * n_in
        bias = 0.0
        drop = 0.0
        rer = 0.0
        for j, (contribs, b) in enumerate(units):
            zs = [(i, w * xs[i]) for i, w in contribs]
            if mode == "contrastive":
                u = unit_contrastive(rp[j], rn[j], zs, b)
                for i, v in u.plus.items():
                    accp[i] += v
                for i, v in u.minus.items():
                    accn[i] += v
            else:
                u = unit_default(rs[j], zs, b, sat, signed=(mode == "signed"))
                for i, v in u.shares.items():
                    acc[i] += v
                rerouted += int(u.rerouted)
                rer += u.rerouted_amount
            bias += u.bias
            drop += u.dropped
        biases.append(bias)
        drops.append(drop)
        moved.append(rer)
        if mode == "contrastive":
            outs_p.append(accp)
            outs_n.append(accn)
        else:
            outs.append(acc)
    shape = tuple(x.shape[1:])
    if mode == "contrastive":
        rel = (to_tensor(outs_p, shape), to_tensor(outs_n, shape))
    else:
        rel = to_tensor(outs, shape)
    return LayerResult(rel, torch.tensor(biases, dtype=torch.float64),
                       torch.tensor(drops, dtype=torch.float64), rerouted,
                       torch.tensor(moved, dtype=torch.float64))


def linear_units(W: torch.Tensor, b: torch.Tensor | None):
    """Unit j of a Linear layer: contributions (i, W[j, i]) for every input i, bias b[j]."""
    Wl = W.detach().to(torch.float64).tolist()
    bl = [0.0] * len(Wl) if b is None else flat(b)
    return [([(i, float(w)) for i, w in enumerate(row)], bl[j]) for j, row in enumerate(Wl)]


def linear_rule(x, W, b, R, mode: str, act: str = "none") -> LayerResult:
    """Spec 3/3b/4 on ``y = x Wᵀ + b`` with x (N, in); R (N, out) or (R+, R-)."""
    return affine_rule(x, linear_units(W, b), R, mode, act)


def _tuple(v, n):
    if isinstance(v, (list, tuple)):
        assert len(v) == n
        return tuple(int(a) for a in v)
    return (int(v),) * n


def conv_padding(padding, kernel, dilation, nd):
    """Per-dimension (left, right) padding. 'same': total d·(k−1), left = total // 2, the odd
    remainder on the right (PyTorch's convention); 'valid': none; ints: symmetric; a list of
    (left, right) pairs: as given (asymmetric, as produced by F.pad before the conv)."""
    if padding == "valid":
        return [(0, 0)] * nd
    if padding == "same":
        out = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    if isinstance(padding, (list, tuple)) and padding and isinstance(padding[0], (list, tuple)):
        return [tuple(int(a) for a in p) for p in padding]
    return [(p, p) for p in _tuple(padding, nd)]


def conv_units(in_shape, W, b, stride=1, padding=0, dilation=1, groups=1):
    """Units of an N-d convolution over one sample of shape (C_in, *L).

    Unit (oc, *o) has, for every input channel ic of its group and every kernel tap k, the
    contribution of input (ic, o·s − pad_left + k·d) when that position lies inside the input
    (padded positions hold 0 and contribute nothing). Returns (units, out_shape).
    """
    C_in, *L = in_shape
    nd = len(L)
    Cout, Cin_g, *K = W.shape
    s = _tuple(stride, nd)
    d = _tuple(dilation, nd)
    pads = conv_padding(padding, K, d, nd)
    assert Cin_g * groups == C_in and Cout % groups == 0
    Lout = [(L[a] + pads[a][0] + pads[a][1] - d[a] * (K[a] - 1) - 1) // s[a] + 1 for a in range(nd)]
    Wl = W.detach().to(torch.float64)
    bl = [0.0] * Cout if b is None else flat(b)
    units = []
    cout_g = Cout // groups
    for oc in range(Cout):
        g = oc // cout_g
        for o in itertools.product(*[range(v) for v in Lout]):
            contribs = []
            for icl in range(Cin_g):
                ic = g * Cin_g + icl
                for k in itertools.product(*[range(v) for v in K]):
                    pos = [o[a] * s[a] - pads[a][0] + k[a] * d[a] for a in range(nd)]
                    if all(0 <= pos[a] < L[a] for a in range(nd)):
                        contribs.append((ravel((ic, *pos), (C_in, *L)), float(Wl[(oc, icl, *k)])))
            units.append((contribs, bl[oc]))
    return units, (Cout, *Lout)


def conv_transpose_units(in_shape, W, b, stride=1, padding=0, output_padding=0, dilation=1,
                         groups=1):
    """Units of an N-d transposed convolution; weight (C_in, C_out/groups, *K).

    Output (oc, *o) receives input (ic, *i) through tap k when o = i·s − p + k·d, for every
    input channel ic of oc's group, weight W[ic, oc mod (C_out/groups), *k].
    """
    C_in, *L = in_shape
    nd = len(L)
    Cin_w, cout_g, *K = W.shape
    assert Cin_w == C_in
    s = _tuple(stride, nd)
    p = _tuple(padding, nd)
    op = _tuple(output_padding, nd)
    d = _tuple(dilation, nd)
    Cout = cout_g * groups
    cin_g = C_in // groups
    Lout = [(L[a] - 1) * s[a] - 2 * p[a] + d[a] * (K[a] - 1) + op[a] + 1 for a in range(nd)]
    Wl = W.detach().to(torch.float64)
    bl = [0.0] * Cout if b is None else flat(b)
    units = []
    for oc in range(Cout):
        g, ocl = divmod(oc, cout_g)
        for o in itertools.product(*[range(v) for v in Lout]):
            contribs = []
            for icl in range(cin_g):
                ic = g * cin_g + icl
                for k in itertools.product(*[range(v) for v in K]):
                    pos = []
                    for a in range(nd):
                        num = o[a] + p[a] - k[a] * d[a]
                        if num % s[a] != 0 or not (0 <= num // s[a] < L[a]):
                            break
                        pos.append(num // s[a])
                    else:
                        contribs.append((ravel((ic, *pos), (C_in, *L)), float(Wl[(ic, ocl, *k)])))
            units.append((contribs, bl[oc]))
    return units, (Cout, *Lout)


def conv_rule(x, W, b, R, mode, act="none", **conv_kw) -> LayerResult:
    """Spec 3/3b/4 per output channel and position of a convolution (x: (N, C, *L))."""
    units, _ = conv_units(tuple(x.shape[1:]), W, b, **conv_kw)
    return affine_rule(x, units, R, mode, act)


def conv_transpose_rule(x, W, b, R, mode, act="none", **kw) -> LayerResult:
    """Spec 3/3b/4 per output channel and position of a transposed convolution ("Convolutions
    (1d, 2d, 3d, transposed) use the same rule for every output channel at every output
    position over its receptive field")."""
    units, _ = conv_transpose_units(tuple(x.shape[1:]), W, b, **kw)
    return affine_rule(x, units, R, mode, act)


# --------------------------------------------------------------------------------------------
# batch norm
# --------------------------------------------------------------------------------------------


def fold_bn(W, b, bn):
    """Spec 5, batch norm after a conv/linear: W' = W·γ/√(var+eps),
    b' = (b − μ)·γ/√(var+eps) + β, per output channel (dim 0 of W), by a loop over channels."""
    W2 = W.detach().to(torch.float64).clone()
    C = W2.shape[0]
    bl = [0.0] * C if b is None else flat(b)
    gamma = flat(bn.weight) if bn.weight is not None else [1.0] * C
    beta = flat(bn.bias) if bn.bias is not None else [0.0] * C
    mu = flat(bn.running_mean)
    var = flat(bn.running_var)
    b2 = []
    for c in range(C):
        scale = gamma[c] / math.sqrt(var[c] + bn.eps)
        W2[c] = W2[c] * scale
        b2.append((bl[c] - mu[c]) * scale + beta[c])
    return W2, torch.tensor(b2, dtype=torch.float64)


def batchnorm_units(in_shape, bn):
    """Standalone batch norm (eval): per element of channel c, one contribution a_c·x with
    a_c = γ_c/√(var_c+eps) and bias β_c − μ_c·a_c (spec 5: per-channel affine, section-3 rule)."""
    C, *L = in_shape
    gamma = flat(bn.weight) if bn.weight is not None else [1.0] * C
    beta = flat(bn.bias) if bn.bias is not None else [0.0] * C
    mu = flat(bn.running_mean)
    var = flat(bn.running_var)
    units = []
    for k in range(prod(in_shape)):
        c = unravel(k, in_shape)[0]
        a = gamma[c] / math.sqrt(var[c] + bn.eps)
        units.append(([(k, a)], beta[c] - mu[c] * a))
    return units


def batchnorm_rule(x, bn, R, mode, act="none") -> LayerResult:
    """Spec 5, batch norm not after a conv/linear: "a per-channel affine map with the section-3
    rule": R_i = R · |a_c x_i| / (|a_c x_i| + |β_c − μ_c a_c|) (signed: a_c x_i in the
    numerator; contrastive: a single contribution, which passes both maps whole)."""
    return affine_rule(x, batchnorm_units(tuple(x.shape[1:]), bn), R, mode, act)


# --------------------------------------------------------------------------------------------
# pooling, reductions (spec 5)
# --------------------------------------------------------------------------------------------


def _each_map(R, mode, fn):
    """Spec 4: every non-affine op moves R+ and R- independently with its default rule."""
    if mode == "contrastive":
        return (fn(R[0]), fn(R[1]))
    return fn(R)


def pool_windows(L, kernel, stride, padding, dilation, ceil_mode=False):
    """Windows of an N-d pooling: {output position: [input positions inside the input]}.
    Padded positions are left out (max pooling pads with −inf, average pooling with 0: they
    never win a max and add |0| to an average's denominator). ``ceil_mode``: PyTorch's output
    size (rounded up, but the last window must start inside the input or the left padding);
    windows running past the end are clipped."""
    nd = len(L)
    k = _tuple(kernel, nd)
    s = _tuple(stride if stride is not None else kernel, nd)
    p = _tuple(padding, nd)
    d = _tuple(dilation, nd)
    Lout = []
    for a in range(nd):
        span = L[a] + 2 * p[a] - d[a] * (k[a] - 1) - 1
        out = (-(-span // s[a]) if ceil_mode else span // s[a]) + 1
        if ceil_mode and (out - 1) * s[a] >= L[a] + p[a]:
            out -= 1
        Lout.append(out)
    wins = {}
    for o in itertools.product(*[range(v) for v in Lout]):
        members = []
        for kk in itertools.product(*[range(v) for v in k]):
            pos = tuple(o[a] * s[a] - p[a] + kk[a] * d[a] for a in range(nd))
            if all(0 <= pos[a] < L[a] for a in range(nd)):
                members.append(pos)
        wins[o] = members
    return wins, Lout


def maxpool_forward(x, kernel, stride=None, padding=0, dilation=1, ceil_mode=False):
    """Max pooling by loops over the windows (to check the window enumeration against torch)."""
    N, C, *L = x.shape
    wins, Lout = pool_windows(L, kernel, stride, padding, dilation, ceil_mode)
    out = torch.zeros(N, C, *Lout, dtype=torch.float64)
    for s in range(N):
        for c in range(C):
            for o, members in wins.items():
                out[(s, c, *o)] = max(float(x[(s, c, *m)]) for m in members)
    return out


def maxpool_rule(x, R, mode, kernel, stride=None, padding=0, dilation=1, ceil_mode=False):
    """Spec 5, max pooling: the window's maximum element(s) take the window's relevance; ties
    share equally; overlapping windows accumulate. Contrastive: same, per map."""
    wins, _ = pool_windows(list(x.shape[2:]), kernel, stride, padding, dilation, ceil_mode)
    return max_windows_rule(x, R, mode, wins)


def max_windows_rule(x, R, mode, wins):
    """The max rule over given windows {output position: [input positions]} (pooling, adaptive
    pooling): the maximum element(s) take the window's relevance, ties share equally."""
    N, C = x.shape[:2]

    def one(Rm):
        out = torch.zeros(x.shape, dtype=torch.float64)
        for s in range(N):
            for c in range(C):
                for o, members in wins.items():
                    vals = [float(x[(s, c, *m)]) for m in members]
                    best = max(vals)
                    winners = [m for m, v in zip(members, vals) if v == best]
                    r = float(Rm[(s, c, *o)])
                    for m in winners:
                        out[(s, c, *m)] += r / len(winners)
        return out

    return _each_map(R, mode, one)


def _abs_share(x, R, groups):
    """R_i = R_g · |x_i| / Σ_{k in g} |x_k| for windows ``groups``: {out index: [in indices]}
    (flat, per sample). A window whose Σ|x| is 0 passes nothing."""
    N = x.shape[0]
    out = []
    for s in range(N):
        xs = flat(x[s])
        rs = flat(R[s])
        acc = [0.0] * len(xs)
        for o, members in groups.items():
            den = sum(abs(xs[i]) for i in members)
            if den == 0.0:
                continue
            for i in members:
                acc[i] += rs[o] * abs(xs[i]) / den
        out.append(acc)
    return to_tensor(out, tuple(x.shape[1:]))


def avgpool_rule(x, R, mode, kernel, stride=None, padding=0, ceil_mode=False):
    """Spec 5, average pooling: per window R_i = R · |x_i| / Σ_window |x_k| (padding adds 0)."""
    N, C, *L = x.shape
    wins, Lout = pool_windows(L, kernel, stride, padding, 1, ceil_mode)
    groups = {}
    for c in range(C):
        for o, members in wins.items():
            groups[ravel((c, *o), (C, *Lout))] = [ravel((c, *m), (C, *L)) for m in members]
    return _each_map(R, mode, lambda Rm: _abs_share(x, Rm, groups))


def adaptive_windows(L, out_size):
    """PyTorch's adaptive pooling windows: [floor(o·L/O), ceil((o+1)·L/O)) per dimension."""
    nd = len(L)
    O = _tuple(out_size, nd)
    wins = {}
    for o in itertools.product(*[range(v) for v in O]):
        ranges = [range((o[a] * L[a]) // O[a], -((-(o[a] + 1) * L[a]) // O[a])) for a in range(nd)]
        wins[o] = list(itertools.product(*ranges))
    return wins, list(O)


def adaptive_avgpool_rule(x, R, mode, out_size):
    """Spec 5, adaptive / global average pooling: R_i = R · |x_i| / Σ_window |x_k|."""
    N, C, *L = x.shape
    wins, O = adaptive_windows(L, out_size)
    groups = {}
    for c in range(C):
        for o, members in wins.items():
            groups[ravel((c, *o), (C, *O))] = [ravel((c, *m), (C, *L)) for m in members]
    return _each_map(R, mode, lambda Rm: _abs_share(x, Rm, groups))


def reduce_rule(x, R, mode, dims, keepdim=False):
    """Spec 5, sum / mean over axes: like average pooling over the reduced axes,
    R_i = R_out · |x_i| / Σ_reduced |x_k|. ``dims`` index the per-sample axes + 1 (batch is 0)."""
    shape = tuple(x.shape[1:])
    red = {d - 1 for d in ((dims,) if isinstance(dims, int) else dims)}
    out_shape = tuple(1 if a in red else shape[a] for a in range(len(shape)) if keepdim or a not in red)
    groups: dict[int, list[int]] = {}
    for k in range(prod(shape)):
        idx = unravel(k, shape)
        if keepdim:
            oidx = tuple(0 if a in red else idx[a] for a in range(len(shape)))
        else:
            oidx = tuple(idx[a] for a in range(len(shape)) if a not in red)
        groups.setdefault(ravel(oidx, out_shape), []).append(k)
    return _each_map(R, mode, lambda Rm: _abs_share(x, Rm.reshape(Rm.shape[0], -1), groups))


# --------------------------------------------------------------------------------------------
# elementwise arithmetic (spec 5)
# --------------------------------------------------------------------------------------------


def _bcast_index(oidx, out_shape, term_shape):
    """The element of a broadcast term that feeds output element ``oidx``."""
    off = len(out_shape) - len(term_shape)
    return tuple(0 if term_shape[a] == 1 else oidx[a + off] for a in range(len(term_shape)))


def add_rule(terms, R, mode):
    """Spec 5, add (a + b + …): R_k = R · |a_k| / Σ_m |a_m| per element after broadcasting;
    a term that is a constant or parameter is a bias: its share is absorbed. Terms that were
    broadcast receive the sum over the broadcast axes. ``terms`` are tensors (batch first,
    input-dependent) or ``("const", tensor_or_float)``. Returns ([R per tensor term], absorbed
    (N,)) with R a pair per term in contrastive mode."""

    def one(Rm):
        Rm = Rm.detach().to(torch.float64)
        out_shape = tuple(Rm.shape)
        vals = []
        for t in terms:
            if isinstance(t, tuple) and t[0] == "const":
                c = torch.as_tensor(t[1], dtype=torch.float64)
                vals.append(("const", c))
            else:
                vals.append(("act", t.detach().to(torch.float64)))
        outs = [torch.zeros(v.shape, dtype=torch.float64) for kind, v in vals if kind == "act"]
        absorbed = torch.zeros(out_shape[0], dtype=torch.float64)
        for k in range(prod(out_shape)):
            oidx = unravel(k, out_shape)
            elems = [float(v[_bcast_index(oidx, out_shape, tuple(v.shape))]) if v.dim() else float(v)
                     for _, v in vals]
            den = sum(abs(e) for e in elems)
            if den == 0.0:
                continue
            r = float(Rm[oidx])
            a = 0
            for (kind, v), e in zip(vals, elems):
                share = r * abs(e) / den
                if kind == "const":
                    absorbed[oidx[0]] += share
                else:
                    outs[a][_bcast_index(oidx, out_shape, tuple(v.shape))] += share
                    a += 1
        return outs, absorbed

    if mode == "contrastive":
        (op, ap), (on, an) = one(R[0]), one(R[1])
        return list(zip(op, on)), (ap, an)
    return one(R)


def sub_rule(a, b, R, mode):
    """Spec 5, sub: as add, on the signed terms a and (−b)."""
    bb = ("const", -b[1]) if isinstance(b, tuple) else -b
    return add_rule([a, bb], R, mode)


def mul_const_rule(R, mode):
    """Spec 5, product of an activation and a constant/parameter: all to the activation."""
    return _each_map(R, mode, lambda Rm: Rm.detach().to(torch.float64).clone())


def div_const_rule(R, mode):
    """Spec 5, division by a constant normaliser: all to the numerator."""
    return mul_const_rule(R, mode)


def mul_two_rule(a_shape, b_shape, R, mode):
    """Spec 5, elementwise product of two activations: uniform rule, each factor receives half
    (summed over the axes it was broadcast along)."""

    def one(Rm):
        Rm = Rm.detach().to(torch.float64)
        out_shape = tuple(Rm.shape)
        ra = torch.zeros(a_shape, dtype=torch.float64)
        rb = torch.zeros(b_shape, dtype=torch.float64)
        for k in range(prod(out_shape)):
            oidx = unravel(k, out_shape)
            r = float(Rm[oidx])
            ra[_bcast_index(oidx, out_shape, tuple(a_shape))] += r / 2
            rb[_bcast_index(oidx, out_shape, tuple(b_shape))] += r / 2
        return ra, rb

    if mode == "contrastive":
        (ap, bp), (an, bn) = one(R[0]), one(R[1])
        return (ap, an), (bp, bn)
    return one(R)


def passthrough_rule(R, mode):
    """Spec 5: activations, softmax, layer/RMS norm, identity, dropout(eval): relevance passes
    through unchanged, element by element."""
    return mul_const_rule(R, mode)


def shape_rule(fn, xs, R, mode):
    """Spec 5, shape ops: move relevance exactly as the op moves values.

    Naively: run ``fn`` on tensors of element ids (distinct across the inputs ``xs``), then
    for every output element add its relevance to the input element whose id it carries
    (so expand sums over the broadcast axes, slicing leaves zeros, cat splits, ...).
    """
    ids = []
    start = 0
    for x in xs:
        n = x.numel()
        ids.append(torch.arange(start, start + n, dtype=torch.long).reshape(x.shape))
        start += n
    moved = fn(*ids)

    def one(Rm):
        Rm = Rm.detach().to(torch.float64)
        assert tuple(Rm.shape) == tuple(moved.shape)
        acc = [0.0] * start
        mv = moved.reshape(-1).tolist()
        rv = flat(Rm)
        for k in range(len(mv)):
            acc[mv[k]] += rv[k]
        outs = []
        off = 0
        for x in xs:
            n = x.numel()
            outs.append(torch.tensor(acc[off:off + n], dtype=torch.float64).reshape(x.shape))
            off += n
        return outs

    if mode == "contrastive":
        p, n = one(R[0]), one(R[1])
        return list(zip(p, n))
    return one(R)


# --------------------------------------------------------------------------------------------
# glue to the engine under test (kept apart from the rules above)
# --------------------------------------------------------------------------------------------

#: dtype the comparisons run in, and the relative tolerance that goes with it.
DTYPE = torch.float64
RTOL = 1e-9


@contextlib.contextmanager
def one_thread():
    """The comparisons use tiny tensors: on a loaded 2-core machine, intra-op threads only add
    contention (a 2x7x6 conv can take 50 ms with 2 threads busy-waiting, 15 us with one).
    Test modules wrap themselves in this (and give the setting back afterwards)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def explain(model, x, mode, task="regression", **kw):
    from governance.backtrace import Backtrace

    try:
        model.eval()
    except NotImplementedError:  # the pt2 module mlflow.pytorch.load_model returns
        pass
    return Backtrace(model).explain(x, mode=mode, task=task, **kw)


def engine_input(exp, mode):
    """The engine's input relevance: a tensor, or (R+, R-) in contrastive mode."""
    if mode == "contrastive":
        return (exp.positive.input_relevance, exp.negative.input_relevance)
    return exp.input_relevance


def engine_layer(exp, mode, name):
    if mode == "contrastive":
        return (exp.positive.layer_relevance[name], exp.negative.layer_relevance[name])
    return exp.layer_relevance[name]


def compare_rel(got, expected, mode, what, rtol=None):
    """Compare a relevance (or a contrastive pair) with the naive one; returns max rel error."""
    rtol = RTOL if rtol is None else rtol
    if mode == "contrastive":
        e1 = compare(got[0], expected[0], rtol, what + " R+")
        e2 = compare(got[1], expected[1], rtol, what + " R-")
        return max(e1[1], e2[1])
    return compare(got, expected, rtol, what)[1]


def check_engine(model, x, mode, expected, what, task="regression", rtol=None, **kw):
    """Run the engine and compare its input relevance with ``expected``; in contrastive mode
    also check that ``input_relevance`` is R+ − R-. Returns the explanation."""
    exp = explain(model, x, mode, task=task, **kw)
    compare_rel(engine_input(exp, mode), expected, mode, what, rtol)
    if mode == "contrastive":
        compare(exp.input_relevance, expected[0] - expected[1], rtol or RTOL, what + " net")
    return exp
