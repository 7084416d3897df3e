"""The unified rule for affine units: Linear, matmul with a parameter, convolutions (1d/2d/3d,
transposed), batch norm (folded into the layer before it, or standalone per channel).

Every affine op is reduced to a pair ``fwd(x, W)`` (the op without bias, linear in x and in W) and
``bwd(s, W)`` (its transpose applied to a cotangent s), so one implementation of each mode serves
every layer type:

* default (spec 3):     R_i = Σ_j R_j |z_ji| / (P_j + N_j + |b_j|)
* signed (spec 3b):     R_i = Σ_j R_j  z_ji  / (P_j + N_j + |b_j|)
* contrastive (spec 4): R+ / R- routed by the sign of t_j and the larger of R+_j, R-_j

with z_ji = W_ji x_i, P_j = Σ_i max(z_ji, 0), N_j = Σ_i max(-z_ji, 0). Three identities keep the
work at the cost of a forward+backward pass:

* ``S = P + N = |W| * |x|`` is one product of absolute values and ``D = P − N = W * x`` is the
  layer's own output without its bias (recorded in the forward pass), so P = (S + D)/2 and
  N = (S − D)/2 cost one product. The difference loses precision where one side is small next to
  ``S + |b|``, and a unit with one empty side must be classified exactly: those units
  (``min(P, N) < κ (S + |b|)``, κ = ``PRECISION_MARGIN``) are recomputed from the one-signed sums
  (on their rows only where the op allows it). Elsewhere the error of P and N is at most κ⁻¹
  times the rounding of the forward pass itself, ε·(S + |b|) (measured within 13 ε (S + |b|):
  a relative 1e-5 at most in float32, 3e-14 in float64); P or N = 0 is always seen exactly.
* A relevance split ``Σ_j a_j max(z_ji, 0) + b_j max(−z_ji, 0)`` (what every mode computes, with
  coefficients a on the positive and b on the negative contributions) equals, because
  max(±z, 0) = (|z| ± z)/2, ``½ (|x_i| (|W|ᵀ(a + b))_i + x_i (Wᵀ(a − b))_i)``: two transposed
  products for any sign of x, and one (``x ⊙ [|W| + W ; |W| − W]ᵀ [a ; b] / 2``, the units of
  both coefficient maps stacked) when x ≥ 0 (after a ReLU). Several relevance maps (R+ and R-)
  stack on the batch axis of the same call. With mixed signs the two products cancel for a unit
  whose receiving side is small (error ε·S/P instead of ε), so the rows that hold such units
  (those recomputed above) take the one-signed products instead: x⁺ through W⁺ and |x⁻| through
  |W⁻| for the positive contributions, the other pairs for the negative ones (one product when
  the inputs of both signs stack along the feature axis).
* Without active saturation the default and signed rules need no split at all:
  ``R_in = |x| ⊙ |W|ᵀ (R / (S + |b|))`` (signed: ``x ⊙ Wᵀ (R / (S + |b|))``).

The element-wise work between the products is memory-bound, so it runs in place in a few
preallocated buffers, in the relevance's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx

from .. import native
from ..context import RuleContext, first_output, product_parallel, product_threads, safe_div
from ..registry import register_rule
from ..weight_cache import derived

aten = torch.ops.aten

Fwd = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Bwd = Callable[[torch.Tensor, torch.Tensor, torch.Size], torch.Tensor]

#: κ: where min(P, N) < κ (P + N + |b|), P and N are recomputed from their one-signed sums (and
#: the rows holding such units split relevance without the cancelling identity)
PRECISION_MARGIN = 2.0 ** -4


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
    # D = W x without the bias, from the recorded forward pass, optionally on some rows only
    # (``take`` applied to the recorded output first); None: computed with ``fwd``
    product: Callable[..., torch.Tensor] | None = None
    # how many leading axes index independent rows (output row k depends on input row k only:
    # the batch for a conv, every axis but the features for a linear map); 0: none. Units can be
    # recomputed on a few such rows.
    row_dims: int = 1
    # each unit has a single contribution (an element-wise scale): P and N are exact from S and D
    single_term: bool = False
    # (input dim, weight dim) of the input features: inputs concatenated along it meet weights
    # concatenated along it in one product, Σ_k fwd(x_k, W_k); None where the op can't (groups)
    in_stack: tuple[int, int] | None = None
    # relevance maps (R+ and R-) may stack on the batch axis of one product; not when the weight
    # has a batch axis of its own (a matmul with a per-sample constant)
    stack_maps: bool = True

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``fwd`` with the caller's intra-op threads when it is big (``context.product_threads``;
        work estimated as input size times the weight's size per output unit)."""
        work = x.numel() * (w.numel() / max(w.shape[0], 1))
        if not product_parallel(work):
            return self.fwd(x, w)
        with product_threads(work):
            return self.fwd(x, w)

    def backward(self, s: torch.Tensor, w: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """``bwd`` with the caller's intra-op threads when it is big."""
        work = s.numel() * (w.numel() / max(w.shape[0], 1))
        if not product_parallel(work):
            return self.bwd(s, w, shape)
        with product_threads(work):
            return self.bwd(s, w, shape)

    def on_rows(self, take: Callable[[torch.Tensor], torch.Tensor], row_dims: int | None = None) -> "AffineUnit":
        """The unit restricted to some rows: ``take`` selects them from any tensor shaped like
        the output (the pre-activation, the recorded product)."""
        full = self.product
        return replace(self, pre_activation=take(self.pre_activation),
                       row_dims=self.row_dims if row_dims is None else row_dims,
                       product=(lambda: full(take)) if full is not None else None)


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
        kernel = w.shape[2:]
        back_pad = [d * (k - 1) - p for d, k, p in zip(dilation, kernel, padding)]
        if not transposed and pad_input is None and all(v == 1 for v in stride) and min(back_pad) >= 0:
            # stride 1: the transposed convolution is a convolution with the flipped, transposed
            # kernel (faster on CPU than convolution_backward)
            cout, cin_g = w.shape[0], w.shape[1]
            wt = w.reshape(groups, cout // groups, cin_g, *kernel).transpose(1, 2)
            wt = wt.reshape(groups * cin_g, cout // groups, *kernel).flip(list(range(2, w.dim())))
            return aten.convolution(s, wt, None, [1] * len(kernel), back_pad, dilation, False,
                                    [0] * len(kernel), groups)
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
    in_stack: tuple[int, int] | None = (-1, -1)
    stack_maps = True
    if name == "linear":
        x_node, w = args[0], ctx.value(args[1])
        b = ctx.value(args[2]) if len(args) > 2 and args[2] is not None else None
        fwd, bwd = _linear_fwd, _linear_bwd
        transposed, groups, row_dims = False, 1, ctx.value(x_node).dim() - 1
    elif name == "addmm":  # bias + x @ Wt
        b, x_node, wt = ctx.value(args[0]), args[1], ctx.value(args[2])
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        w = alpha * wt.transpose(0, 1)
        b = beta * b
        fwd, bwd = _linear_fwd, _linear_bwd
        transposed, groups, row_dims = False, 1, 1
    elif name in ("mm", "matmul", "bmm"):
        lhs, rhs = args[0], args[1]
        if ctx.is_relevant(lhs) and not ctx.is_relevant(rhs):  # x @ C  ==  x @ (Cᵀ)ᵀ
            x_node, w, b = lhs, ctx.value(rhs).transpose(-1, -2), None
            fwd, bwd = _linear_fwd, _linear_bwd
            stack = (-1, -2)  # C may carry batch axes in front
            row_dims = ctx.value(x_node).dim() - 1 if w.dim() == 2 else 0
            stack_maps = w.dim() == 2
        else:  # C @ x: transpose the problem, (C x)ᵀ = xᵀ Cᵀ
            x_node, c, b = rhs, ctx.value(lhs), None
            fwd = lambda x, w: torch.matmul(w, x)  # noqa: E731
            bwd = lambda s, w, shape: _sum_to(torch.matmul(w.transpose(-1, -2), s), shape)  # noqa: E731
            w = c
            stack, in_stack = (-2, -2), (-2, -1)
            row_dims = max(ctx.value(x_node).dim() - 2, 0) if w.dim() == 2 else 0
            stack_maps = w.dim() == 2
        transposed, groups = False, 1
    elif name.startswith("conv"):
        x_node, w, b, fwd, bwd, transposed, groups = _conv_desc(node, ctx)
        stack = (1, 1 if transposed else 0) if groups == 1 else None
        in_stack = (1, 0 if transposed else 1) if groups == 1 else None
        row_dims = 1
    elif name in ("batch_norm", "_native_batch_norm_legit_no_training"):
        scale, shift = _bn_params(node, ctx)
        x = ctx.value(args[0])
        shape = [1, -1] + [1] * (x.dim() - 2)
        return AffineUnit(args[0], scale.reshape(shape), shift.reshape(shape),
                          _elementwise_fwd, _elementwise_bwd, _bn_output(node, ctx), single_term=True)
    else:
        raise ctx.unsupported(node, "not an affine op")
    out = ctx.value(node)
    pre, own_bias, fold = out, b, None
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
        fold = scale.reshape(bshape)
        pre = _bn_output(bn, ctx)

    def product(take: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """W x of the (folded) unit from the layer's recorded output: (out − own bias) · BN scale,
        on the rows ``take`` selects from it (all when None)."""
        d = out if take is None else take(out)
        d = d - own_bias if own_bias is not None else d
        return d * fold if fold is not None else d

    return AffineUnit(x_node, w, b, fwd, bwd, pre, stack, product, row_dims, in_stack=in_stack, stack_maps=stack_maps)


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t.sum_to_size(shape) if tuple(t.shape) != tuple(shape) else t


# --- shared pieces of the three modes ------------------------------------------------------

def is_nonnegative(x: torch.Tensor) -> bool:
    """x ≥ 0 everywhere (after a ReLU, a softmax, ...): then |x| = x and a split needs one product."""
    if x.numel() == 0:
        return True
    known = native.all_nonnegative(x)
    return bool(x.min() >= 0) if known is None else known


def input_nonnegative(ctx: RuleContext, u: AffineUnit, x: torch.Tensor | None) -> bool:
    """``is_nonnegative`` of the unit's recorded input (once per recording, for every mode
    walked over it), or of the input ``x`` a caller gives instead."""
    if x is not None:
        return is_nonnegative(x)
    known = ctx.recording.nonnegative
    v = known.get(u.x_node)
    if v is None:
        v = known[u.x_node] = is_nonnegative(ctx.value(u.x_node))
    return v


def weight_abs(u: AffineUnit) -> torch.Tensor:
    """|W| (kept across calls for a model's parameters: ``weight_cache``; never written to)."""
    return derived(u.weight, "abs", torch.abs)


def magnitude(u: AffineUnit, xabs: torch.Tensor, wabs: torch.Tensor | None = None) -> torch.Tensor:
    """S_j = P_j + N_j = Σ_i |z_ji|: one product of absolute values (a fresh tensor), from |x|."""
    return u.forward(xabs, weight_abs(u) if wabs is None else wabs)


def _sign_parts(x: torch.Tensor, u: AffineUnit) -> torch.Tensor:
    """[x⁺ ; |x⁻|] concatenated along the input-feature axis (``u.in_stack``)."""
    return torch.cat([x.clamp(min=0), x.clamp(max=0).neg_()], dim=u.in_stack[0])


def _blocks(u: AffineUnit, rows: list[list[torch.Tensor]]) -> torch.Tensor:
    """One weight from blocks: each row of blocks along the input axis, the rows along the
    unit axis (``u.in_stack``, ``u.stack``)."""
    return torch.cat([torch.cat(r, dim=u.in_stack[1]) for r in rows], dim=u.stack[1])


def _split_units(u: AffineUnit, t: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """The unit-axis blocks of a stacked result."""
    return list(t.chunk(parts, dim=u.stack[0]))


def _exact_pos_neg(u: AffineUnit, x: torch.Tensor, nonneg: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """P and N as sums of one-signed terms: positive contributions are W⁺x⁺ and |W⁻||x⁻|,
    negative ones |W⁻|x⁺ and W⁺|x⁻| (one product when inputs and units stack)."""
    wp, wn = u.weight.clamp(min=0), u.weight.clamp(max=0).neg_()
    if u.stack is not None and (nonneg or u.in_stack is not None):
        if nonneg:
            P, N = _split_units(u, u.forward(x, torch.cat([wp, wn], dim=u.stack[1])), 2)
        else:
            P, N = _split_units(u, u.forward(_sign_parts(x, u), _blocks(u, [[wp, wn], [wn, wp]])), 2)
        return P, N
    if nonneg:
        return u.forward(x, wp), u.forward(x, wn)
    xp, xn = x.clamp(min=0), x.clamp(max=0).neg_()
    return u.forward(xp, wp) + u.forward(xn, wn), u.forward(xp, wn) + u.forward(xn, wp)


def pos_neg2(u: AffineUnit, x: torch.Tensor, S: torch.Tensor, nonneg: bool,
             bias_abs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(2P, 2N) = (S + D, S − D) with D = W x the recorded product (S is consumed), and the batch
    rows recomputed exactly (None when none).

    Units where one side is small next to S + |b| (min(P, N) < κ (S + |b|): the difference has
    lost precision, or one side is empty and must be seen as exactly 0) are recomputed from the
    one-signed sums on their batch rows (every row when the op is not batch-separable); the
    relevance split of those rows must then avoid the cancelling identity too (``_spread``)."""
    D = u.product() if u.product is not None else u.forward(x, u.weight)
    if u.single_term:  # one contribution per unit: (|z| ± z) is exact
        return S + D, S.sub_(D), None
    kappa = PRECISION_MARGIN
    k = u.row_dims
    # flagged where |D| − (1 − 2κ) S + 2κ|b| = 2κ (S + |b|) − 2 min(P, N) > 0
    sides = native.sides(S, D, bias_abs, -(1.0 - 2.0 * kappa), 2.0 * kappa, math.prod(S.shape[:k]))
    if sides is not None:  # one compiled pass, the same bits and decisions
        P2, count, flags = sides
        N2, flagged = S, count > 0
        rows = flags.nonzero().squeeze(1) if flagged and k else None
    else:
        m = D.abs().add_(S, alpha=-(1.0 - 2.0 * kappa))
        if bias_abs is not None:
            m.add_(bias_abs, alpha=2.0 * kappa)
        flagged = m.numel() > 0 and bool(m.max() > 0)
        rows = m.reshape(math.prod(m.shape[:k]), -1).amax(1).gt(0).nonzero().squeeze(1) if flagged and k else None
        P2 = torch.add(S, D, out=m)
        N2 = S.sub_(D)
    if not flagged:
        return P2, N2, None
    if rows is None or len(rows) == math.prod(x.shape[:k]):  # every row: all at once
        P, N = _exact_pos_neg(u, x, nonneg)
        return P.mul_(2.0), N.mul_(2.0), rows
    P, N = _exact_pos_neg(u, x.reshape(-1, *x.shape[k:]).index_select(0, rows), nonneg)
    P2.view(-1, *P2.shape[k:]).index_copy_(0, rows, P.mul_(2.0))
    N2.view(-1, *N2.shape[k:]).index_copy_(0, rows, N.mul_(2.0))
    return P2, N2, rows


#: a linear map with at most this many weights, on an input >= 0, takes P and N from their
#: one-signed sums directly: x W⁺ᵀ and x |W⁻|ᵀ (twice the units of S, but a dozen fewer small
#: ops; such layers cost their dispatch, not their arithmetic; two products rather than one
#: stacked one, so that P and N come out contiguous for the element-wise work after them).
#: The choice depends on the layer and the sign of its input, never on the batch size.
SMALL_LINEAR_WEIGHTS = 1 << 14


def pos_neg2_of(u: AffineUnit, x: torch.Tensor, xabs: torch.Tensor, nonneg: bool,
                bias_abs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(2P, 2N, rows recomputed) of ``pos_neg2`` (S computed here), or, for a small linear map
    on x >= 0, from the one-signed sums in one product (every unit exact; rows None)."""
    w = u.weight
    if nonneg and u.fwd is _linear_fwd and w.dim() == 2 and w.numel() <= SMALL_LINEAR_WEIGHTS:
        P = u.forward(x, derived(w, "pos", lambda v: v.clamp(min=0)))
        N = u.forward(x, derived(w, "neg", lambda v: v.clamp(max=0).neg_()))
        return P.mul_(2.0), N.mul_(2.0), None
    return pos_neg2(u, x, magnitude(u, xabs), nonneg, bias_abs)


def _halves(u: AffineUnit, R: torch.Tensor, maps: int, merged: bool):
    """An empty buffer for the half coefficients (a/2, b/2) of ``maps`` relevance maps, laid out
    for ``_spread``: maps stacked on the batch axis; a and b side by side on the unit axis
    (``merged``: one product) or in two blocks. Returns (buffer, [(a/2 view, b/2 view)] per map)."""
    n, shape = R.shape[0], list(R.shape)
    if merged:  # (maps·N, ..., 2·units, ...): map m's side s starts at row m·N, unit s·units
        cdim = u.stack[0] % R.dim()
        units = shape[cdim]
        shape[0], shape[cdim] = maps * n, 2 * units
        buf = R.new_empty(shape)
        st = buf.stride()
        return buf, [tuple(buf.as_strided(R.shape, st, m * n * st[0] + side * units * st[cdim])
                           for side in (0, 1)) for m in range(maps)]
    buf = R.new_empty((2, maps * n, *shape[1:]))  # side s, map m: block s, rows from m·N
    st = buf.stride()
    return buf, [tuple(buf.as_strided(R.shape, st[1:], side * st[0] + m * n * st[1])
                       for side in (0, 1)) for m in range(maps)]


def _per_map(g: torch.Tensor, maps: int, x: torch.Tensor) -> torch.Tensor:
    """View of a (maps·N, ...) result as (maps, N, ...) to multiply by x in place."""
    return g.view(maps, *x.shape)


def split_by_sign(u: AffineUnit, x: torch.Tensor, nonneg: bool, rows: torch.Tensor | None) -> bool:
    """Whether ``_spread`` uses the one-signed products everywhere: for x ≥ 0 they are as cheap
    as the identity; for ops that can't recompute single rows, and when every row needs them.
    Otherwise the identity, with the ``rows`` that need it recomputed one-signed: which formula a
    row gets never depends on the other rows of its batch (the stage's documents must not depend
    on how rows are batched)."""
    if nonneg or u.row_dims == 0:
        return True
    return rows is not None and len(rows) == math.prod(x.shape[:u.row_dims])


def _by_sign(u: AffineUnit, x: torch.Tensor, coef, maps: int, merged: bool, nonneg: bool) -> torch.Tensor:
    """The split from one-signed products, without cancellation: the positive contributions of an
    input x_i > 0 come through W⁺ and its negative ones through W⁻, the other way round for
    x_i < 0, so R_i = x⁺_i (2W⁺ᵀα + 2|W⁻|ᵀβ)_i + |x⁻_i| (2|W⁻|ᵀα + 2W⁺ᵀβ)_i. ``coef`` is the
    merged buffer (α and β side by side on the unit axis: one product each) or the pair (α, β)."""
    w, wabs = u.weight, weight_abs(u)
    wp2 = derived(w, "2pos", lambda v: wabs + v)  # 2W⁺ and 2|W⁻|, exactly
    wn2 = derived(w, "2neg", lambda v: wabs - v)
    lead = coef.shape[0] if merged else coef[0].shape[0]
    shape = torch.Size([lead, *x.shape[1:]])

    def products(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:  # firstᵀα + secondᵀβ
        if merged:
            key = ("cat", first is wp2, u.stack[1])
            return u.backward(coef, derived(w, key, lambda v: torch.cat([first, second], dim=u.stack[1])), shape)
        return u.backward(coef[0], first, shape).add_(u.backward(coef[1], second, shape))

    if merged and not nonneg and u.in_stack is not None:  # both signs of x in one product
        ax = u.in_stack[0] % x.dim()
        shape2 = list(shape)
        shape2[ax] *= 2
        blocks = derived(w, ("blocks", u.in_stack, u.stack), lambda v: _blocks(u, [[wp2, wn2], [wn2, wp2]]))
        gh = u.backward(coef, blocks, torch.Size(shape2))
        g, h = gh.chunk(2, dim=ax)
        out = _per_map(g, maps, x) * x.clamp(min=0)
        out.addcmul_(_per_map(h, maps, x), x.clamp(max=0).neg_())
        return out.view(shape)
    g = products(wp2, wn2)
    if nonneg:
        _per_map(g, maps, x).mul_(x)
        return g
    _per_map(g, maps, x).mul_(x.clamp(min=0))
    h = products(wn2, wp2)
    _per_map(h, maps, x).mul_(x.clamp(max=0).neg_())
    return g.add_(h)


def _spread(u: AffineUnit, x: torch.Tensor, buf: torch.Tensor, maps: int, merged: bool,
            by_sign: bool, nonneg: bool, rows: torch.Tensor | None, xabs: torch.Tensor | None = None) -> torch.Tensor:
    """R_i = Σ_j a_j max(z_ji, 0) + b_j max(−z_ji, 0) for each map, from the half coefficients
    α = a/2, β = b/2 in ``buf`` (``_halves``); returns (maps·N, ...) and consumes ``buf``.

    ``by_sign`` (``split_by_sign``): the one-signed products (``_by_sign``; for x ≥ 0 that is
    ``x ⊙ (2W⁺ᵀα + 2|W⁻|ᵀβ)``, one product when ``merged``). Otherwise the identity
    ``|x| ⊙ |W|ᵀ(α + β) + x ⊙ Wᵀ(α − β)``: two products instead of four, but the terms of a unit
    whose receiving side is small cancel there, so the ``rows`` that hold such units (those
    ``pos_neg2`` recomputed) take the one-signed products. ``xabs``: |x| when the caller has it."""
    if maps > 1 and not u.stack_maps:  # one product per map
        n = x.shape[0]
        parts = [buf.narrow(0, k * n, n) if merged else buf.narrow(1, k * n, n) for k in range(maps)]
        return torch.cat([_spread(u, x, p, 1, merged, by_sign, nonneg, rows, xabs) for p in parts])
    if by_sign:
        return _by_sign(u, x, buf if merged else (buf[0], buf[1]), maps, merged, nonneg)
    alpha, beta = buf[0], buf[1]
    exact = None
    if rows is not None:  # rows over the first row_dims axes, in every map
        k = u.row_dims
        sel = torch.cat([rows + j * math.prod(x.shape[:k]) for j in range(maps)])
        take = lambda t: t.reshape(-1, *t.shape[k:]).index_select(0, sel)  # noqa: E731
        exact = _by_sign(u, x.reshape(-1, *x.shape[k:]).index_select(0, rows),
                         (take(alpha), take(beta)), maps, merged=False, nonneg=False)
    shape = torch.Size([alpha.shape[0], *x.shape[1:]])
    if not native.sum_diff(alpha, beta):  # one compiled pass, the same bits
        alpha.add_(beta)
        torch.add(alpha, beta, alpha=-2.0, out=beta)  # α − β
    g = u.backward(alpha, weight_abs(u), shape)
    h = u.backward(beta, u.weight, shape)
    if not native.mix(g, h, xabs, x):  # g ⊙ |x| + h ⊙ x in one compiled pass, the same bits
        _per_map(g, maps, x).mul_(x.abs() if xabs is None else xabs)
        _per_map(h, maps, x).mul_(x)
        g.add_(h)
    if exact is not None:
        g.view(-1, *g.shape[k:]).index_copy_(0, sel, exact)
    return g


def _saturated(t: torch.Tensor, R: torch.Tensor, bound: float | None, below: bool) -> torch.Tensor | None:
    """Units with relevance whose pre-activation lies beyond ``bound`` (None when there are none).
    The test multiplies a float 0/1 comparison by R and counts: bool masks are slow on CPU."""
    if bound is None:
        return None
    compare = torch.lt if below else torch.gt
    hit = native.any_beyond(t, R, bound, below)  # one compiled pass, no buffer
    if hit is not None:
        return compare(t, bound).logical_and_(R != 0) if hit else None
    if R.numel() <= BLOCK_UNITS and t.shape == R.shape:  # one block: no views to cut
        if int(torch.count_nonzero(compare(t, bound, out=torch.empty_like(R)).mul_(R))):
            return compare(t, bound).logical_and_(R != 0)
        return None
    tf, rf = t.expand_as(R).reshape(-1), R.reshape(-1)
    # blocks through one small buffer: a fresh full-size probe costs page faults, and most
    # layers have no saturated unit with relevance (a ReLU's zeros pass none back)
    buf = R.new_empty(min(BLOCK_UNITS, rf.numel()))
    for lo in range(0, rf.numel(), BLOCK_UNITS):
        hi = min(lo + BLOCK_UNITS, rf.numel())
        b = buf[:hi - lo]
        if int(torch.count_nonzero(compare(tf[lo:hi], bound, out=b).mul_(rf[lo:hi]))):
            return compare(t, bound).logical_and_(R != 0)
    return None


# --- the three modes -----------------------------------------------------------------------

def _default_or_signed(ctx: RuleContext, node: fx.Node, u: AffineUnit, R: torch.Tensor, signed: bool,
                       x: torch.Tensor | None = None, sat: tuple | None = None, nonneg: bool | None = None):
    """Spec 3 / 3b. ``x`` / ``sat`` override the recorded input and the saturation range
    (recurrent cells); ``nonneg``: whether x >= 0, when the caller knows."""
    nonneg = input_nonnegative(ctx, u, x) if nonneg is None else nonneg
    x = ctx.value(u.x_node) if x is None else x
    babs = derived(u.bias, "abs", torch.abs) if u.bias is not None else None
    # |b| in float64 for the books, kept with a parameter bias (a folded one is fresh per call)
    babs64 = (derived(u.bias, "abs64", lambda v: v.abs().reshape(-1).to(torch.float64))
              if isinstance(u.bias, torch.nn.Parameter) else None)
    lo_b, hi_b = ctx.saturation(node) if sat is None else sat
    t = u.pre_activation
    lo, hi = _saturated(t, R, lo_b, below=True), _saturated(t, R, hi_b, below=False)
    xabs = x if nonneg else x.abs()
    if lo is None and hi is None:  # R_in = |x| ⊙ |W|ᵀ (R / (S + |b|))  (signed: x ⊙ Wᵀ ...)
        wabs = weight_abs(u)
        S = magnitude(u, xabs, wabs)
        absorbed = native.bias_quotient(R, S, babs, babs64)  # one compiled pass, the same bits
        if absorbed is None:
            s = safe_div(R, S.add_(babs) if babs is not None else S, out=S)
            if babs is not None:
                ctx.absorb_product(s, babs, babs64)
        else:
            s = S
            if babs is not None:
                ctx.absorb(absorbed)
        g = u.backward(s, u.weight if signed else wabs, x.shape)
        return {u.x_node: g.mul_(x if signed else xabs)}
    # saturation: the zeroed side leaves numerator and denominator, the other side takes its share
    P2, N2, rows = pos_neg2_of(u, x, xabs, nonneg, babs)
    P, N = P2.mul_(0.5), N2.mul_(0.5)
    Pk = P.masked_fill(lo, 0.0) if lo is not None else P
    Nk = N.masked_fill(hi, 0.0) if hi is not None else N
    den, full = Pk + Nk, P + N
    if babs is not None:
        den.add_(babs)
        full.add_(babs)
    s = safe_div(R, den)
    if babs is not None:
        ctx.absorb_product(s, babs, babs64)
    ctx.reroute(safe_div(R, full, out=full).mul_((P - Pk).add_(N - Nk)))
    by_sign = split_by_sign(u, x, nonneg, rows)
    merged = by_sign and u.stack is not None
    buf, [(a, b)] = _halves(u, R, 1, merged)
    torch.mul(s, 0.5, out=a)
    torch.mul(s, -0.5 if signed else 0.5, out=b)
    if lo is not None:
        a.masked_fill_(lo, 0.0)
    if hi is not None:
        b.masked_fill_(hi, 0.0)
    return {u.x_node: _spread(u, x, buf, 1, merged, by_sign, nonneg, rows, xabs)}


#: element-wise work runs over blocks of about this many units, so that its dozen or so
#: temporaries stay in the processor's cache between passes
BLOCK_UNITS = 1 << 16


def _route(Rp: torch.Tensor, Rn: torch.Tensor, t: torch.Tensor, inv_p: torch.Tensor, inv_n: torch.Tensor,
           ap: torch.Tensor, bp: torch.Tensor, an: torch.Tensor, bn: torch.Tensor) -> None:
    """Spec 4's routing of R+ and R- into the half coefficients (a+/2, b+/2, a-/2, b-/2), given
    2P and 2N in ``inv_p`` / ``inv_n`` (turned into 1/(2P), 1/(2N), 0 for an empty side)."""
    for v in (inv_p, inv_n):
        v.reciprocal_().nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    if int(torch.count_nonzero(t)) < t.numel():  # mixed units with t = 0 pass nothing
        still = (t == 0).logical_and_(inv_p != 0).logical_and_(inv_n != 0)
        inv_p.masked_fill_(still, 0.0)
        inv_n.masked_fill_(still, 0.0)
    # float 0/1 masks (comparisons written into float buffers: applying bool masks is slow on
    # CPU); the bp and an slots serve as scratch until their turn
    agree = torch.gt(torch.sub(Rp, Rn, out=bp).mul_(t), 0.0, out=bp)
    no_p, no_n = torch.eq(inv_p, 0.0, out=an), torch.eq(inv_n, 0.0, out=torch.empty_like(inv_n))
    torch.maximum(no_n, agree, out=ap).mul_(inv_p).mul_(Rp)  # R+ to the positive side
    torch.maximum(no_p, agree, out=bn).mul_(inv_n).mul_(Rn)  # R- to the negative side
    disagree = torch.eq(agree, 0.0, out=agree)  # 1 − agree in one pass (logical_not into a float buffer is 25x slower)
    to_pos = torch.maximum(no_n, disagree, out=no_n)
    torch.maximum(no_p, disagree, out=bp).mul_(inv_n).mul_(Rp)  # R+ to the negative side
    torch.mul(to_pos, inv_p, out=an).mul_(Rn)  # R- to the positive side


def _route_by_blocks(Rp: torch.Tensor, Rn: torch.Tensor, t: torch.Tensor, inv_p: torch.Tensor,
                     inv_n: torch.Tensor, ap: torch.Tensor, bp: torch.Tensor, an: torch.Tensor,
                     bn: torch.Tensor) -> None:
    """``_route`` over blocks of about ``BLOCK_UNITS`` units along the batch axis (the whole
    tensors when they fit one), so its temporaries stay in cache."""
    n = Rp.shape[0]
    step = max(1, BLOCK_UNITS // max(math.prod(Rp.shape[1:]), 1)) if Rp.dim() > 1 else n
    if step >= n:  # one block: the whole tensors, no slicing
        _route(Rp, Rn, t, inv_p, inv_n, ap, bp, an, bn)
        return
    for lo in range(0, n, step):
        blk = slice(lo, lo + step)
        _route(Rp[blk], Rn[blk], t[blk], inv_p[blk], inv_n[blk], ap[blk], bp[blk], an[blk], bn[blk])


def _contrastive(ctx: RuleContext, node: fx.Node, u: AffineUnit, Rp: torch.Tensor, Rn: torch.Tensor,
                 x: torch.Tensor | None = None, nonneg: bool | None = None):
    """Spec 4. Per unit, with ``agree`` = (R+ − R-)·t > 0 (the larger map and the dominant side
    match): positive contributors take R+ if the unit has no negative side or agrees, and R- if
    it has no negative side or does not (ties included); negative contributors take R- if the
    unit has no positive side or agrees, R+ if it has none or does not. A mixed unit with t = 0
    passes nothing. Each amount is split ∝ z/P (positive side) or |z|/N (negative side)."""
    nonneg = input_nonnegative(ctx, u, x) if nonneg is None else nonneg
    x = ctx.value(u.x_node) if x is None else x
    babs = derived(u.bias, "abs", torch.abs) if u.bias is not None else None
    # |x| is not kept to the split: contrastive holds more at once than default, and its peak
    # memory must stay within twice default's (issue 14); the split takes |x| again
    inv_p, inv_n, rows = pos_neg2_of(u, x, x if nonneg else x.abs(), nonneg, babs)
    by_sign = split_by_sign(u, x, nonneg, rows)
    merged = by_sign and u.stack is not None
    buf, [(ap, bp), (an, bn)] = _halves(u, Rp, 2, merged)
    t = u.pre_activation
    if not native.route(Rp, Rn, t, inv_p, inv_n, ap, bp, an, bn):  # one compiled pass, the same bits
        _route_by_blocks(Rp, Rn, t, inv_p, inv_n, ap, bp, an, bn)
    del inv_p, inv_n, ap, bp, an, bn  # 2P and 2N are spent: freed before the split's products
    both = _spread(u, x, buf, 2, merged, by_sign, nonneg, rows)
    n = x.shape[0]
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
    live = _live_rows(u, ctx.value(u.x_node), R)
    if live is not None:
        return _on_rows(ctx, node, u, R, live)
    step = _block_rows(u, ctx.value(u.x_node), R)
    if step is not None:
        return _by_row_blocks(ctx, node, u, R, step)
    if ctx.mode == "contrastive":
        Rp, Rn = R
        return _contrastive(ctx, node, u, Rp, Rn)
    return _default_or_signed(ctx, node, u, R, signed=ctx.mode == "signed")


def _mode_rule(ctx: RuleContext, node: fx.Node, u: AffineUnit, R: tuple[torch.Tensor, ...], x: torch.Tensor,
               nonneg: bool | None = None) -> tuple[torch.Tensor, ...]:
    """The walk's mode on a unit restricted to some rows (``AffineUnit.on_rows``), its input
    ``x`` and relevance maps ``R`` (one, or R+ and R-) on those rows: the input's relevance per map."""
    if ctx.mode == "contrastive":
        return _contrastive(ctx, node, u, R[0], R[1], x=x, nonneg=nonneg)[u.x_node]
    return (_default_or_signed(ctx, node, u, R[0], signed=ctx.mode == "signed", x=x, nonneg=nonneg)[u.x_node],)


#: on CPU, a batch-separable affine op whose input or relevance tensors hold more than this many
#: bytes runs over blocks of samples of about this size. Each block's dozen temporaries then come
#: from memory the allocator already holds: a full-size temporary is a fresh mapping on most
#: systems (glibc maps anything over 32 MiB), and touching fresh pages costs more than the
#: arithmetic on them. The rows of a block get the same formulas as in the whole batch.
ROW_BLOCK_BYTES = 4 << 20


def _block_rows(u: AffineUnit, x: torch.Tensor, R) -> int | None:
    """Samples per block for ``_by_row_blocks``, or None to run the op on the whole batch (on
    CPU only: a GPU's caching allocator hands out memory it holds, and big products keep it busy)."""
    r = R[0] if isinstance(R, tuple) else R
    n = x.shape[0] if x.dim() else 0
    if not r.is_cpu or u.row_dims < 1 or n < 2 or r.dim() == 0 or r.shape[0] != n \
            or u.pre_activation.shape[:1] != r.shape[:1]:
        return None
    per_sample = max(math.prod(r.shape[1:]), math.prod(x.shape[1:])) * r.element_size()
    if per_sample * n <= ROW_BLOCK_BYTES:
        return None
    return max(1, ROW_BLOCK_BYTES // max(per_sample, 1))


def _by_row_blocks(ctx: RuleContext, node: fx.Node, u: AffineUnit, R, step: int):
    """The affine rule over blocks of ``step`` samples, each result written into its rows of
    the full one: the same formulas row by row (whether x >= 0 is decided on the whole input, as
    without blocks), books kept per sample through ``ctx.on_rows``."""
    x = ctx.value(u.x_node)
    n = x.shape[0]
    nonneg = input_nonnegative(ctx, u, None)
    maps = R if isinstance(R, tuple) else (R,)
    outs: list[torch.Tensor] = []
    for lo in range(0, n, step):
        blk = slice(lo, min(lo + step, n))
        sub = u.on_rows(lambda t, blk=blk: t[blk])
        with ctx.on_rows(torch.arange(blk.start, blk.stop), 1):
            got = _mode_rule(ctx, node, sub, tuple(m[blk] for m in maps), x[blk], nonneg)
        if not outs:
            outs = [g.new_empty((n, *g.shape[1:])) for g in got]
        for out, g in zip(outs, got):
            out[blk].copy_(g)
    return {u.x_node: tuple(outs) if ctx.mode == "contrastive" else outs[0]}


#: a linear map over token rows runs on the rows that carry relevance when at most this fraction
#: of them do (a language model explaining its last position: the head and the last layer's MLP)
LIVE_ROW_FRACTION = 0.5


def _live_rows(u: AffineUnit, x: torch.Tensor, R) -> torch.Tensor | None:
    """The token rows of a linear map that carry relevance (R+ or R- non-zero), when they are
    few enough to pay for selecting them; None otherwise. Only where rows are finer than the
    samples (x has axes between the batch and the features): a sample's rows are all seeded in
    classification, and checking costs a pass over R."""
    if u.fwd is not _linear_fwd or u.weight.dim() != 2 or u.row_dims < 2 or u.row_dims != x.dim() - 1:
        return None
    maps = R if isinstance(R, tuple) else (R,)
    units = maps[0].shape[-1]
    if maps[0].numel() == 0:
        return None
    flags = None
    for m in maps:  # a row lives where its largest or smallest value is not 0 (or is nan)
        m2 = m.reshape(-1, units)
        f = m2.amax(1).ne_(0.0).logical_or_(m2.amin(1).ne_(0.0))
        flags = f if flags is None else flags.logical_or_(f)
    live = flags.nonzero().squeeze(1)
    return live if len(live) <= LIVE_ROW_FRACTION * len(flags) else None


def _on_rows(ctx: RuleContext, node: fx.Node, u: AffineUnit, R, live: torch.Tensor):
    """The affine rule on the ``live`` token rows only; every other row carries no relevance, so
    it passes none (each term of every mode is a multiple of its unit's R, R+ or R-): zeros.
    A row's result is the same formula on the same row as on the whole tensor."""
    x = ctx.value(u.x_node)
    lead = x.shape[:-1]
    rows = lambda t: t.reshape(-1, t.shape[-1]).index_select(0, live)  # noqa: E731
    sub = u.on_rows(rows, row_dims=1)
    xs = rows(x)
    per = math.prod(lead[1:])  # token rows per sample
    with ctx.on_rows(live, per):
        got = _mode_rule(ctx, node, sub, tuple(rows(m) for m in (R if isinstance(R, tuple) else (R,))), xs)

    def scatter(g: torch.Tensor) -> torch.Tensor:
        out = g.new_zeros(x.shape)
        out.view(-1, x.shape[-1]).index_copy_(0, live, g)
        return out

    res = tuple(scatter(g) for g in got)
    return {u.x_node: res if ctx.mode == "contrastive" else res[0]}


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
