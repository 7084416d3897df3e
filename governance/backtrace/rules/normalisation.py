"""Decomposed normalisations (spec section 5: layer norm and RMS norm pass relevance through).

``torch.export`` leaves fused norms (``aten.layer_norm``, ``aten.rms_norm``) as one op, handled
by the pass-through rule in ``elementwise.py``. Hand-written norms (Hugging Face's LLaMA / T5
RMS norms, ``(x - mean) * rsqrt(var + eps)``) arrive as ``pow``, ``mean``, ``var``, ``rsqrt``,
... The product rule recognises the statistic factor (``normalisers.py``) and gives all the
relevance to the signal, so these statistic ops never receive any. They are registered here
only so that the pre-walk check accepts them; if relevance ever reaches one (a pattern the
analysis did not recognise as a normalisation), the walk stops with a clear error instead of
guessing.
"""

from __future__ import annotations

from torch import fx

from ..context import RuleContext
from ..registry import aten_ops, register_rule

STATISTIC_OPS = aten_ops(
    "pow", "rsqrt", "sqrt", "reciprocal", "square", "var", "var_mean", "std", "std_mean",
    "linalg_vector_norm", "norm", "frobenius_norm",
)


def _is_zero(R) -> bool:
    if isinstance(R, dict):
        return all(_is_zero(v) for v in R.values())
    if isinstance(R, tuple):
        return all(_is_zero(v) for v in R)
    return not bool((R != 0).any())


@register_rule(*STATISTIC_OPS)
def statistic_rule(ctx: RuleContext, node: fx.Node, R):
    """A normaliser statistic carries no relevance; relevance arriving here is an error."""
    if _is_zero(R):
        return {}
    raise ctx.unsupported(
        node,
        "this op is only supported inside a normalisation (x * rsqrt(mean(x**2) + eps), "
        "(x - mean) / sqrt(var + eps), ...) whose statistic carries no relevance; here it "
        "received relevance",
    )
