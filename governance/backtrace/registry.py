"""The rule table: which relevance rule handles which ATen op.

A rule is a function ``rule(ctx, node, R) -> {arg_node: R_arg}``. It receives the relevance
``R`` that arrived at ``node``'s output (batch first, shaped like the output) and returns the
relevance each input-dependent argument receives. Whatever it does not hand on it must account
for with ``ctx.absorb`` (bias and constant shares); anything else unaccounted is reported as
dropped. Rules registered with ``contrastive=True`` also receive, in contrastive mode, the pair
``(R_plus, R_minus)`` and return pairs; every other rule is applied to each map independently,
as spec section 4 says.

Register a rule for an op the engine does not know::

    from governance.backtrace import register_rule

    @register_rule(torch.ops.aten.my_op)
    def my_op_rule(ctx, node, R):
        return {node.args[0]: R}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

Rule = Callable[..., dict]


@dataclass(frozen=True)
class RuleEntry:
    fn: Rule
    contrastive: bool = False


_RULES: dict[Any, RuleEntry] = {}


def _keys(target: Any) -> list[Any]:
    """An op can be registered by overload (aten.add.Tensor), packet (aten.add) or callable."""
    if isinstance(target, (list, tuple, set)):
        out: list[Any] = []
        for t in target:
            out.extend(_keys(t))
        return out
    return [target]


def register_rule(*targets: Any, contrastive: bool = False) -> Callable[[Rule], Rule]:
    """Decorator: register ``fn`` as the relevance rule of each op in ``targets``.

    A later registration for the same op replaces the earlier one, so users can override a
    built-in rule.
    """

    def deco(fn: Rule) -> Rule:
        for t in targets:
            for k in _keys(t):
                _RULES[k] = RuleEntry(fn, contrastive)
        return fn

    return deco


def lookup_rule(target: Any) -> RuleEntry | None:
    """The rule for ``target``: by exact overload first, then by its overload packet."""
    entry = _RULES.get(target)
    if entry is None and isinstance(target, torch._ops.OpOverload):
        entry = _RULES.get(target.overloadpacket)
    return entry


def aten_ops(*names: str) -> list[Any]:
    """The ATen overload packets with these names that exist in the installed torch."""
    return [getattr(torch.ops.aten, n) for n in names if hasattr(torch.ops.aten, n)]


def registered_ops() -> list[str]:
    """Names of every op with a rule (for docs and error messages)."""
    return sorted(str(k) for k in _RULES)


def op_name(target: Any) -> str:
    """A readable ATen name such as ``aten.conv2d.default``."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    return getattr(target, "__name__", str(target))
