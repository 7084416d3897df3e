"""Element-wise ops (spec section 5): activations and casts pass relevance through; add and sub
split it by |term|; products and quotients follow the gating and scaling rules."""

from __future__ import annotations

import torch
from torch import fx

from .. import native
from ..context import RuleContext, first_output, map_dtype, per_map, safe_div
from ..normalisers import normalised_signal
from ..registry import aten_ops, register_rule

aten = torch.ops.aten

PASS_THROUGH = aten_ops(
    # activations: saturation is handled in the affine layer before them (spec 3)
    "relu", "relu_", "leaky_relu", "leaky_relu_", "relu6", "hardtanh", "hardtanh_", "sigmoid",
    "sigmoid_", "tanh", "tanh_", "gelu", "gelu_", "silu", "silu_", "elu", "elu_", "selu", "celu",
    "softplus", "mish", "hardswish", "hardsigmoid", "softmax", "_softmax", "log_softmax",
    "_log_softmax", "logsigmoid", "prelu",
    # identity-like
    "dropout", "dropout_", "feature_dropout", "alpha_dropout", "native_dropout", "clone",
    "contiguous", "alias", "detach", "lift_fresh_copy", "_to_copy", "to", "type_as", "neg",
    "positive",
    # normalisations: the statistics carry no relevance (spec 5)
    "layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "instance_norm",
    "rms_norm", "_fused_rms_norm",
)


@register_rule(*PASS_THROUGH)
def pass_through(ctx: RuleContext, node: fx.Node, R):
    """R_in = R_out element by element (the first tensor argument is the signal)."""
    R = first_output(R)
    if R is None:
        return {}
    x = node.args[0]
    xv = ctx.value(x)
    if isinstance(xv, torch.Tensor) and tuple(xv.shape) != tuple(R.shape):
        R = R.sum_to_size(xv.shape)
    return {x: R}


def _terms(ctx: RuleContext, node: fx.Node) -> list[tuple[object, torch.Tensor]]:
    """The summands of add/sub as signed tensors (alpha applied, sub negated)."""
    name = node.target._opname
    a, b = node.args[0], node.args[1]
    alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
    av = ctx.value(a)
    bv = ctx.value(b)
    av = av if isinstance(av, torch.Tensor) else torch.tensor(float(av), dtype=torch.float64)
    bv = bv if isinstance(bv, torch.Tensor) else torch.tensor(float(bv), dtype=torch.float64)
    sign = -1.0 if name in ("sub", "rsub") else 1.0
    if name == "rsub":  # other - alpha * self
        return [(b, bv), (a, -alpha * av)]
    scale = sign * alpha
    # times one is the same bits: skip the full-size copy (a residual add's second term)
    return [(a, av), (b, bv if scale == 1 and bv.is_floating_point() else scale * bv)]


@register_rule(aten.add, aten.add_, aten.sub, aten.sub_, aten.rsub, contrastive=True)
def add_rule(ctx: RuleContext, node: fx.Node, R):
    """R_k = R · |a_k| / Σ_m |a_m| after broadcasting; a constant term's share is absorbed.
    The magnitudes and their sum are shared by the maps of a contrastive walk."""
    terms = _terms(ctx, node)
    dtype = map_dtype(R)
    mags: list[torch.Tensor] = []

    def shares(r: torch.Tensor) -> list[torch.Tensor]:
        """R·|a_k| / Σ_m |a_m| for each term: one compiled pass (residual adds of two
        activations), else torch ops, with the magnitudes shared by the maps."""
        if not mags:
            fused = native.share(r, terms[0][1], terms[1][1])
            if fused is not None:
                return list(fused)
            mags.extend(t.to(dtype).abs() for _, t in terms)
            mags.append(mags[0] + mags[1])
        s = safe_div(r, mags[2])
        return [s * mags[0], s.mul_(mags[1])]  # s is ours: the last share reuses it

    def one(c: RuleContext, r: torch.Tensor) -> dict:
        out = {}
        for (arg, val), share in zip(terms, shares(r)):
            if c.is_relevant(arg):
                share = share.sum_to_size(val.shape) if tuple(val.shape) != tuple(share.shape) else share
                out[arg] = out[arg] + share if arg in out else share  # a + a: both terms land on a
            else:  # a constant term; an infinite one (an additive -inf mask) takes 0, not NaN
                c.absorb(torch.nan_to_num(share, nan=0.0))
        return out

    return per_map(ctx, R, one)


@register_rule(aten.mul, aten.mul_)
def mul_rule(ctx: RuleContext, node: fx.Node, R: torch.Tensor):
    """Two activations (gating): half each. Activation × constant (scaling): all to it.
    Activation × its own normaliser statistic (a decomposed RMS / layer norm) or × an
    element-wise function of itself (a written-out SiLU / GELU): all to the activation (see
    ``normalisers.py``)."""
    a, b = node.args[0], node.args[1]
    rel = [x for x in (a, b) if ctx.is_relevant(x)]
    if len(rel) == 2:  # x * rsqrt(mean(x²) + eps) is a normalisation, not a gate (spec 5)
        signal = normalised_signal(a, b, ctx.recording.relevant)
        rel = [signal] if signal is not None else rel
    share = R / len(rel) if len(rel) == 2 else R
    out = {}
    for x in rel:
        shape = ctx.value(x).shape
        part = share.sum_to_size(shape) if tuple(shape) != tuple(share.shape) else share
        out[x] = out[x] + part if x in out else part  # a * a: both halves land on a
    return out


@register_rule(aten.div, aten.div_)
def div_rule(ctx: RuleContext, node: fx.Node, R: torch.Tensor):
    """Division by a constant or by an activation-derived normaliser: all to the numerator."""
    a = node.args[0]
    if not ctx.is_relevant(a):
        raise ctx.unsupported(node, "the numerator is constant and the denominator depends on the input")
    shape = ctx.value(a).shape
    return {a: R.sum_to_size(shape) if tuple(shape) != tuple(R.shape) else R}
