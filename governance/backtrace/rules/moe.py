"""Mixture of experts (spec section 7): ``y = Σ_e g_e · E_e(x)`` over the routed experts.

Export path. The Hugging Face MoE blocks of ``transformers`` 5 (Mixtral, OLMoE, Qwen2-MoE,
Qwen3-MoE, ... -- every experts class decorated with ``use_experts_implementation``) dispatch
tokens to experts with ``one_hot`` / ``nonzero`` / ``index_add_`` in their default ("eager")
implementation; the data-dependent shapes stop ``torch.export``. While the engine exports a
model, :func:`dense_experts` swaps each experts module's ``forward`` (on the instance, restored
afterwards; the model itself is untouched) for an export-friendly one. The router is unchanged
(softmax, top-k, renormalisation); its top-k weights are scattered into a dense gate matrix
``G`` (tokens × experts, zero where a token was not routed). Then, for the standard expert MLP
(``down(act(gate x) ⊙ up x)`` or ``down(act(up x))``, with or without biases):

* one op, ``governance_backtrace::moe_experts(x, G, weights...)``, computes
  ``y_t = Σ_e G_te · E_e(x_t)`` running each expert on its routed tokens only (its data-dependent
  shapes live inside the op, so export sees a static one). Its rule is spec section 7: R_y is
  split between the terms ``g_e · E_e(x)`` by the add rule (|term|), each term's share goes to
  its expert's output (the router weight is a gate and receives nothing), and each expert is
  walked with the normal rules on its routed tokens -- section 3 / 3b / 4 for the down, gate and
  up projections (the shared implementation in ``affine.py``; the gate projection with its
  activation's saturation range), the uniform rule for ``act(gate) ⊙ up``, pass-through for the
  activation. Unrouted experts have ``g_e = 0`` and get exactly 0, so only routed tokens cost.
* Otherwise (a custom ``_apply_gate``, a post-expert norm, or ``ROUTED = False``) every expert
  runs on every token as plain ``linear`` ops combined by ``governance_backtrace::moe_combine``
  (same split rule), and the walk goes through the expert ops one by one (E/k times the routed
  compute). A test checks that both paths give the same relevance.

Checked on Mixtral, OLMoE, Qwen2-MoE (with its shared expert) and Qwen3-MoE blocks. To log such
a model in MLflow's pt2 format, export it inside ``with dense_experts(model):`` so the saved
graph holds the same ops. The outputs equal the original block's up to float round-off.

Reported per explanation: ``exp.expert_relevance[block]``, a (N, T, E) tensor -- the relevance
each expert's term received per token (sum over the hidden dimension), keyed by the MoE block's
module name (the parent of the experts module, e.g. ``model.layers.0.mlp``). Summed over
experts it equals the relevance at the block's output for that token.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..capture import register_export_adapter
from ..context import SATURATION, RuleContext, safe_div
from ..registry import aten_ops, register_rule
from .affine import AffineUnit, _contrastive, _default_or_signed, _linear_bwd, _linear_fwd
from .shape import shape_rule


@torch.library.custom_op("governance_backtrace::moe_combine", mutates_args=())
def moe_combine(expert_out: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """y[t] = Σ_e gates[t, e] · expert_out[e, t]; expert_out (E, T, H), gates (T, E)."""
    return torch.einsum("eth,te->th", expert_out, gates.to(expert_out.dtype))


@moe_combine.register_fake
def _moe_combine_fake(expert_out: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    return expert_out.new_empty(expert_out.shape[1:])


def _moe_combine_backward(ctx, grad):
    expert_out, gates = ctx.saved_tensors
    g_out = torch.einsum("th,te->eth", grad, gates.to(grad.dtype))
    g_gates = torch.einsum("th,eth->te", grad, expert_out).to(gates.dtype)
    return g_out, g_gates


def _moe_combine_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


moe_combine.register_autograd(_moe_combine_backward, setup_context=_moe_combine_setup)


# --- routed experts: one op for the standard expert MLP, walked on each expert's own tokens ----

#: use the routed-experts op where the experts are the standard MLP (False: always the dense graph)
ROUTED = True


def _act(name: str):
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def _expert_parts(x, e, gate_up, down, gate_up_bias, down_bias, has_gate, transposed, act_fn):
    """One expert on rows x: (gate pre-activation | None, up pre-activation, hidden, output),
    and the weights as (out, in) matrices: (w_gate, w_up, w_down), biases likewise."""
    w = gate_up[e].transpose(0, 1) if transposed else gate_up[e]
    wd = down[e].transpose(0, 1) if transposed else down[e]
    b = gate_up_bias[e] if gate_up_bias is not None else None
    bd = down_bias[e] if down_bias is not None else None
    if has_gate:
        inter = w.shape[0] // 2
        wg, wu = w[:inter], w[inter:]
        bg, bu = (b[:inter], b[inter:]) if b is not None else (None, None)
        g_pre = F.linear(x, wg, bg)
        u_pre = F.linear(x, wu, bu)
        h = act_fn(g_pre) * u_pre
    else:
        wg, bg, g_pre = None, None, None
        wu, bu = w, b
        u_pre = F.linear(x, wu, bu)
        h = act_fn(u_pre)
    out = F.linear(h, wd, bd)
    return g_pre, u_pre, h, out, (wg, wu, wd), (bg, bu, bd)


def _moe_experts_impl(x, gates, gate_up, down, gate_up_bias, down_bias, has_gate, transposed, act):
    act_fn = _act(act)
    n_out = down.shape[2] if transposed else down.shape[1]
    y = x.new_zeros(x.shape[0], n_out)
    for e in range(gates.shape[1]):
        rows = (gates[:, e] != 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        out = _expert_parts(x[rows], e, gate_up, down, gate_up_bias, down_bias, has_gate, transposed, act_fn)[3]
        y = y.index_add(0, rows, gates[rows, e:e + 1].to(out.dtype) * out)
    return y


@torch.library.custom_op("governance_backtrace::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, gates: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None, has_gate: bool,
                transposed: bool, act: str) -> torch.Tensor:
    """y[t] = Σ_e gates[t, e] · E_e(x[t]), each expert run on the tokens routed to it only.
    E_e(x) = down_e(act(gate_e x) ⊙ up_e x) (``has_gate``) or down_e(act(up_e x))."""
    return _moe_experts_impl(x, gates, gate_up, down, gate_up_bias, down_bias, has_gate, transposed, act)


def _moe_experts_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.config = inputs[6:]


def _moe_experts_backward(ctx, grad):
    """Gradients (a logged pt2 graph stays differentiable): autograd through the same code."""
    saved = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) if t is not None and t.is_floating_point() else t
                  for t in saved]
        y = _moe_experts_impl(*leaves, *ctx.config)
        wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        gs = iter(torch.autograd.grad(y, wrt, grad, allow_unused=True))
    out = [next(gs) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in leaves]
    return (*out, None, None, None)


moe_experts.register_autograd(_moe_experts_backward, setup_context=_moe_experts_setup)


@moe_experts.register_fake
def _moe_experts_fake(x, gates, gate_up, down, gate_up_bias, down_bias, has_gate, transposed, act):
    return x.new_empty(x.shape[0], down.shape[2] if transposed else down.shape[1])


def _act_saturation(act: str) -> tuple[float | None, float | None]:
    a = act.lower()
    for key in ("silu", "swish", "gelu", "relu6", "relu", "sigmoid", "tanh"):
        if key in a:
            return SATURATION.get("silu" if key == "swish" else key, (None, None))
    return (None, None)


class _RowsCtx:
    """The rule context seen by the affine rule on one expert's rows: books scattered back to
    every token so they stay per sample."""

    def __init__(self, ctx: RuleContext, rows: torch.Tensor, n_tokens: int) -> None:
        self._ctx, self._rows, self._n = ctx, rows, n_tokens

    def _full(self, t: torch.Tensor) -> torch.Tensor:
        full = t.new_zeros((self._n,) + tuple(t.shape[1:]))
        return full.index_copy_(0, self._rows, t)

    def absorb(self, amount: torch.Tensor) -> None:
        self._ctx.absorb(self._full(amount))

    def absorb_product(self, s: torch.Tensor, b: torch.Tensor, b64: torch.Tensor | None = None) -> None:
        self._ctx.absorb_product(self._full(s), b, b64)

    def reroute(self, amount: torch.Tensor) -> None:
        self._ctx.reroute(self._full(amount))

    def __getattr__(self, name: str):
        return getattr(self._ctx, name)


def _affine(ctx, node, x, w, b, pre, sat, Rs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Section 3 / 3b / 4 for a linear map on rows x (the shared implementation in affine.py)."""
    u = AffineUnit(None, w, b, _linear_fwd, _linear_bwd, pre, (-1, 0))  # type: ignore[arg-type]
    if ctx.mode == "contrastive":
        return list(_contrastive(ctx, node, u, Rs[0], Rs[1], x=x)[None])
    return [_default_or_signed(ctx, node, u, Rs[0], signed=ctx.mode == "signed", x=x, sat=sat)[None]]


@register_rule(torch.ops.governance_backtrace.moe_experts, contrastive=True)
def moe_experts_rule(ctx: RuleContext, node: fx.Node, R):
    """Spec section 7 on the routed tokens of each expert:

    * R_y is split between the terms g_e · E_e(x) by the add rule (|term|, per token and hidden
      unit); the router weight is a gate, so each share goes whole to the expert's output;
    * each expert is walked with the normal rules: its down projection with section 3 (3b / 4),
      the product act(gate) ⊙ up with the uniform rule (half each; spec 5), the activation
      passes relevance through, and the gate / up projections with section 3, the gate with the
      activation's saturation range.

    Unrouted (token, expert) pairs have g_e = 0 and receive exactly 0, so only routed tokens are
    computed. Books the per-token relevance of every expert in ``ctx.extras["expert_relevance"]``.
    """
    a = node.args
    x_node, g_node = a[0], a[1]
    x, gates = ctx.value(x_node), ctx.value(g_node)
    gate_up, down = ctx.value(a[2]), ctx.value(a[3])
    gate_up_bias = ctx.value(a[4]) if a[4] is not None else None
    down_bias = ctx.value(a[5]) if a[5] is not None else None
    has_gate, transposed, act = bool(a[6]), bool(a[7]), str(a[8])
    act_fn = _act(act)
    sat = _act_saturation(act)
    contrastive = ctx.mode == "contrastive"
    Rs = list(R) if contrastive else [R]
    n_tok, n_exp = gates.shape
    experts = []
    den = None
    for e in range(n_exp):
        rows = (gates[:, e] != 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        xe = x[rows]
        parts = _expert_parts(xe, e, gate_up, down, gate_up_bias, down_bias, has_gate, transposed, act_fn)
        term = (gates[rows, e:e + 1].to(parts[3].dtype) * parts[3]).abs()
        den = term.new_zeros(n_tok, term.shape[1]) if den is None else den
        den.index_add_(0, rows, term)
        experts.append((e, rows, xe, parts, term))
    R_x = [torch.zeros_like(x) for _ in Rs]
    per_token = [x.new_zeros(n_tok, n_exp) for _ in Rs]
    for e, rows, xe, (g_pre, u_pre, h, out, (wg, wu, wd), (bg, bu, bd)), term in experts:
        rctx = _RowsCtx(ctx, rows, n_tok)
        R_out = [safe_div(r[rows], den[rows]) * term for r in Rs]
        for m, r in enumerate(R_out):
            per_token[m][rows, e] = r.sum(-1)
        R_h = _affine(rctx, node, h, wd, bd, out, (None, None), R_out)
        if has_gate:
            half = [r / 2 for r in R_h]
            R_xe = _affine(rctx, node, xe, wg, bg, g_pre, sat, half)
            R_xu = _affine(rctx, node, xe, wu, bu, u_pre, (None, None), half)
            R_xe = [p + q for p, q in zip(R_xe, R_xu)]
        else:
            R_xe = _affine(rctx, node, xe, wu, bu, u_pre, sat, R_h)
        for m in range(len(Rs)):
            R_x[m].index_add_(0, rows, R_xe[m])
    n = ctx.batch_size
    name = _block_name(ctx, node)
    peers = list(getattr(ctx, "peers", [ctx])) if contrastive else [ctx]
    for m, pt in enumerate(per_token[:len(peers)]):
        if n_tok % n == 0:
            pt = pt.reshape(n, -1, n_exp)
        table = peers[m].extras.setdefault("expert_relevance", {})
        table[name] = table[name] + pt if name in table else pt
    if not ctx.is_relevant(x_node):
        return {}
    return {x_node: tuple(R_x) if contrastive else R_x[0]}


def is_hf_experts(module: nn.Module) -> bool:
    """A ``transformers`` experts module (3-D expert weights, ``use_experts_implementation``)."""
    down = getattr(module, "down_proj", None)
    return (
        isinstance(down, torch.Tensor) and down.dim() == 3 and hasattr(module, "has_gate")
        and hasattr(module, "is_transposed") and hasattr(module, "num_experts")
    )


def _w(module: nn.Module, name: str, e: int) -> torch.Tensor:
    w = getattr(module, name)[e]
    return w.transpose(0, 1) if module.is_transposed else w


def dense_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """Export-friendly experts forward: every expert on every token, combined by moe_combine."""
    from transformers.integrations.moe import _default_apply_gate

    n_exp = self.num_experts
    x = hidden_states
    gates = torch.zeros(x.shape[0], n_exp, dtype=top_k_weights.dtype, device=x.device)
    gates = gates.scatter(1, top_k_index, top_k_weights)
    has_bias = bool(getattr(self, "has_bias", False))
    default_gate = getattr(type(self), "_apply_gate", _default_apply_gate) is _default_apply_gate
    act = getattr(getattr(self, "config", None), "hidden_act", None)
    if (ROUTED and isinstance(act, str) and default_gate and not getattr(self, "has_post_expert_norm", False)
            and type(_act(act)) is type(self.act_fn)):
        name = "gate_up_proj" if self.has_gate else "up_proj"
        return moe_experts(
            x, gates, getattr(self, name), self.down_proj,
            getattr(self, name + "_bias") if has_bias else None,
            self.down_proj_bias if has_bias else None,
            bool(self.has_gate), bool(self.is_transposed), act,
        ).to(hidden_states.dtype)
    outs = []
    for e in range(n_exp):
        if self.has_gate:
            w = _w(self, "gate_up_proj", e)
            b = self.gate_up_proj_bias[e] if has_bias else None
            if default_gate:
                inter = w.shape[0] // 2
                gate = F.linear(x, w[:inter], b[:inter] if b is not None else None)
                up = F.linear(x, w[inter:], b[inter:] if b is not None else None)
                h = self.act_fn(gate) * up
            else:
                h = self._apply_gate(F.linear(x, w, b))
        else:
            w = _w(self, "up_proj", e)
            h = self.act_fn(F.linear(x, w, self.up_proj_bias[e] if has_bias else None))
        out = F.linear(h, _w(self, "down_proj", e), self.down_proj_bias[e] if has_bias else None)
        if getattr(self, "has_post_expert_norm", False):
            out = self.post_expert_norm(out)
        outs.append(out)
    return moe_combine(torch.stack(outs), gates).to(hidden_states.dtype)


@register_export_adapter
@contextlib.contextmanager
def dense_experts(model: nn.Module) -> Iterator[None]:
    """While exporting: every HF experts module uses :func:`dense_experts_forward`."""
    patched = []
    if isinstance(model, nn.Module):
        for m in model.modules():
            if is_hf_experts(m):
                had = "forward" in m.__dict__
                old = m.__dict__.get("forward")
                m.forward = types.MethodType(dense_experts_forward, m)
                patched.append((m, had, old))
    try:
        yield
    finally:
        for m, had, old in patched:
            if had:
                m.forward = old
            else:
                del m.forward


def _block_name(ctx: RuleContext, node: fx.Node) -> str:
    chain = ctx.modules.paths.get(node, ("",))
    return chain[-2] if len(chain) >= 2 else chain[-1]


@register_rule(torch.ops.governance_backtrace.moe_combine)
def moe_combine_rule(ctx: RuleContext, node: fx.Node, R: torch.Tensor):
    """Add rule over the terms g_e · E_e(x); each share to its expert's output, none to the gate.
    Books the per-token relevance of every expert in ``ctx.extras["expert_relevance"]``."""
    out_node, gate_node = node.args[0], node.args[1]
    outs, gates = ctx.value(out_node), ctx.value(gate_node)
    terms = (gates.transpose(0, 1).unsqueeze(-1).to(outs.dtype) * outs).abs()  # (E, T, H)
    s = safe_div(R, terms.sum(0))
    r_out = s.unsqueeze(0) * terms
    per_token = r_out.sum(-1).transpose(0, 1)  # (T, E)
    n = ctx.batch_size
    if per_token.shape[0] % n == 0:
        per_token = per_token.reshape(n, -1, per_token.shape[-1])
    table = ctx.extras.setdefault("expert_relevance", {})
    name = _block_name(ctx, node)
    table[name] = table[name] + per_token if name in table else per_token
    return {out_node: r_out} if ctx.is_relevant(out_node) else {}


# The router's top-k moves values (relevance would go back to the selected probabilities); the
# gate scatter likewise. The combine rule gives the gates nothing, so these only make the
# router's ops known to the rule check.
register_rule(*aten_ops("topk", "scatter"))(shape_rule)
