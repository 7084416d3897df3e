"""Attention (spec section 6): products of two activations and scaled dot-product attention.

One head, queries Q, keys K, values V, scores ``S = Q Kᵀ`` (times a scale), mask M, weights
``A = softmax(S·scale + M)``, output ``O = A V``:

1. ``O = A V``, bilinear split:  ``Rn = R_O / stab(2 O)``, ``R_A = (Rn Vᵀ) ⊙ A``,
   ``R_V = (Aᵀ Rn) ⊙ V`` (each factor receives half of R_O).
2. softmax passes ``R_S = R_A``; a masked position has ``A = 0`` and receives exactly 0.
3. ``S = Q Kᵀ``, bilinear split: ``Rs = R_S / stab(2 Q Kᵀ)``, ``R_Q = (Rs K) ⊙ Q``,
   ``R_K = (Rsᵀ Q) ⊙ K``.

``stab(v) = v + 1e-9·sign(v)`` with sign(0) = +1.

The same rule serves every form attention takes in a captured graph:

* hand-written / eager attention (``softmax(q @ k.transpose(-1, -2) * scale + mask) @ v``,
  Hugging Face's ``eager_attention_forward``, ``nn.MultiheadAttention`` with
  ``need_weights=True``): ``matmul`` / ``bmm`` / ``einsum`` of two activations get the generic
  bilinear rule below (steps 1 and 3 are both "a product of two activations"); softmax, the
  scale and the mask are ordinary ops (pass-through, scaling, add with a constant);
* ``aten.scaled_dot_product_attention`` (SDPA; ``nn.MultiheadAttention`` without weights,
  Hugging Face's "sdpa" implementation) and its backend variants, in one batched rule: multi-
  head, grouped-query (``enable_gqa``, or ``repeat_kv`` in the graph before it), ``is_causal``,
  boolean and additive float masks, ``scale``.

An additive float mask is treated exactly as the eager graph treats ``S·scale + M`` (spec 5,
add with a constant): where M is 0 (every visible position of a padding / causal mask) the
scores keep all of R_A; where M is a finite bias (T5's relative position bias) its share
``|M| / (|S·scale| + |M|)`` is absorbed like a bias; where M masks (−inf or the dtype's minimum)
A is 0 and nothing arrives. So eager and SDPA implementations of one model explain alike.

Everything is batched over every leading axis (batch, heads): no loop over heads or tokens.
When only one operand of the bilinear product depends on the input (learned queries, constant
memories), that operand receives the whole share (``stab(O)`` instead of ``stab(2 O)``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx

from ..context import RuleContext, STABILISER, per_map, product_threads, safe_div
from ..registry import aten_ops, register_rule
from . import affine

aten = torch.ops.aten


def stab(v: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``stab(scale·v) = scale·v + ε·sign(scale·v)`` with ε = 1e-9 and sign(0) = +1 (spec 6), in
    arithmetic (a bool ``where`` is slow on CPU): ε·(2·[u >= 0] − 1) is exactly ±ε."""
    out = v * scale
    step = torch.ge(out, 0.0, out=torch.empty_like(out))
    return out.add_(step.mul_(2.0 * STABILISER).sub_(STABILISER))


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    return t.sum_to_size(shape) if tuple(t.shape) != tuple(shape) else t


def bilinear_matmul(x: torch.Tensor, y: torch.Tensor, R: torch.Tensor, out: torch.Tensor | None = None,
                    x_rel: bool = True, y_rel: bool = True, den: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Relevance of both factors of ``out = x @ y`` (torch.matmul semantics, broadcasting).

    ``Rn = R / stab(k·out)`` with k the number of input-dependent factors;
    ``R_x = (Rn yᵀ) ⊙ x``, ``R_y = (xᵀ Rn) ⊙ y``, each summed back to its operand's shape.
    ``den`` may pass ``stab(k·out)`` precomputed (shared by the maps of a contrastive walk)."""
    with product_threads(x.numel() * y.shape[-1]):
        return _bilinear_matmul(x, y, R, out, x_rel, y_rel, den)


def _bilinear_matmul(x, y, R, out, x_rel, y_rel, den):
    xv, yv, Rv = x, y, R
    if x.dim() == 1:  # (d) @ (..., d, m) -> (..., m)
        xv, Rv = x.unsqueeze(0), Rv.unsqueeze(-2)
    if y.dim() == 1:  # (..., n, d) @ (d) -> (..., n)
        yv, Rv = y.unsqueeze(-1), Rv.unsqueeze(-1)
    o = torch.matmul(xv, yv) if out is None else out.reshape(Rv.shape)
    k = int(x_rel) + int(y_rel)
    Rn = R.new_zeros(()) if k == 0 else Rv / (den.reshape(Rv.shape) if den is not None else stab(o, k))
    rx = ry = None
    if x_rel:
        rx = _sum_to(torch.matmul(Rn, yv.transpose(-1, -2)) * xv, xv.shape).reshape(x.shape)
    if y_rel:
        ry = _sum_to(torch.matmul(xv.transpose(-1, -2), Rn) * yv, yv.shape).reshape(y.shape)
    return rx, ry


# --- matmul / bmm / mm of two activations ------------------------------------------------------

@register_rule(aten.mm, aten.matmul, aten.bmm, contrastive=True)
def matmul_rule(ctx: RuleContext, node: fx.Node, R):
    """A matmul with a parameter is affine (spec 3, ``affine.affine_rule``); a matmul of two
    activations (attention scores ``Q Kᵀ`` and outputs ``A V``) is bilinear (spec 6)."""
    lhs, rhs = node.args[0], node.args[1]
    if not (ctx.is_relevant(lhs) and ctx.is_relevant(rhs)):
        return affine.affine_rule(ctx, node, R)
    x, y, out = ctx.value(lhs), ctx.value(rhs), ctx.value(node)
    den = stab(out, 2)

    def one(c: RuleContext, r: torch.Tensor) -> dict:
        rx, ry = bilinear_matmul(x, y, r, out, den=den)
        if lhs is rhs:  # x @ x
            return {lhs: rx + ry}
        return {lhs: rx, rhs: ry}

    return per_map(ctx, R, one)


# --- einsum --------------------------------------------------------------------------------------

def _einsum_operands(node: fx.Node) -> tuple[str, list[Any]]:
    eq = node.args[0]
    ops = node.args[1] if len(node.args) > 1 else node.kwargs["tensors"]
    return eq, list(ops)


def _einsum_unit(ctx: RuleContext, node: fx.Node, eq: str, ops: list, idx: int) -> affine.AffineUnit:
    """A two-operand einsum with one constant operand as an affine unit in the other."""
    w = ctx.value(ops[1 - idx])

    def fwd(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        return torch.einsum(eq, x, wt) if idx == 0 else torch.einsum(eq, wt, x)

    def bwd(s: torch.Tensor, wt: torch.Tensor, shape) -> torch.Tensor:
        primal = s.new_zeros(shape)
        _, vjp = torch.func.vjp(lambda v: fwd(v, wt), primal)
        return vjp(s)[0]

    out = ctx.value(node)
    return affine.AffineUnit(ops[idx], w, None, fwd, bwd, out, row_dims=0,
                             product=lambda take=None: out if take is None else take(out))


@register_rule(*aten_ops("einsum"), contrastive=True)
def einsum_rule(ctx: RuleContext, node: fx.Node, R):
    """Two-operand einsum: bilinear (spec 6) when both operands depend on the input, affine
    (spec 3, the operand that does not is the weight) when one does."""
    eq, ops = _einsum_operands(node)
    rel = [i for i, o in enumerate(ops) if ctx.is_relevant(o)]
    if len(ops) == 1:
        raise ctx.unsupported(node, "single-operand einsum (a reduction or permutation) has no rule")
    if len(ops) != 2:
        raise ctx.unsupported(node, "einsum with more than two operands has no rule")
    if len(rel) == 1:
        u = _einsum_unit(ctx, node, eq, ops, rel[0])
        if ctx.mode == "contrastive":
            return affine._contrastive(ctx, node, u, R[0], R[1])
        return affine._default_or_signed(ctx, node, u, R, signed=ctx.mode == "signed")
    x, y, out = ctx.value(ops[0]), ctx.value(ops[1]), ctx.value(node)

    def one(c: RuleContext, r: torch.Tensor) -> dict:
        rn = r / stab(out, 2)
        _, vjp = torch.func.vjp(lambda a, b: torch.einsum(eq, a, b), x, y)
        gx, gy = vjp(rn)
        if ops[0] is ops[1]:
            return {ops[0]: gx * x + gy * y}
        return {ops[0]: gx * x, ops[1]: gy * y}

    return per_map(ctx, R, one)


# --- scaled dot-product attention --------------------------------------------------------------

def _bind(node: fx.Node) -> dict[str, Any]:
    """The op's arguments by schema name (positional and keyword)."""
    schema = node.target._schema
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


def attention_relevance(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, R, *,
    mask: torch.Tensor | None = None, is_causal: bool = False, scale: float | None = None,
    enable_gqa: bool = False, rel: tuple[bool, bool, bool] = (True, True, True),
):
    """Spec 6 for ``O = softmax(Q Kᵀ·scale + M) V`` over any leading axes (batch, heads).

    q: (..., Hq, L, E), k: (..., Hk, S, E), v: (..., Hk, S, Ev), R: (..., Hq, L, Ev).
    Returns (R_q, R_k, R_v, absorbed) with absorbed the additive-bias share (..., Hq, L, S), or
    a tuple of those when ``R`` is a tuple of maps (contrastive: R+ and R-), which share the
    recomputed forward (scores, weights, output and their stabilised denominators)."""
    with product_threads(q.numel() * k.shape[-2]):  # products over (batch, heads, tokens, tokens)
        return _attention_relevance(q, k, v, R, mask=mask, is_causal=is_causal, scale=scale,
                                    enable_gqa=enable_gqa, rel=rel)


def _attention_relevance(q, k, v, R, *, mask, is_causal, scale, enable_gqa, rel):
    maps = R if isinstance(R, tuple) else (R,)
    L, S = q.shape[-2], k.shape[-2]
    groups = 1
    if enable_gqa and q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        groups = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(groups, dim=-3)
        v = v.repeat_interleave(groups, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    dtype = maps[0].dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    s = torch.matmul(q, k.transpose(-1, -2))  # unscaled scores
    q_rel, k_rel, v_rel = rel
    scores_rel = q_rel or k_rel
    n_s = int(q_rel) + int(k_rel)  # factors of S = Q Kᵀ that depend on the input
    den_s = stab(s, n_s) if n_s else None
    bias = mask.to(dtype) if mask is not None and mask.dtype != torch.bool else None
    frac = None
    if bias is not None and scores_rel and not _masks_only(bias, s):
        ms = (s * scale).abs_()  # the scores' share of S·scale + M (add rule)
        frac = safe_div(ms, ms + bias.abs())
    logits = s.mul_(scale)  # s is not needed any more
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        logits.masked_fill_(~keep, -math.inf)
    if mask is not None and mask.dtype == torch.bool:
        logits.masked_fill_(~mask, -math.inf)
    elif bias is not None:
        logits.add_(bias)
    a = torch.softmax(logits, dim=-1)
    del logits, s
    a.nan_to_num_(nan=0.0)  # fully masked rows: SDPA returns 0 there
    o = torch.matmul(a, v)
    n_o = int(scores_rel) + int(v_rel)  # factors of O = A V that depend on the input
    den_o = stab(o, n_o) if n_o else None
    results = []
    for r_o in maps:
        r_q = r_k = r_v = None
        absorbed = r_o.new_zeros(())
        rn = r_o / den_o if den_o is not None else None
        # 1. O = A V
        if v_rel and rn is not None:
            r_v = torch.matmul(a.transpose(-1, -2), rn).mul_(v)
        if scores_rel and rn is not None:
            r_a = torch.matmul(rn, v.transpose(-1, -2)).mul_(a)
            # 2. softmax: R_S = R_A; an additive float mask takes its bias share (eager's add)
            if frac is not None:
                r_s = r_a * frac
                absorbed = r_a.sub_(r_s)
            else:
                r_s = r_a
            # 3. S = Q Kᵀ
            rs = r_s.div_(den_s)
            if q_rel:
                r_q = torch.matmul(rs, k).mul_(q)
            if k_rel:
                r_k = torch.matmul(rs.transpose(-1, -2), q).mul_(k)
        if groups > 1:
            shp = lambda t: t.unflatten(-3, (t.shape[-3] // groups, groups)).sum(-3)  # noqa: E731
            r_k = shp(r_k) if r_k is not None else None
            r_v = shp(r_v) if r_v is not None else None
        results.append((r_q, r_k, r_v, absorbed))
    return tuple(results) if isinstance(R, tuple) else results[0]


def _masks_only(bias: torch.Tensor, s: torch.Tensor) -> bool:
    """True when an additive mask only masks: it is 0 or at most -1e30 (HF's finfo.min, -inf)
    everywhere, and no score is exactly 0. The add rule's share of the scores is then exactly
    1 where M = 0, and where M masks the weights and so R_A are exactly 0: nothing to split."""
    if not bool((bias == 0).logical_or_(bias <= -1e30).all()):
        return False
    return int(torch.count_nonzero(s)) == s.numel()


SDPA_OPS = aten_ops(
    "scaled_dot_product_attention", "_scaled_dot_product_attention_math",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
)


@register_rule(*SDPA_OPS, contrastive=True)
def sdpa_rule(ctx: RuleContext, node: fx.Node, R):
    """Spec 6 for ``scaled_dot_product_attention`` (and its backend variants). In contrastive
    mode R+ and R- move independently with the default rule (spec 4), sharing one recomputed
    forward; each map's absorbed bias share is booked in its own context (``ctx.peers``)."""
    pair = isinstance(R, tuple)
    first = lambda r: r.get(0) if isinstance(r, dict) else r  # noqa: E731  (backend variants: output 0)
    R = tuple(first(r) for r in R) if pair else first(R)
    if (pair and any(r is None for r in R)) or R is None:
        return {}
    b = _bind(node)
    qn, kn, vn = b["query"], b["key"], b["value"]
    mask_arg = b.get("attn_mask", b.get("attn_bias"))
    if ctx.is_relevant(mask_arg):
        raise ctx.unsupported(node, "the attention mask depends on the float inputs")
    mask = ctx.value(mask_arg) if mask_arg is not None else None
    rel = (ctx.is_relevant(qn), ctx.is_relevant(kn), ctx.is_relevant(vn))
    res = attention_relevance(
        ctx.value(qn), ctx.value(kn), ctx.value(vn), R, mask=mask,
        is_causal=bool(b.get("is_causal") or False), scale=b.get("scale"),
        enable_gqa=bool(b.get("enable_gqa") or False), rel=rel,
    )
    each = res if pair else (res,)
    peers = ctx.peers if pair else [ctx]
    outs = []
    for c, (r_q, r_k, r_v, absorbed) in zip(peers, each):
        if absorbed.dim() > 0:
            c.absorb(absorbed)
        out: dict[fx.Node, torch.Tensor] = {}
        for n, r in ((qn, r_q), (kn, r_k), (vn, r_v)):
            if r is None or not ctx.is_relevant(n):
                continue
            shape = ctx.value(n).shape
            r = _sum_to(r, shape) if tuple(r.shape) != tuple(shape) else r
            out[n] = out[n] + r if n in out else r
        outs.append(out)
    if not pair:
        return outs[0]
    return {n: (outs[0][n], outs[1][n]) for n in outs[0]}


@register_rule(*aten_ops("baddbmm"))
def baddbmm_rule(ctx: RuleContext, node: fx.Node, R):
    """``beta·input + alpha·(b1 @ b2)`` (``nn.MultiheadAttention`` scores with a mask): the add
    rule between the two terms (a constant ``input`` is a bias: its share is absorbed), then the
    bilinear rule on the product (or the whole product to the one input-dependent factor)."""
    b = _bind(node)
    inp, b1, b2 = b["self"], b["batch1"], b["batch2"]
    beta, alpha = float(b.get("beta", 1) or 0), float(b.get("alpha", 1))
    x, y = ctx.value(b1), ctx.value(b2)
    prod = torch.bmm(x, y)
    t1 = (beta * ctx.value(inp)).to(R.dtype).abs() if beta != 0 else torch.zeros((), dtype=R.dtype)
    t2 = (alpha * prod).abs()
    den = (t1 + t2).expand_as(R)
    live = (R != 0) & (den > 0)
    safe = torch.where(den > 0, den, torch.ones_like(den))
    r_prod = torch.where(live, R * t2 / safe, torch.zeros_like(R))
    r_inp = torch.where(live, R - r_prod, torch.zeros_like(R))
    out: dict[fx.Node, torch.Tensor] = {}
    if ctx.is_relevant(inp):
        out[inp] = _sum_to(r_inp, ctx.value(inp).shape)
    elif beta != 0:
        ctx.absorb(r_inp)
    rx, ry = bilinear_matmul(x, y, r_prod, prod, x_rel=ctx.is_relevant(b1), y_rel=ctx.is_relevant(b2))
    for n, r in ((b1, rx), (b2, ry)):
        if r is not None and ctx.is_relevant(n):
            out[n] = out[n] + r if n in out else r
    return out


# --- masking ops on scores (eager attention of DistilBERT, older BERT-likes, user code) ----------

@register_rule(*aten_ops("masked_fill", "masked_fill_"))
def masked_fill_rule(ctx: RuleContext, node: fx.Node, R):
    """``x.masked_fill(mask, value)`` moves values: unmasked positions pass R to x; the filled
    positions hold a constant, so their relevance (0 wherever the fill masks attention) is
    absorbed like a constant's share."""
    x_node, mask_node = node.args[0], node.args[1]
    if len(node.args) > 2 and ctx.is_relevant(node.args[2]):
        raise ctx.unsupported(node, "the fill value depends on the float inputs")
    mask = ctx.value(mask_node).to(torch.bool)
    zero = torch.zeros((), dtype=R.dtype, device=R.device)
    keep = torch.where(mask, zero, R)
    filled = R - keep
    if bool((filled != 0).any()):
        ctx.absorb(torch.nan_to_num(filled, nan=0.0))
    return {x_node: _sum_to(keep, ctx.value(x_node).shape)}


@register_rule(*aten_ops("where"))
def where_rule(ctx: RuleContext, node: fx.Node, R):
    """``where(cond, a, b)`` moves values: each position's relevance goes to the branch that
    supplied it; a constant branch's share is absorbed."""
    if len(node.args) < 3:
        raise ctx.unsupported(node, "where(cond) (nonzero indices) has no relevance rule")
    cond_node, a, b = node.args[0], node.args[1], node.args[2]
    if ctx.is_relevant(cond_node) and ctx.value(cond_node).is_floating_point():
        raise ctx.unsupported(node, "the condition is a float tensor depending on the inputs")
    cond = ctx.value(cond_node).to(torch.bool)
    zero = torch.zeros((), dtype=R.dtype, device=R.device)
    ra = torch.where(cond, R, zero)
    rb = R - ra
    out: dict[fx.Node, torch.Tensor] = {}
    for arg, r in ((a, ra), (b, rb)):
        if ctx.is_relevant(arg):
            shape = ctx.value(arg).shape
            out[arg] = out[arg] + _sum_to(r, shape) if arg in out else _sum_to(r, shape)
        elif bool((r != 0).any()):
            ctx.absorb(r)
    return out
