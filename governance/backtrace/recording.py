"""One forward pass over the captured graph that records every node's value, and the flags that
say which tensors carry relevance (float tensors that depend on the model inputs)."""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

# Integer ops through which token ids may travel to an embedding (relevance comes back along them).
INDEX_PATH_OPS = {
    "view", "reshape", "_unsafe_view", "flatten", "unsqueeze", "squeeze", "expand", "slice",
    "select", "permute", "transpose", "t", "clone", "contiguous", "alias", "_to_copy", "to",
    "detach", "lift_fresh_copy",
}


# Ops whose result depends on an argument's shape or dtype only, never on its values.
SHAPE_ONLY_OPS = {
    "zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones", "new_empty",
    "new_full", "sym_size", "sym_numel", "sym_stride", "size", "dim",
}


@dataclass
class Recording:
    """Values of every node of one forward pass, and the relevance flags."""

    values: dict[fx.Node, Any]
    relevant: frozenset[fx.Node]  # shared by every recording of the graph: read-only
    output_values: list[Any] = field(default_factory=list)
    # facts about recorded values that rules work out once for every walk over this recording
    # (``explain_modes`` walks one recording in several modes): node -> value >= 0 everywhere
    nonnegative: dict[fx.Node, bool] = field(default_factory=dict)


def _is_float_tensor(v: Any) -> bool:
    """Float (or complex) tensors can carry relevance; complex ones then need a rule."""
    return isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())


def _arg_nodes(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n))
    return out


def _token_path(idx: fx.Node) -> bool:
    """True when embedding indices are user-given token ids, reached from an input through
    shape ops only. Indices computed from the ids (RoBERTa's position ids from cumsum of the
    padding mask) are positions, i.e. constants of the explanation (spec: position ids)."""
    n = idx
    while True:
        if n.op == "placeholder":
            return True
        if n.op != "call_function" or _packet_name(n.target) not in INDEX_PATH_OPS:
            return False
        srcs = [a for a in _arg_nodes(n)]
        if len(srcs) != 1:
            return False
        n = srcs[0]


def _packet_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    return getattr(target, "__name__", "")


_RECORDERS: "weakref.WeakKeyDictionary[fx.GraphModule, tuple[fx.GraphModule, list[fx.Node]]]"
_RECORDERS = weakref.WeakKeyDictionary()


def _recorder(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[fx.Node]]:
    """A compiled copy of ``gm`` that returns every node's value (no interpreter overhead)."""
    if gm in _RECORDERS:
        return _RECORDERS[gm]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    kept: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if node.op == "call_module" and node.target == "_guards_fn":
            continue  # export's guard check: shapes are ours by construction
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.op != "placeholder":
            kept.append(node)
    graph.output(tuple(env[n] for n in kept))
    rec = fx.GraphModule(gm, graph)
    _RECORDERS[gm] = (rec, kept)
    return rec, kept


_RELEVANT: "weakref.WeakKeyDictionary[fx.GraphModule, dict[tuple, frozenset[fx.Node]]]"
_RELEVANT = weakref.WeakKeyDictionary()


def record(gm: fx.GraphModule, flat_inputs: list[Any]) -> Recording:
    """Run the graph once (no grad) and keep every value; then mark the relevant nodes (which
    depend on the graph and the inputs' dtypes only, so they are worked out once per pair)."""
    rec, kept = _recorder(gm)
    with torch.no_grad():
        outs = rec(*flat_inputs)
    values: dict[fx.Node, Any] = dict(zip(kept, outs))
    values.update(zip([n for n in gm.graph.nodes if n.op == "placeholder"], flat_inputs))
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    out = fx.node.map_arg(out_node.args[0], lambda n: values[n])
    key = tuple(v.dtype if isinstance(v, torch.Tensor) else type(v) for v in flat_inputs)
    per_graph = _RELEVANT.setdefault(gm, {})
    relevant = per_graph.get(key)
    if relevant is None:
        relevant = per_graph[key] = frozenset(_relevant_nodes(gm, values))
    outs = out if isinstance(out, (tuple, list)) else [out]
    return Recording(values=values, relevant=relevant, output_values=list(outs))


def _relevant_nodes(gm: fx.GraphModule, values: dict[fx.Node, Any]) -> set[fx.Node]:
    """Float tensors that depend on the inputs, and the integer token-id paths to embeddings."""
    depends: set[fx.Node] = set()
    relevant: set[fx.Node] = set()
    embedding_indices: list[fx.Node] = []
    for node in gm.graph.nodes:
        v = values.get(node)
        if node.op == "placeholder":
            depends.add(node)
            if _is_float_tensor(v):
                relevant.add(node)
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        args = _arg_nodes(node)
        name = _packet_name(node.target)
        if name in SHAPE_ONLY_OPS:  # zeros_like(x), x.new_ones(...): x's shape, not its values
            continue
        if any(a in depends for a in args):
            depends.add(node)
        if name in ("embedding", "embedding_bag") and len(node.args) > 1:
            idx = node.args[1]
            if isinstance(idx, fx.Node) and _token_path(idx):
                relevant.add(node)
                embedding_indices.append(idx)
                continue
        if node.target is operator.getitem:
            parent = node.args[0]
            if parent in relevant and (_is_float_tensor(v) or isinstance(v, (tuple, list))):
                relevant.add(node)
            continue
        float_out = _is_float_tensor(v) or (
            isinstance(v, (tuple, list)) and any(_is_float_tensor(x) for x in v)
        )
        if float_out and any(a in relevant for a in args):
            relevant.add(node)
    # Token ids reach embeddings through integer shape ops; relevance walks back along them.
    stack = list(embedding_indices)
    while stack:
        n = stack.pop()
        if n in relevant:
            continue
        relevant.add(n)
        if n.op == "call_function" and _packet_name(n.target) in INDEX_PATH_OPS:
            stack.extend(a for a in _arg_nodes(n) if a in depends and a not in relevant)
    return relevant


# ops whose cost is a product: (the contraction size of each output element) x (output size)
_PRODUCT_OPS = {
    "linear", "addmm", "mm", "matmul", "bmm", "baddbmm", "einsum", "conv1d", "conv2d", "conv3d",
    "convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
}


def forward_work(gm: fx.GraphModule, values: dict[fx.Node, Any]) -> float:
    """Multiply-adds of the recorded forward pass, estimated from its products (outputs times
    contraction sizes); the engine sizes its parallelism by it."""
    total = 0.0
    for node in gm.graph.nodes:
        if node.op != "call_function" or _packet_name(node.target) not in _PRODUCT_OPS:
            continue
        out = values.get(node)
        out = out[0] if isinstance(out, (tuple, list)) else out
        args = [values.get(a) if isinstance(a, fx.Node) else a for a in node.args[:3]]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not isinstance(out, torch.Tensor) or len(tensors) < 2:
            continue
        name = _packet_name(node.target)
        if name.startswith("conv"):
            inner = tensors[1][0].numel()
        elif name.startswith("_scaled") or name.startswith("scaled"):
            inner = 2 * tensors[1].shape[-2]
        elif name == "addmm":
            inner = tensors[1].shape[-1]
        else:
            inner = tensors[0].shape[-1] if tensors[0].dim() else 1
        total += float(out.numel()) * inner
    return total
