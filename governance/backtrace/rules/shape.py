"""Shape ops move relevance exactly as they move values (spec section 5).

An op that only rearranges, selects, repeats or concatenates values is linear with a 0/1
Jacobian, so its vector-Jacobian product is precisely "move the relevance back": the inverse
permutation, a scatter into zeros, a sum over broadcast axes. We take that VJP from autograd
instead of writing one inverse per op.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from ..context import RuleContext, per_map
from ..registry import aten_ops, register_rule

RESHAPES = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze",
            "view_as", "reshape_as"}

SHAPE_OPS = aten_ops(
    "view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
    "reshape_as", "permute", "transpose", "t", "swapaxes", "movedim", "expand", "expand_as",
    "broadcast_to", "repeat", "tile", "slice", "select", "narrow", "index", "index_select",
    "gather", "take_along_dim", "cat", "concat", "stack", "hstack", "vstack", "split",
    "split_with_sizes", "tensor_split", "chunk", "unbind", "flip", "roll", "constant_pad_nd",
    "pad", "unfold", "diagonal", "repeat_interleave", "as_strided", "slice_scatter",
    "select_scatter", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "upsample_nearest1d",
    "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d",
    "_upsample_nearest_exact3d", "_unsafe_index", "masked_select", "tril", "triu",
)


def _relevant_leaves(ctx: RuleContext, node: fx.Node) -> list[fx.Node]:
    leaves: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: leaves.append(n) if ctx.is_relevant(n) else None)
    seen: list[fx.Node] = []
    for n in leaves:
        if n not in seen:
            seen.append(n)
    return seen


def _cotangent(ctx: RuleContext, node: fx.Node, R: Any) -> Any:
    """R shaped like the node's output; missing tuple slots filled with zeros."""
    out = ctx.value(node)
    if isinstance(out, (tuple, list)):
        R = R if isinstance(R, dict) else {0: R}
        slots = [
            R[i].to(o.dtype) if i in R else torch.zeros_like(o) if o.is_floating_point() else torch.zeros(o.shape)
            for i, o in enumerate(out)
        ]
        return type(out)(slots)  # the same pytree structure as the op's output (list or tuple)
    return R


@register_rule(*SHAPE_OPS, contrastive=True)
def shape_rule(ctx: RuleContext, node: fx.Node, R: Any):
    """Move relevance back through a value-moving op with the op's own transpose (its VJP); the
    maps of a contrastive walk share the traced VJP."""
    name = node.target._opname
    leaves = _relevant_leaves(ctx, node)
    pair = isinstance(R, tuple)
    if name in RESHAPES and len(leaves) == 1 and not isinstance(R[0] if pair else R, dict):
        shape = ctx.value(leaves[0]).shape
        return per_map(ctx, R, lambda c, r: {leaves[0]: r.reshape(shape)})
    fast = _direct(ctx, node, name, leaves, R[0] if pair else R)
    if fast is not None:
        return per_map(ctx, R, lambda c, r: fast(r))
    primals = []
    for n in leaves:
        v = ctx.value(n)
        primals.append(v if v.is_floating_point() else v.to(torch.float32))

    def f(*vals: torch.Tensor) -> Any:
        lookup = dict(zip(leaves, vals))
        args, kwargs = fx.node.map_arg(
            (node.args, node.kwargs), lambda n: lookup[n] if n in lookup else ctx.value(n)
        )
        return node.target(*args, **kwargs)

    _, vjp_fn = torch.func.vjp(f, *primals)

    def one(c: RuleContext, r: Any) -> dict:
        cot = _cotangent(ctx, node, r)
        if isinstance(cot, torch.Tensor) and cot.dtype != primals[0].dtype:
            cot = cot.to(primals[0].dtype)
        grads = vjp_fn(cot)
        return {n: g.to(r.dtype if isinstance(r, torch.Tensor) else g.dtype) for n, g in zip(leaves, grads)}

    return per_map(ctx, R, one)


def _arg(node: fx.Node, i: int, key: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def _direct(ctx: RuleContext, node: fx.Node, name: str, leaves: list[fx.Node], r0: Any):
    """The transpose of the commonest value-moving ops written out (``r -> {leaf: relevance}``),
    the same values as their VJP without tracing one (a traced VJP costs ~0.5 ms a call, and a
    transformer has dozens of these ops per layer); None for every other case."""
    if not isinstance(r0, torch.Tensor) or any(
            not isinstance(ctx.value(n), torch.Tensor) or ctx.value(n).dtype != r0.dtype for n in leaves):
        return None  # the VJP rounds relevance to the value's dtype: leave that to it
    if name == "cat" and node.target._overloadname == "default":
        return _cat(ctx, node, leaves)
    if len(leaves) != 1:
        return None
    leaf = leaves[0]
    x = ctx.value(leaf)
    target = node.target._overloadname
    if name == "transpose" and target == "int" and node.args[0] is leaf:
        d0, d1 = node.args[1], node.args[2]
        return lambda r: {leaf: r.transpose(d0, d1)}
    if name == "permute" and node.args[0] is leaf:
        dims = [d % x.dim() for d in node.args[1]]
        inverse = [dims.index(i) for i in range(len(dims))]
        return lambda r: {leaf: r.permute(inverse)}
    if name == "expand" and node.args[0] is leaf:
        shape = x.shape
        return lambda r: {leaf: r.sum_to_size(shape)}
    if name == "slice" and target == "Tensor" and node.args[0] is leaf:
        dim = _arg(node, 1, "dim", 0) % x.dim()
        start, end, step = _arg(node, 2, "start", None), _arg(node, 3, "end", None), _arg(node, 4, "step", 1)
        index = (slice(None),) * dim + (slice(start, end, step),)

        def scatter(r: torch.Tensor) -> dict:
            out = r.new_zeros(x.shape)
            out[index] = r
            return {leaf: out}

        return scatter
    return None


def _cat(ctx: RuleContext, node: fx.Node, leaves: list[fx.Node]):
    """cat: each relevant operand takes its slab of R (None when an operand repeats or is a
    legacy empty 1-D tensor, which cat skips: the VJP handles those)."""
    parts = list(node.args[0])
    values = [ctx.value(p) for p in parts]
    if any(not isinstance(v, torch.Tensor) or v.dim() != values[0].dim() for v in values) or any(
            parts.count(n) != 1 for n in leaves):
        return None
    dim = _arg(node, 1, "dim", 0) % values[0].dim()
    slabs, start = {}, 0
    for p, v in zip(parts, values):
        if p in leaves:
            slabs[p] = (start, v.shape[dim])
        start += v.shape[dim]
    return lambda r: {n: r.narrow(dim, *slabs[n]) for n in leaves}
