"""Pooling and reductions (spec section 5).

Average-type ops (average, adaptive and global pooling, sum and mean over axes, linear
up-sampling) are linear with non-negative weights that are equal within a window, so
``R_i = Σ_windows R · |x_i| / Σ_window |x_k|`` is ``|x| ⊙ Jᵀ (R / f(|x|))`` with f the op
itself: one forward and one VJP. Max pooling gives each window's relevance to its maximum
element(s), ties sharing equally, overlapping windows accumulating.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx

from ..context import RuleContext, first_output, per_map, safe_div
from ..registry import aten_ops, register_rule

AVERAGE_OPS = aten_ops(
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "mean", "sum",
    "upsample_bilinear2d", "upsample_linear1d", "upsample_trilinear3d", "upsample_bicubic2d",
    "_upsample_bilinear2d_aa",
)


@register_rule(*AVERAGE_OPS, contrastive=True)
def average_rule(ctx: RuleContext, node: fx.Node, R):
    """Per window, R_i = R · |x_i| / Σ_window |x_k| (the maps of a contrastive walk share the
    forward and the VJP's trace)."""
    x_node = node.args[0]
    x = ctx.value(x_node)
    rest = node.args[1:]

    def f(v: torch.Tensor) -> torch.Tensor:
        return node.target(v, *rest, **node.kwargs)

    xabs = x.abs()
    den, vjp_fn = torch.func.vjp(f, xabs)

    def one(c: RuleContext, r: torch.Tensor) -> dict:
        (g,) = vjp_fn(safe_div(r, den))  # a new tensor, or an expanded view (a mean's VJP)
        if g.shape == xabs.shape and g.dtype == xabs.dtype and g.is_contiguous():
            return {x_node: g.mul_(xabs)}  # its own buffer: no second full-size tensor
        return {x_node: xabs * g}

    return per_map(ctx, R, one)


def _pool_params(node: fx.Node, nd: int):
    a = list(node.args) + [None] * 6
    k = a[1]
    k = [k] * nd if isinstance(k, int) else list(k)
    s = a[2] if a[2] not in (None, []) else k
    s = [s] * nd if isinstance(s, int) else list(s)
    p = a[3] if a[3] is not None else 0
    p = [p] * nd if isinstance(p, int) else list(p)
    d = a[4] if a[4] is not None else 1
    d = [d] * nd if isinstance(d, int) else list(d)
    ceil = bool(a[5]) if a[5] is not None else False
    k, s, p, d = ([v[0]] * nd if len(v) == 1 else v for v in (k, s, p, d))
    return k, s, p, d, ceil


def _max_pool_nd(x: torch.Tensor, out: torch.Tensor, k, s, p, d, ceil):
    """Window maxima take the window's relevance (ties share); via unfold/fold on 2-D maps.
    The comparison with the window maxima is done once and returned as ``share(R)`` for each
    relevance map."""
    nd = len(k)
    squeeze = nd == 1
    if squeeze:  # 1-D as 2-D with a unit height
        x, out = x.unsqueeze(-2), out.unsqueeze(-2)
        k, s, p, d = [1] + k, [1] + s, [0] + p, [1] + d
    batch_shape = x.shape[:-2]
    H, W = x.shape[-2:]
    x4 = x.reshape(-1, 1, H, W) if x.dim() != 4 else x
    n, c = x4.shape[0], x4.shape[1]
    Ho, Wo = out.shape[-2:]
    # pad with -inf (as max pooling does), plus what ceil_mode reads past the right edge
    extra = [max(0, (o - 1) * st + dl * (kk - 1) + 1 - (sz + 2 * pp))
             for o, st, dl, kk, sz, pp in zip((Ho, Wo), s, d, k, (H, W), p)]
    pad = (p[1], p[1] + extra[1], p[0], p[0] + extra[0])
    xp = F.pad(x4, pad, value=-math.inf)
    Hp, Wp = xp.shape[-2:]
    cols = F.unfold(xp, kernel_size=k, dilation=d, stride=s)  # (n, c*kk, L)
    kk = k[0] * k[1]
    cols = cols.reshape(n, c, kk, -1)
    L = cols.shape[-1]
    hit = torch.eq(cols, out.reshape(n, c, 1, L), out=cols)  # float 0/1, in the unfolded copy
    cnt = hit.sum(2, keepdim=True)

    def share(R: torch.Tensor) -> torch.Tensor:
        if squeeze:
            R = R.unsqueeze(-2)
        part = hit.to(R.dtype) * safe_div(R.reshape(n, c, 1, L), cnt.to(R.dtype))
        back = F.fold(part.reshape(n, c * kk, L), output_size=(Hp, Wp), kernel_size=k, dilation=d, stride=s)
        back = back[..., p[0]:p[0] + H, p[1]:p[1] + W].reshape(*batch_shape, H, W)
        return back.squeeze(-2) if squeeze else back

    return share


@register_rule(*aten_ops("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices",
                         "max_pool1d_with_indices", "max_pool3d_with_indices"), contrastive=True)
def max_pool_rule(ctx: RuleContext, node: fx.Node, R):
    """Max pooling 1d/2d with stride, padding, dilation, ceil mode; ties share equally."""
    x_node = node.args[0]
    x = ctx.value(x_node)
    out = ctx.value(node)
    out = out[0] if isinstance(out, (tuple, list)) else out
    opname = node.target._opname
    nd = 1 if "1d" in opname else 3 if "3d" in opname else 2
    k, s, p, d, ceil = _pool_params(node, nd)
    if k == s and all(v == 0 for v in p) and all(v == 1 for v in d) and (
        not ceil or all(size % kk == 0 for size, kk in zip(x.shape[-nd:], k))
    ):
        share = _max_pool_tiled(x, out, k)
    elif nd == 3:
        raise ctx.unsupported(node, "3-d max pooling is supported with stride = kernel and no padding only")
    else:
        share = _max_pool_nd(x, out, k, s, p, d, ceil)
    return per_map(ctx, R, lambda c, r: {x_node: share(first_output(r))})


def _max_pool_tiled(x: torch.Tensor, out: torch.Tensor, k: list[int]):
    """Non-overlapping windows (stride = kernel, no padding): each element is compared with its
    window's maximum and ties share. The comparison runs on a window-major copy
    (lead, k_1, …, k_d, o_1, …, o_d), so every pass runs over long contiguous rows; it is done
    once and returned as ``share(R)`` for each relevance map."""
    nd = len(k)
    lead = list(x.shape[:-nd])
    outs = list(out.shape[-nd:])
    sizes = [o * kk for o, kk in zip(outs, k)]  # rows/cols past the last window drop
    xs = x[(..., *[slice(0, sz) for sz in sizes])]
    interleaved = lead + [v for o, kk in zip(outs, k) for v in (o, kk)]
    L = len(lead)
    to_window = list(range(L)) + [L + 2 * i + 1 for i in range(nd)] + [L + 2 * i for i in range(nd)]
    xw = xs.reshape(interleaved).permute(to_window)
    per_window = lead + [1] * nd + outs
    hit = torch.eq(xw, out.reshape(per_window), out=x.new_empty(xw.shape))  # float 0/1
    cnt = hit.sum(list(range(L, L + nd)), keepdim=True)

    def share(R: torch.Tensor) -> torch.Tensor:
        res = R.new_empty(lead + sizes)  # written through its window-major view: no copy back
        torch.mul(hit.to(R.dtype), safe_div(R.reshape(per_window), cnt.to(R.dtype)),
                  out=res.view(interleaved).permute(to_window))
        if sizes != list(x.shape[-nd:]):
            pad = [v for sz, full in zip(reversed(sizes), reversed(x.shape[-nd:])) for v in (0, full - sz)]
            res = torch.nn.functional.pad(res, pad)
        return res

    return share


def _adaptive_windows(size_in: int, size_out: int, device) -> torch.Tensor:
    """(out, in) 0/1 matrix of adaptive pooling windows: [floor(o·I/O), ceil((o+1)·I/O))."""
    o = torch.arange(size_out, device=device)
    start = (o * size_in) // size_out
    end = -((-(o + 1) * size_in) // size_out)
    i = torch.arange(size_in, device=device)
    return (i[None, :] >= start[:, None]) & (i[None, :] < end[:, None])


@register_rule(*aten_ops("adaptive_max_pool1d", "adaptive_max_pool2d"))
def adaptive_max_rule(ctx: RuleContext, node: fx.Node, R):
    """Adaptive max pooling: each (possibly overlapping) window's maximum takes its relevance."""
    R = first_output(R)
    if R is None:
        return {}
    x_node = node.args[0]
    x = ctx.value(x_node)
    out = ctx.value(node)[0]
    nd = 1 if "1d" in node.target._opname else 2
    if nd == 1:
        x, out, R = x.unsqueeze(-2), out.unsqueeze(-2), R.unsqueeze(-2)
    H, W = x.shape[-2:]
    Ho, Wo = out.shape[-2:]
    mh = _adaptive_windows(H, Ho, x.device)  # (Ho, H)
    mw = _adaptive_windows(W, Wo, x.device)  # (Wo, W)
    win = mh[:, None, :, None] & mw[None, :, None, :]  # (Ho, Wo, H, W)
    hit = (x[..., None, None, :, :] == out[..., :, :, None, None]) & win
    hit = hit.to(R.dtype)
    cnt = hit.sum((-1, -2), keepdim=True)
    back = (hit * safe_div(R[..., None, None], cnt)).sum((-3, -4))
    return {x_node: back.squeeze(-2) if nd == 1 else back}


@register_rule(*aten_ops("amax", "max", "amin", "min"))
def max_reduce_rule(ctx: RuleContext, node: fx.Node, R):
    """max / amax over axes: the maximal element(s) take the relevance, ties share equally."""
    R = first_output(R)
    if R is None:
        return {}
    if node.target._overloadname in ("other", "binary_out", "out"):
        raise ctx.unsupported(node, "element-wise max/min of two tensors has no rule")
    x_node = node.args[0]
    x = ctx.value(x_node)
    out = ctx.value(node)
    out = out[0] if isinstance(out, (tuple, list)) else out
    if len(node.args) < 2 and "dim" not in node.kwargs:  # full reduction to a scalar
        dims = list(range(x.dim()))
        keep = False
    else:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
        dims = [dims] if isinstance(dims, int) else list(dims)
        keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
    dims = [dd % x.dim() for dd in dims]
    if not keep:
        for dd in sorted(dims):
            out, R = out.unsqueeze(dd), R.unsqueeze(dd)
    hit = (x == out).to(R.dtype)
    cnt = hit.sum(dims, keepdim=True)
    return {x_node: hit * safe_div(R, cnt)}
