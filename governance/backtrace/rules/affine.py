"""The unified rule for affine units: Linear, matmul with a parameter, convolutions (1d/2d/3d,
transposed), batch norm (folded into the layer before it, or standalone per channel).

Every affine op is reduced to a pair ``fwd(x, W)`` (the op without bias, linear in x and in W) and
``bwd(s, W)`` (its transpose applied to a cotangent s), so one implementation of each mode serves
every layer type:

* default (spec 3):     R_i = Σ_j R_j |z_ji| / (P_j + N_j + |b_j|)
* signed (spec 3b):     R_i = Σ_j R_j  z_ji  / (P_j + N_j + |b_j|)
* contrastive (spec 4): R+ / R- routed by the sign of t_j and the larger of R+_j, R-_j

with z_ji = W_ji x_i, P_j = Σ_i max(z_ji, 0), N_j = Σ_i max(-z_ji, 0). Without active
saturation the default and signed rules need one product of absolute values and one transposed
product (``den = |W| * |x| + |b|``, ``R_in = |x| ⊙ |W|ᵀ * (R / den)``); with saturation, or in
contrastive mode, the four sign classes are computed with two forward and two transposed
products on a stacked batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx

from ..context import RuleContext, first_output, safe_div
from ..registry import register_rule

aten = torch.ops.aten

Fwd = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Bwd = Callable[[torch.Tensor, torch.Tensor, torch.Size], torch.Tensor]


@dataclass
class AffineUnit:
    """One affine op as the rules need it: input node, weight, bias (broadcast to the output)."""

    x_node: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    fwd: Fwd
    bwd: Bwd
    pre_activation: torch.Tensor  # t_j as the following activation saw it (after a folded BN)
    # (cotangent dim, weight dim) along which output units can be stacked so that a sum of
    # transposed products Σ_k bwd(c_k, W_k) is one product; None where the op can't (groups).
    stack: tuple[int, int] | None = None

    def bwd_sum(self, terms: list[tuple[torch.Tensor, torch.Tensor]], shape: torch.Size) -> torch.Tensor:
        """Σ_k bwd(c_k, W_k): one transposed product over units stacked side by side."""
        if self.stack is None:
            out = self.bwd(terms[0][0], terms[0][1], shape)
            for c, w in terms[1:]:
                out = out + self.bwd(c, w, shape)
            return out
        cdim, wdim = self.stack
        c = torch.cat([c for c, _ in terms], dim=cdim)
        w = torch.cat([w for _, w in terms], dim=wdim)
        return self.bwd(c, w, shape)


# --- op descriptions ---------------------------------------------------------------------------

def _linear_fwd(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.matmul(x, w.transpose(-1, -2))


def _linear_bwd(s: torch.Tensor, w: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return torch.matmul(s, w)


def _elementwise_fwd(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return x * a


def _elementwise_bwd(s: torch.Tensor, a: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return s * a


def _conv_pair(stride, padding, dilation, transposed, output_padding, groups, pad_input=None):
    """fwd/bwd of aten.convolution (any dimensionality); ``pad_input`` is an explicit,
    possibly asymmetric, zero padding applied before the convolution ('same' with even kernels)."""

    def fwd(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if pad_input is not None:
            x = F.pad(x, pad_input)
        return aten.convolution(x, w, None, stride, padding, dilation, transposed, output_padding, groups)

    def bwd(s: torch.Tensor, w: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        in_shape = list(shape)
        in_shape[0] = s.shape[0]
        if pad_input is not None:
            for d in range(len(pad_input) // 2):
                in_shape[-1 - d] += pad_input[2 * d] + pad_input[2 * d + 1]
        dummy = s.new_empty(1).expand(in_shape)
        g = aten.convolution_backward(
            s, dummy, w, None, stride, padding, dilation, transposed, output_padding, groups,
            [True, False, False],
        )[0]
        if pad_input is not None:
            sl = [slice(None)] * g.dim()
            for d in range(len(pad_input) // 2):
                lo, hi = pad_input[2 * d], pad_input[2 * d + 1]
                sl[g.dim() - 1 - d] = slice(lo, g.shape[g.dim() - 1 - d] - hi)
            g = g[tuple(sl)]
        return g

    return fwd, bwd


def _tuple(v, n: int) -> list[int]:
    if isinstance(v, int):
        return [v] * n
    v = list(v)
    return v * n if len(v) == 1 else v


def _conv_desc(node: fx.Node, ctx: RuleContext):
    """(x_node, weight, bias, fwd, bwd) for every convolution overload export produces."""
    name = node.target._opname
    a = list(node.args) + [None] * 10
    x_node, w_node, b_node = a[0], a[1], a[2]
    w = ctx.value(w_node)
    nd = w.dim() - 2
    kw = node.kwargs
    if name == "convolution":
        stride, padding, dilation = _tuple(a[3], nd), _tuple(a[4], nd), _tuple(a[5], nd)
        transposed, output_padding, groups = bool(a[6]), _tuple(a[7], nd), int(a[8])
    elif name.startswith("conv_transpose"):
        stride = _tuple(a[3] if a[3] is not None else kw.get("stride", 1), nd)
        padding = _tuple(a[4] if a[4] is not None else kw.get("padding", 0), nd)
        output_padding = _tuple(a[5] if a[5] is not None else kw.get("output_padding", 0), nd)
        groups = int(a[6] if a[6] is not None else kw.get("groups", 1))
        dilation = _tuple(a[7] if a[7] is not None else kw.get("dilation", 1), nd)
        transposed = True
    else:  # conv1d / conv2d / conv3d, .default or .padding
        stride = _tuple(a[3] if a[3] is not None else kw.get("stride", 1), nd)
        padding = a[4] if a[4] is not None else kw.get("padding", 0)
        dilation = _tuple(a[5] if a[5] is not None else kw.get("dilation", 1), nd)
        groups = int(a[6] if a[6] is not None else kw.get("groups", 1))
        transposed, output_padding = False, [0] * nd
    pad_input = None
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0] * nd
        else:  # 'same': total = d·(k−1), the extra element on the right as torch does
            k = list(w.shape[2:])
            totals = [dilation[i] * (k[i] - 1) for i in range(nd)]
            if all(t % 2 == 0 for t in totals):
                padding = [t // 2 for t in totals]
            else:
                pad_input = []
                for i in reversed(range(nd)):
                    pad_input += [totals[i] // 2, totals[i] - totals[i] // 2]
                padding = [0] * nd
    else:
        padding = _tuple(padding, nd)
    fwd, bwd = _conv_pair(stride, padding, dilation, transposed, output_padding, groups, pad_input)
    b = ctx.value(b_node) if b_node is not None else None
    if b is not None:
        b = b.reshape([1, -1] + [1] * nd)
    return x_node, w, b, fwd, bwd, transposed, groups


def _bn_params(node: fx.Node, ctx: RuleContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale a and shift c of an eval-mode batch norm: y = a·x + c."""
    name = node.target._opname
    a = list(node.args)
    if name == "batch_norm":
        _, w, b, mean, var, _training, _mom, eps = a[:8]
    else:  # _native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps)
        _, w, b, mean, var, _mom, eps = a[:7]
    mean, var = ctx.value(mean), ctx.value(var)
    w = ctx.value(w) if w is not None else torch.ones_like(var)
    b = ctx.value(b) if b is not None else torch.zeros_like(var)
    scale = w / torch.sqrt(var + eps)
    return scale, b - mean * scale


def _bn_output(node: fx.Node, ctx: RuleContext) -> torch.Tensor:
    v = ctx.value(node)
    return v[0] if isinstance(v, (tuple, list)) else v


def _bn_user(node: fx.Node, ctx: RuleContext) -> fx.Node | None:
    """The batch-norm node folded into ``node`` (its only user), if any."""
    users = list(node.users)
    if len(users) == 1 and users[0] in ctx.fused:
        return users[0]
    return None


def affine_unit(node: fx.Node, ctx: RuleContext) -> AffineUnit:
    """Describe ``node`` as an affine unit, folding a batch norm that directly follows it."""
    name = node.target._opname
    args = list(node.args)
    stack: tuple[int, int] | None = (-1, 0)
    if name == "linear":
        x_node, w = args[0], ctx.value(args[1])
        b = ctx.value(args[2]) if len(args) > 2 and args[2] is not None else None
        fwd, bwd, out_dim = _linear_fwd, _linear_bwd, 0
        transposed, groups = False, 1
    elif name == "addmm":  # bias + x @ Wt
        b, x_node, wt = ctx.value(args[0]), args[1], ctx.value(args[2])
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        w = alpha * wt.transpose(0, 1)
        b = beta * b
        fwd, bwd, out_dim = _linear_fwd, _linear_bwd, 0
        transposed, groups = False, 1
    elif name in ("mm", "matmul", "bmm"):
        lhs, rhs = args[0], args[1]
        if ctx.is_relevant(lhs) and not ctx.is_relevant(rhs):  # x @ C  ==  x @ (Cᵀ)ᵀ
            x_node, w, b = lhs, ctx.value(rhs).transpose(-1, -2), None
            fwd, bwd = _linear_fwd, _linear_bwd
        else:  # C @ x: transpose the problem, (C x)ᵀ = xᵀ Cᵀ
            x_node, c, b = rhs, ctx.value(lhs), None
            fwd = lambda x, w: torch.matmul(w, x)  # noqa: E731
            bwd = lambda s, w, shape: _sum_to(torch.matmul(w.transpose(-1, -2), s), shape)  # noqa: E731
            w = c
            stack = (-2, -2)
        out_dim, transposed, groups = None, False, 1
    elif name.startswith("conv"):
        x_node, w, b, fwd, bwd, transposed, groups = _conv_desc(node, ctx)
        out_dim = 1 if transposed else 0
        stack = (1, out_dim) if groups == 1 else None
    elif name in ("batch_norm", "_native_batch_norm_legit_no_training"):
        scale, shift = _bn_params(node, ctx)
        x = ctx.value(args[0])
        shape = [1, -1] + [1] * (x.dim() - 2)
        return AffineUnit(args[0], scale.reshape(shape), shift.reshape(shape),
                          _elementwise_fwd, _elementwise_bwd, _bn_output(node, ctx))
    else:
        raise ctx.unsupported(node, "not an affine op")
    pre = ctx.value(node)
    bn = _bn_user(node, ctx)
    if bn is not None:
        scale, shift = _bn_params(bn, ctx)
        if name.startswith("conv") and transposed:
            cin = w.shape[0]
            wg = w.reshape(groups, cin // groups, -1, *w.shape[2:])
            wg = wg * scale.reshape(groups, 1, -1, *([1] * (w.dim() - 2)))
            w = wg.reshape(w.shape)
        else:
            w = w * scale.reshape([-1] + [1] * (w.dim() - 1))
        nd = w.dim() - 2
        bshape = [1, -1] + [1] * nd if name.startswith("conv") else [-1]
        base = b.reshape(-1) if b is not None else torch.zeros_like(scale)
        b = (base * scale + shift).reshape(bshape)
        pre = _bn_output(bn, ctx)
    return AffineUnit(x_node, w, b, fwd, bwd, pre, stack)


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t.sum_to_size(shape) if tuple(t.shape) != tuple(shape) else t


# --- the three modes -----------------------------------------------------------------------

def _sign_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    xp = x.clamp(min=0)
    xn = x.clamp(max=0)
    return xp, (xn if bool((xn != 0).any()) else None)


def _pos_neg(u: AffineUnit, xp, xn, wp, wn) -> tuple[torch.Tensor, torch.Tensor]:
    """P = Σ max(z,0) and N = Σ max(−z,0) per unit, from two products on a stacked batch."""
    n = xp.shape[0]
    if xn is None:
        return u.fwd(xp, wp), -u.fwd(xp, wn)
    both = torch.cat([xp, xn])
    fp, fn = u.fwd(both, wp), u.fwd(both, wn)
    return fp[:n] + fn[n:], -(fn[:n] + fp[n:])


def _split_rel(u: AffineUnit, xp, xn, wp, wn, cp: torch.Tensor, cn: torch.Tensor, sign_n: float, shape):
    """Σ_j cp_j max(z_ji,0) + sign_n · Σ_j cn_j max(−z_ji,0) for every input i.

    With z = W x split by sign classes this is xp ⊙ (Wpᵀcp − sign_n·... ) written as two
    transposed products over stacked units:
    xp ⊙ bwd([cp, cn], [Wp, −sign_n·Wn]) + xn ⊙ bwd([cp, cn], [Wn, −sign_n·Wp]).
    cp / cn may hold several maps stacked on the batch axis (a multiple of x's batch)."""
    bshape = torch.Size([cp.shape[0]] + list(shape[1:]))
    reps = cp.shape[0] // xp.shape[0]

    def times(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if reps == 1:
            return x * g
        return (g.reshape(reps, *x.shape) * x).reshape(g.shape)

    out = times(xp, u.bwd_sum([(cp, wp), (cn, -sign_n * wn)], bshape))
    if xn is not None:
        out = out + times(xn, u.bwd_sum([(cp, wn), (cn, -sign_n * wp)], bshape))
    return out


def _split_rel_stacked(u: AffineUnit, xp, xn, wp, wn, c: torch.Tensor, shape):
    """``_split_rel`` (sign_n = 1) for coefficients already laid out as ``cat([cp, cn])`` along
    the unit axis ``u.stack[0]``: no concatenation copy of the (large) coefficient maps."""
    cdim, wdim = u.stack
    bshape = torch.Size([c.shape[0]] + list(shape[1:]))
    reps = c.shape[0] // xp.shape[0]

    def times(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * g if reps == 1 else (g.reshape(reps, *x.shape) * x).reshape(g.shape)

    out = times(xp, u.bwd(c, torch.cat([wp, -wn], dim=wdim), bshape))
    if xn is not None:
        out = out + times(xn, u.bwd(c, torch.cat([wn, -wp], dim=wdim), bshape))
    return out


def _default_or_signed(ctx: RuleContext, node: fx.Node, u: AffineUnit, R: torch.Tensor, signed: bool,
                       x: torch.Tensor | None = None, sat: tuple | None = None):
    """``x`` / ``sat`` override the recorded input and the saturation range (recurrent cells)."""
    x = ctx.value(u.x_node) if x is None else x
    babs = u.bias.abs() if u.bias is not None else None
    lo_b, hi_b = ctx.saturation(node) if sat is None else sat
    t = u.pre_activation
    live = R != 0
    lo = (t < lo_b) & live if lo_b is not None else None
    hi = (t > hi_b) & live if hi_b is not None else None
    saturated = (lo is not None and bool(lo.any())) or (hi is not None and bool(hi.any()))
    if not saturated:
        den = u.fwd(x.abs(), u.weight.abs())
        if babs is not None:
            den = den + babs
        s = safe_div(R, den)
        if babs is not None:
            ctx.absorb_product(s, babs)
        if signed:
            return {u.x_node: x * u.bwd(s, u.weight, x.shape)}
        return {u.x_node: x.abs() * u.bwd(s, u.weight.abs(), x.shape)}
    xp, xn = _sign_split(x)
    wp, wn = u.weight.clamp(min=0), u.weight.clamp(max=0)
    P, N = _pos_neg(u, xp, xn, wp, wn)
    keep_p = ~lo if lo is not None else torch.ones_like(live)
    keep_n = ~hi if hi is not None else torch.ones_like(live)
    den = torch.where(keep_p, P, torch.zeros_like(P)) + torch.where(keep_n, N, torch.zeros_like(N))
    full = P + N
    if babs is not None:
        den = den + babs
        full = full + babs
    s = safe_div(R, den)
    if babs is not None:
        ctx.absorb_product(s, babs)
    ctx.reroute(safe_div(R, full) * (torch.where(keep_p, 0, P) + torch.where(keep_n, 0, N)))
    sp = torch.where(keep_p, s, torch.zeros_like(s))
    sn = torch.where(keep_n, s, torch.zeros_like(s))
    return {u.x_node: _split_rel(u, xp, xn, wp, wn, sp, sn, -1.0 if signed else 1.0, x.shape)}


def _contrastive(ctx: RuleContext, node: fx.Node, u: AffineUnit, Rp: torch.Tensor, Rn: torch.Tensor,
                 x: torch.Tensor | None = None):
    x = ctx.value(u.x_node) if x is None else x
    xp, xn = _sign_split(x)
    wp, wn = u.weight.clamp(min=0), u.weight.clamp(max=0)
    P, N = _pos_neg(u, xp, xn, wp, wn)
    t = u.pre_activation
    has_p, has_n = P > 0, N > 0
    mixed = has_p & has_n
    only_p, only_n = has_p ^ mixed, has_n ^ mixed
    # Mixed units with t != 0: "agree" when the larger map and the dominant side match
    # (t > 0 and R+ > R-, or t < 0 and R+ < R-): then the positive contributors take R+ and the
    # negative ones R-; otherwise (ties included) the positive take R- and the negative R+.
    agree = mixed & ((Rp - Rn).sign_().mul_(t.sign()) > 0)
    swap = (mixed & (t != 0)) ^ agree
    inv_p = torch.nan_to_num_(P.reciprocal(), posinf=0.0)
    inv_n = torch.nan_to_num_(N.reciprocal(), posinf=0.0)
    n = x.shape[0]
    # coefficients per (source map, contributor side), written straight into the layout the
    # transposed product takes: maps stacked on the batch axis, sides on the unit axis
    blocks = [
        (Rp, only_p | agree, inv_p, 0, 0),  # from R+ to positive contributors
        (Rn, only_p | swap, inv_p, 1, 0),   # from R- to positive contributors
        (Rp, only_n | swap, inv_n, 0, 1),   # from R+ to negative contributors
        (Rn, only_n | agree, inv_n, 1, 1),  # from R- to negative contributors
    ]
    if u.stack is not None:
        cdim = u.stack[0] % Rp.dim()
        units = Rp.shape[cdim]
        shape = list(Rp.shape)
        shape[0], shape[cdim] = 2 * n, 2 * units
        c = Rp.new_empty(shape)
        for src, mask, inv, m, side in blocks:
            dst = c.narrow(0, m * n, n).narrow(cdim, side * units, units)
            torch.mul(src, inv, out=dst)
            dst.masked_fill_(~mask, 0.0)
        both = _split_rel_stacked(u, xp, xn, wp, wn, c, x.shape)
    else:
        pp, mp, pn, mn = ((src * inv).masked_fill_(~mask, 0.0) for src, mask, inv, _, _ in blocks)
        both = _split_rel(u, xp, xn, wp, wn, torch.cat([pp, mp]), torch.cat([pn, mn]), 1.0, x.shape)
    return {u.x_node: (both[:n], both[n:])}


AFFINE_OPS = [
    aten.linear, aten.addmm, aten.mm, aten.matmul, aten.bmm,
    aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution,
    aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d,
]


@register_rule(*AFFINE_OPS, aten.batch_norm, aten._native_batch_norm_legit_no_training, contrastive=True)
def affine_rule(ctx: RuleContext, node: fx.Node, R):
    """Spec sections 3, 3b and 4 for one affine op (batch norm folded or standalone)."""
    name = node.target._opname
    R = first_output(R)
    if R is None:
        return {}
    if isinstance(R, tuple) and isinstance(R[0], dict):
        R = (R[0].get(0), R[1].get(0))
    if node in ctx.fused:
        # batch norm folded into the layer before it: relevance passes to that layer's output
        return {node.args[0]: R}
    if name in ("mm", "matmul", "bmm") and ctx.is_relevant(node.args[0]) and ctx.is_relevant(node.args[1]):
        raise ctx.unsupported(node, "product of two activations (attention) needs the attention rules")
    u = affine_unit(node, ctx)
    if ctx.mode == "contrastive":
        Rp, Rn = R
        return _contrastive(ctx, node, u, Rp, Rn)
    return _default_or_signed(ctx, node, u, R, signed=ctx.mode == "signed")


def mark_foldable_batch_norms(gm: fx.GraphModule, ctx: RuleContext) -> dict[fx.Node, fx.Node]:
    """Batch norms that directly follow a conv/linear used only by them: fold (spec section 5)."""
    fused: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "_opname", "") not in (
            "batch_norm", "_native_batch_norm_legit_no_training"
        ):
            continue
        prev = node.args[0]
        if not isinstance(prev, fx.Node) or prev.op != "call_function" or len(prev.users) != 1:
            continue
        pname = getattr(prev.target, "_opname", "")
        if pname == "linear" or (pname.startswith("conv") and ctx.value(prev.args[1]).dim() > 2):
            fused[node] = prev
    return fused
