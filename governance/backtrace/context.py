"""What a rule sees: recorded values, relevance flags, the mode, and the books it writes to."""

from __future__ import annotations

import contextlib
import contextvars
import operator
import weakref
from typing import Any

import torch
from torch import fx

from . import native
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
    "sigmoid": (-4.0, 4.0),
    "tanh": (-2.0, 2.0),
    "softmax": (-1.0, 2.0),
    "_softmax": (-1.0, 2.0),
    "silu": (-6.0, None),
    "gelu": (-6.0, None),
}

# Ops between a layer and its activation that hand the values on unchanged (eval mode).
VALUE_PRESERVING = {
    "dropout", "feature_dropout", "alpha_dropout", "clone", "contiguous", "alias", "detach",
    "view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze",
}

STABILISER = 1e-9

# Below this many multiply-adds a product runs on one intra-op thread: a parallel region costs
# tens of microseconds, and on a busy machine it waits for a thread that lost its core.
PARALLEL_WORK = 1 << 22

# the caller's intra-op thread count while a walk runs on one thread (``walk_threads``)
_PRODUCT_THREADS: contextvars.ContextVar[int | None] = contextvars.ContextVar("product_threads", default=None)


@contextlib.contextmanager
def walk_threads(parallel: bool = True):
    """Run the walk on one intra-op thread, keeping the caller's count for the big products
    (``product_threads``; none when ``parallel`` is False: a small model). Most of the walk is
    element-wise and memory-bound, or small: its parallel regions save little, and each one
    waits for its slowest thread, which on a busy machine is a thread that lost its core (two
    threads then run slower than one). The caller's setting is restored on exit."""
    n = torch.get_num_threads()
    token = _PRODUCT_THREADS.set(n if parallel else 1)
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)
        _PRODUCT_THREADS.reset(token)


def product_parallel(work: float) -> bool:
    """Whether ``product_threads(work)`` would use more than one thread (a product called
    without it then runs as it would inside it, saving the context manager on small layers)."""
    n = _PRODUCT_THREADS.get()
    return n is not None and n > 1 and work >= PARALLEL_WORK


@contextlib.contextmanager
def product_threads(work: float):
    """Inside ``walk_threads``: the caller's intra-op threads for a convolution or matrix
    product of about ``work`` multiply-adds, when that is enough to be worth parallelising."""
    if not product_parallel(work):
        yield
        return
    n = _PRODUCT_THREADS.get()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def safe_div(num: torch.Tensor, den: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """num / den where den != 0, else 0 (a unit with nothing to split passes nothing).

    Dividing by zero gives ±inf or nan exactly where den == 0 (den is finite elsewhere), so
    zeroing the non-finite results is the same as masking, in two passes instead of four.
    ``out`` (which may be ``den`` itself) saves allocating the quotient."""
    q = torch.div(num, den, out=out) if out is not None else num / den
    return torch.nan_to_num_(q, nan=0.0, posinf=0.0, neginf=0.0)


def first_output(R: Any) -> Any:
    """The relevance of output 0 of a tuple-returning op (max pooling with indices, native
    batch/layer norm, max over a dim), whose other outputs carry none; R itself otherwise."""
    return R.get(0) if isinstance(R, dict) else R


def per_map(ctx: "RuleContext", R: Any, fn) -> dict:
    """Apply ``fn(c, r) -> {arg: relevance}`` to the one map R, or (a rule registered with
    ``contrastive=True``, called with the pair) to each of R+ and R- with that map's context
    ``c`` (for its books), and zip the results into pairs. Work shared by the maps (recorded
    values, denominators, masks) is done once, outside ``fn``."""
    if isinstance(R, tuple):
        peers = ctx.peers
        if len(peers) != len(R):
            peers = [ctx] * len(R)
        outs = [fn(c, r) for c, r in zip(peers, R)]
        return {k: tuple(o[k] for o in outs) for k in outs[0]}
    return fn(ctx, R)


def map_dtype(R: Any) -> torch.dtype:
    """The dtype of the relevance a rule received (one map or a contrastive pair)."""
    r = first_output(R[0] if isinstance(R, tuple) else R)
    return r.dtype


def _feeds_output(node: fx.Node) -> bool:
    """True when ``node``'s values reach the graph output unchanged (the model's final layer)."""
    for user in node.users:
        if user.op == "output":
            return True
        name = getattr(user.target, "_opname", "")
        if user.op == "call_function" and (name in VALUE_PRESERVING or user.target is operator.getitem):
            if _feeds_output(user):
                return True
    return False


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
        self._rows: tuple[torch.Tensor, int] | None = None  # ``on_rows``
        self.fused: dict[fx.Node, Any] = {}
        # Default and contrastive maps keep the sign of their seed: with a non-negative seed
        # every relevance is >= 0 and |R| sums equal R sums (set by the engine after seeding).
        self.one_signed = False
        # rule-specific reports that end up in Explanation.extras (e.g. "expert_relevance")
        self.extras: dict[str, Any] = {}
        self._peers: tuple[weakref.ref, ...] = ()

    @property
    def peers(self) -> list["RuleContext"]:
        """The contexts of every map of this walk ([R] or [R+, R-]); a contrastive rule, called
        with the first, writes per-map extras through these. Held by weak references: a context
        that held its peers (itself among them) would be a reference cycle, and the recording's
        activations would then live until Python's cycle collector ran, not until the call ends."""
        return [ref() for ref in self._peers] if self._peers else [self]

    @peers.setter
    def peers(self, contexts: list["RuleContext"]) -> None:
        self._peers = tuple(weakref.ref(c) for c in contexts)

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
        """(l, u) of the activation that ``node``'s output feeds, or (None, None).

        The activation must be the only consumer; ops that hand the same values on unchanged
        (eval dropout, reshapes, a folded batch norm's output) are looked through, since the
        activation still sees the layer's output."""
        users = list(node.users)
        if len(users) != 1:
            return (None, None)
        user = users[0]
        if user in self.fused:  # batch norm folded into this layer: look past it
            return self.saturation(user)
        if user.op != "call_function":
            return (None, None)
        if user.target is operator.getitem:
            return self.saturation(user) if user.args[1] == 0 else (None, None)
        name = getattr(user.target, "_opname", getattr(user.target, "__name__", ""))
        if name in VALUE_PRESERVING:
            return self.saturation(user)
        if name in ("hardtanh", "hardtanh_"):  # relu6 exports as hardtanh(x, 0, 6)
            low = user.args[1] if len(user.args) > 1 else user.kwargs.get("min_val", -1.0)
            return (0.0, None) if low == 0 else (None, None)
        if name in ("softmax", "_softmax") and not _feeds_output(user):
            return (None, None)  # the softmax range applies on the final layer only
        return SATURATION.get(name, (None, None))

    # books ------------------------------------------------------------------------------
    def per_sample(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` per sample: (N,). The batch is the leading axis (or folded into it)."""
        n = self.batch_size
        if t.dim() == 0:
            return t.to(torch.float64).expand(n).clone()
        if t.numel() == n and t.shape[0] == n:  # one element a sample: nothing to add
            return t.reshape(n).to(torch.float64)
        fused = native.row_sums(t, n)  # summed in float64, one pass
        if fused is not None:
            return fused
        if t.shape[0] == n:
            return t.sum(tuple(range(1, t.dim()))).to(torch.float64)
        return t.reshape(n, -1).sum(1).to(torch.float64)

    def per_sample_abs(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of |t| per sample: (N,), without materialising |t|."""
        n = self.batch_size
        if t.dim() == 0:
            return t.abs().to(torch.float64).expand(n).clone()
        if self.one_signed:
            return self.per_sample(t)
        fused = native.row_sums(t, n, absolute=True)
        if fused is not None:
            return fused
        return torch.linalg.vector_norm(t.reshape(n, -1), ord=1, dim=1).to(torch.float64)

    def absorb(self, amount: torch.Tensor) -> None:
        """Book relevance taken out of the walk by a bias or a constant operand."""
        self._book(self.absorbed, amount)

    def absorb_product(self, s: torch.Tensor, b: torch.Tensor, b64: torch.Tensor | None = None) -> None:
        """Book Σ s·b per sample for a bias b broadcast over s (b aligned with s's trailing
        axes), without forming s·b: s summed over b's broadcast axes, then one product.
        ``b64``: b flattened in float64, when the caller keeps it."""
        lead = s.dim() - b.dim()
        if lead < 0 or (lead == 0 and b.shape[0] != 1):  # b varies along the batch: form s·b
            self._book(self.absorbed, s.to(torch.float64) * b.to(torch.float64))
            return
        red = [d for d in range(max(lead, 1), s.dim()) if b.shape[d - lead] == 1]
        s_red = s.sum(red) if red else s
        b_flat = b.reshape(-1).to(torch.float64) if b64 is None else b64
        # rows (the batch, or the batch folded with other axes) times b, then per sample
        self._book(self.absorbed, torch.mv(s_red.reshape(-1, b_flat.numel()).to(torch.float64), b_flat))

    def reroute(self, amount: torch.Tensor) -> None:
        """Book relevance that saturation moved from one side of a unit to the other."""
        self._book(self.rerouted, amount)

    @contextlib.contextmanager
    def on_rows(self, rows: torch.Tensor, per_sample: int):
        """Books written inside come from a rule run on some ``rows`` of its tensors (rows over
        the leading axes, ``per_sample`` rows to a sample): their amounts have those rows first."""
        self._rows = (rows, per_sample)
        try:
            yield
        finally:
            self._rows = None

    def _book(self, table: dict, amount: torch.Tensor) -> None:
        node = self._current
        if self._rows is not None:
            rows, per = self._rows
            k = len(rows)
            sums = native.row_sums(amount, k) if k else None
            if sums is None:
                sums = amount.to(torch.float64).reshape(k, amount.numel() // k if k else 0).sum(1)
            ps = sums.new_zeros(self.batch_size).index_add_(0, torch.div(rows, per, rounding_mode="floor"), sums)
        else:
            ps = self.per_sample(amount)
        table[node] = table[node] + ps if node in table else ps

    def set_current(self, node: fx.Node | None) -> None:
        self._current = node
