"""Graph analysis: which factors of a product are a normaliser statistic of the other factor.

Spec section 5 says layer norm and RMS norm pass relevance through element by element: the
normaliser statistics carry no relevance. Fused ops (``aten.layer_norm``, ``aten.rms_norm``)
are handled by the pass-through rule, but ``torch.export`` of many ``transformers`` models
gives the decomposed form instead, e.g. LLaMA's / T5's RMS norm::

    v = mean(pow(x, 2), [-1], keepdim=True)
    y = mul(x, rsqrt(add(v, eps)))

and hand-written layer norms (``(x - mean(x)) / sqrt(var(x) + eps)`` or ``* rsqrt(...)``).
There ``y = x * s`` is a product of two input-dependent tensors, and the gating rule would give
half of the relevance to ``s``. This module recognises ``s`` as a *normaliser statistic of
x*, so the product rule gives everything to ``x`` (the pass-through of spec 5).

Definition. Let D be ``x`` and what ``x`` is derived from by casts, views and centring
(``x - mean(x)``: follow the first operand of a ``sub``). Walk back from the factor ``s``
through *statistic ops* (reductions, powers, square roots, reciprocals, casts, views, and
element-wise arithmetic between them), following only input-dependent arguments and stopping
at nodes of D; the nodes where the walk stops are the statistic's *sources*. ``s`` is a
normaliser statistic of ``x`` when

1. the walk passed through at least one reduction over some axes (mean, sum, var, std, norm,
   ...): a statistic, not an element-wise function;
2. the walk passed through an inversion (rsqrt, reciprocal, a negative power, or a division
   with the statistic in the denominator): a normaliser, not a scale-up;
3. every source lies in D: the statistic is computed from the very signal it normalises.

A walk longer than ``MAX_WALK`` nodes is not a statistic (this also bounds the cost).

The same module recognises self-gated activations written out element-wise (GELU-tanh as
``0.5·x·(1 + tanh(c·(x + 0.044715·x³)))``, QuickGELU ``x·sigmoid(1.702·x)``): there the other
factor is an element-wise function of the signal alone (``is_self_gate``), the product is an
activation, and spec 5 passes an activation's relevance through to its input.

Division by an activation-derived normaliser already gives everything to the numerator (the
``div`` rule), so only products need this analysis. The statistic's own ops (``pow``,
``rsqrt``, ...) then never receive relevance; they have a guard rule (in
``rules/normalisation.py``) that raises if one ever does, so a misrecognised pattern is loud,
never silent.
"""

from __future__ import annotations

import operator
from typing import Any

from torch import fx

#: reductions over axes: their output is a statistic of their input
REDUCTIONS = {
    "mean", "sum", "var", "var_mean", "std", "std_mean", "norm", "linalg_vector_norm",
    "frobenius_norm", "nansum", "nanmean",
}
#: ops that invert their input (the statistic becomes a normaliser)
INVERSIONS = {"rsqrt", "reciprocal"}
#: other ops a statistic may pass through (element-wise arithmetic, casts, views)
STAT_ELEMENTWISE = {
    "pow", "sqrt", "square", "abs", "add", "sub", "mul", "div", "clamp", "clamp_min",
    "maximum", "to", "_to_copy", "type_as", "alias", "clone", "detach", "contiguous", "view",
    "reshape", "_unsafe_view", "unsqueeze", "squeeze", "expand", "expand_as", "lift_fresh_copy",
    "rsub", "neg",
}


def _name(node: fx.Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    return getattr(node.target, "_opname", getattr(node.target, "__name__", ""))


def _is_inversion(node: fx.Node, child: fx.Node | None) -> bool:
    name = _name(node)
    if name in INVERSIONS:
        return True
    if name == "pow" and len(node.args) > 1 and isinstance(node.args[1], (int, float)):
        return node.args[1] < 0
    if name == "div" and child is not None and len(node.args) > 1:
        return node.args[1] is child  # the statistic is the denominator
    return False


#: ops through which a signal is derived from its source before normalisation (casts, views,
#: centring ``x - mean(x)``): the statistic may be computed from any of these
DERIVATION_OPS = {"to", "_to_copy", "type_as", "alias", "clone", "detach", "contiguous", "view",
                  "reshape", "_unsafe_view", "lift_fresh_copy", "sub"}

#: the most nodes a statistic walk visits before giving up (a statistic is a handful of ops)
MAX_WALK = 64


def signal_derivation(signal: fx.Node, relevant: set[fx.Node]) -> set[fx.Node]:
    """``signal`` and what it is derived from by casts, views and centring (``x - mean(x)``)."""
    out: set[fx.Node] = set()
    n: Any = signal
    while isinstance(n, fx.Node) and n not in out and n in relevant:
        out.add(n)
        if n.op != "call_function" or _name(n) not in DERIVATION_OPS or not n.args:
            break
        n = n.args[0]
    return out


def statistic_walk(factor: fx.Node, stop: set[fx.Node], relevant: set[fx.Node]
                   ) -> tuple[set[fx.Node], bool, bool] | None:
    """Walk back from ``factor`` through statistic ops (input-dependent arguments only),
    stopping at the nodes in ``stop``.

    Returns (sources, passed a reduction, passed an inversion), or None when the walk grows
    past ``MAX_WALK`` nodes (not a statistic)."""
    visited: set[fx.Node] = set()
    sources: set[fx.Node] = set()
    reduced = inverted = False
    stack: list[tuple[fx.Node, fx.Node | None]] = [(factor, None)]
    while stack:
        n, child = stack.pop()
        if child is not None and _is_inversion(child, n):
            inverted = True
        if n in visited:
            continue
        visited.add(n)
        if len(visited) > MAX_WALK:
            return None
        if n in stop:
            sources.add(n)
            continue
        name = _name(n) if n.op == "call_function" else ""
        if name in REDUCTIONS:
            reduced = True
        elif name != "getitem" and name not in STAT_ELEMENTWISE and name not in INVERSIONS:
            sources.add(n)
            continue
        if _is_inversion(n, None):
            inverted = True
        args: list[fx.Node] = []
        fx.node.map_arg((n.args, n.kwargs), lambda a: args.append(a))
        for a in args:
            if a in relevant:
                stack.append((a, n))
    return sources, reduced, inverted


def is_normaliser_of(factor: fx.Node, signal: fx.Node, relevant: set[fx.Node]) -> bool:
    """True when ``factor`` is a normaliser statistic (see the module doc) of ``signal``."""
    derived = signal_derivation(signal, relevant)
    if factor in derived:
        return False
    walked = statistic_walk(factor, derived, relevant)
    if walked is None:
        return False
    sources, reduced, inverted = walked
    return bool(sources) and reduced and inverted and sources <= derived


#: element-wise functions a self-gated activation is built from (GELU-tanh, SiLU, QuickGELU
#: written out: ``0.5·x·(1 + tanh(c·(x + 0.044715·x³)))``, ``x·sigmoid(1.702·x)``)
ELEMENTWISE_FN = {
    "tanh", "sigmoid", "erf", "erfc", "exp", "pow", "add", "sub", "rsub", "mul", "div", "neg",
    "to", "_to_copy", "type_as", "alias", "clone", "detach", "contiguous", "lift_fresh_copy",
    "softplus", "relu", "clamp", "clamp_min", "sqrt", "square",
}


def _scaled_derivation(signal: fx.Node, relevant: set[fx.Node]) -> set[fx.Node]:
    """``signal`` and its sources through casts and scaling by constants (``0.5 * x``)."""
    out: set[fx.Node] = set()
    n: Any = signal
    while isinstance(n, fx.Node) and n not in out and n in relevant:
        out.add(n)
        if n.op != "call_function" or not n.args:
            break
        name = _name(n)
        if name in ("mul", "div"):
            rel = [a for a in n.args[:2] if isinstance(a, fx.Node) and a in relevant]
            if len(rel) != 1 or (name == "div" and rel[0] is not n.args[0]):
                break
            n = rel[0]
        elif name in DERIVATION_OPS and name != "sub":
            n = n.args[0]
        else:
            break
    return out


def is_self_gate(factor: fx.Node, signal: fx.Node, relevant: set[fx.Node]) -> bool:
    """True when ``factor`` is an element-wise function of ``signal`` alone (no reduction): the
    product ``signal * factor`` is then a self-gated activation (SiLU, GELU written out), whose
    relevance passes through to the signal (spec 5, activations)."""
    derived = _scaled_derivation(signal, relevant)
    if factor in derived:
        return False
    seen: set[fx.Node] = set()
    sources: set[fx.Node] = set()
    stack = [factor]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if len(seen) > MAX_WALK:
            return False
        if n in derived:
            sources.add(n)
            continue
        if n.op != "call_function" or _name(n) not in ELEMENTWISE_FN:
            return False
        fx.node.map_arg((n.args, n.kwargs), lambda a: stack.append(a) if a in relevant else None)
    return bool(sources)


def normalised_signal(a: Any, b: Any, relevant: set[fx.Node]) -> fx.Node | None:
    """For a product ``a * b`` of two input-dependent nodes: the signal when the other factor is
    its normaliser statistic (``x * rsqrt(mean(x²) + eps)`` gives ``x``) or an element-wise
    function of it (a self-gated activation, ``x * sigmoid(x)``), else None (a gate: half each)."""
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    if is_normaliser_of(b, a, relevant):
        return a
    if is_normaliser_of(a, b, relevant):
        return b
    if is_self_gate(b, a, relevant):
        return a
    if is_self_gate(a, b, relevant):
        return b
    return None
