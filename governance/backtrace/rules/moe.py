"""Mixture of experts (spec section 7): ``y = Σ_e g_e · E_e(x)`` over the routed experts.

Export path. The Hugging Face MoE blocks of ``transformers`` 5 (Mixtral, OLMoE, Qwen2-MoE,
Qwen3-MoE, ... -- every experts class decorated with ``use_experts_implementation``) dispatch
tokens to experts with ``one_hot`` / ``nonzero`` / ``index_add_`` in their default ("eager")
implementation; the data-dependent shapes stop ``torch.export``. While the engine exports a
model, :func:`dense_experts` swaps each experts module's ``forward`` (on the instance, restored
afterwards; the model itself is untouched) for an equivalent *dense dispatch*:

* the router is unchanged (softmax, top-k, renormalisation) and its top-k weights are scattered
  into a dense gate matrix ``G`` (tokens × experts, zero for experts a token was not routed to);
* every expert runs on every token as plain ``linear`` ops (gate / up projections split so the
  activation's saturation is seen, ``act(gate) * up``, down projection), so each expert is
  walked with the normal rules (section 3, the gating product's uniform rule, ...);
* the outputs are combined by one op, ``governance_backtrace::moe_combine(E_out, G)``
  (``y_t = Σ_e G_te · E_out[e, t]``), whose rule is the spec's: R_y is split between the terms
  ``g_e · E_e(x)`` by the add rule (|term|), each term's share goes to its expert's output and
  the router weight, a gate, receives nothing. Unrouted experts have ``g_e = 0`` and get 0.

Checked on Mixtral, OLMoE, Qwen2-MoE (with its shared expert) and Qwen3-MoE blocks. To log such
a model in MLflow's pt2 format, export it inside ``with dense_experts(model):`` so the saved
graph holds the same dense dispatch. The outputs equal the original block's up to float round-off. The cost: every expert runs on
every token (E/k times the routed expert compute) -- the price of static shapes.

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
from ..context import RuleContext, safe_div
from ..registry import aten_ops, register_rule
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
