"""Embedding lookups (spec section 5): relevance flows from the vectors back to the token ids."""

from __future__ import annotations

import torch
from torch import fx

from ..context import RuleContext
from ..registry import aten_ops, register_rule


@register_rule(*aten_ops("embedding"))
def embedding_rule(ctx: RuleContext, node: fx.Node, R: torch.Tensor):
    """A token's relevance is the sum over its embedding vector's dimensions."""
    return {node.args[1]: R.sum(-1)}
