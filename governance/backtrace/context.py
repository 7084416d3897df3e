"""What a rule sees: recorded values, relevance flags, the mode, and the books it writes to."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from .errors import UnsupportedOperationError
from .modules import ModuleMap
from .recording import Recording
from .registry import op_name

# Saturation ranges (l, u) of the activation an affine layer feeds (spec section 3).
SATURATION: dict[str, tuple[float | None, float | None]] = {
    "relu": (0.0, None),
    "relu_": (0.0, None),
    "leaky_relu": (0.0, None),
    "leaky_relu_": (0.0, None),
    "relu6": (0.0, None),
    "hardtanh": (None, None),
    "sigmoid": (-4.0, 4.0),
    "tanh": (-2.0, 2.0),
    "softmax": (-1.0, 2.0),
    "_softmax": (-1.0, 2.0),
    "silu": (-6.0, None),
    "gelu": (-6.0, None),
}

STABILISER = 1e-9


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where den != 0, else 0 (a unit with nothing to split passes nothing)."""
    nz = den != 0
    return torch.where(nz, num / torch.where(nz, den, torch.ones_like(den)), torch.zeros_like(num))


class RuleContext:
    """Shared state of one walk. Rules read values and flags here and write their books."""

    def __init__(self, recording: Recording, modules: ModuleMap, mode: str, batch_size: int) -> None:
        self.recording = recording
        self.modules = modules
        self.mode = mode
        self.batch_size = batch_size
        self.absorbed: dict[fx.Node, torch.Tensor] = {}
        self.rerouted: dict[fx.Node, torch.Tensor] = {}
        self._current: fx.Node | None = None
        self.fused: dict[fx.Node, Any] = {}
        # rule-specific reports that end up in Explanation.extras (e.g. "expert_relevance")
        self.extras: dict[str, Any] = {}

    # values and flags -------------------------------------------------------------------
    def value(self, a: Any) -> Any:
        """The recorded value of a node argument (literals are returned as they are)."""
        if isinstance(a, fx.Node):
            return self.recording.values[a]
        return a

    def is_relevant(self, a: Any) -> bool:
        """True for graph nodes that carry relevance (input-dependent floats, token-id paths)."""
        return isinstance(a, fx.Node) and a in self.recording.relevant

    def module_path(self, node: fx.Node) -> str:
        return self.modules.innermost(node)

    def unsupported(self, node: fx.Node, detail: str = "") -> UnsupportedOperationError:
        return UnsupportedOperationError(op_name(node.target), self.module_path(node), detail)

    # saturation -------------------------------------------------------------------------
    def saturation(self, node: fx.Node) -> tuple[float | None, float | None]:
        """(l, u) of the activation that ``node``'s output feeds directly, or (None, None)."""
        users = list(node.users)
        if len(users) != 1:
            return (None, None)
        user = users[0]
        if user in self.fused:  # batch norm folded into this layer: look past it
            return self.saturation(user)
        if user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0:
            return self.saturation(user)
        if user.op != "call_function":
            return (None, None)
        name = getattr(user.target, "_opname", getattr(user.target, "__name__", ""))
        return SATURATION.get(name, (None, None))

    # books ------------------------------------------------------------------------------
    def per_sample(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` per sample: (N,). The batch is the leading axis (or folded into it)."""
        n = self.batch_size
        if t.dim() == 0:
            return t.expand(n).clone()
        if t.shape[0] == n:
            return t.reshape(n, -1).sum(1)
        return t.reshape(n, -1).sum(1)

    def absorb(self, amount: torch.Tensor) -> None:
        """Book relevance taken out of the walk by a bias or a constant operand."""
        self._book(self.absorbed, amount)

    def reroute(self, amount: torch.Tensor) -> None:
        """Book relevance that saturation moved from one side of a unit to the other."""
        self._book(self.rerouted, amount)

    def _book(self, table: dict, amount: torch.Tensor) -> None:
        node = self._current
        ps = self.per_sample(amount).to(torch.float64)
        table[node] = table[node] + ps if node in table else ps

    def set_current(self, node: fx.Node | None) -> None:
        self._current = node
