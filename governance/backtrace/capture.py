"""Graph capture: turn a model into an ATen-level fx graph the walk can read.

``torch.export`` gives the same program MLflow 3 saves for PyTorch models (the pt2 format), with
each node's module path in ``meta["nn_module_stack"]``. We walk the *unlifted* form (parameters
as ``get_attr``), which is also what ``mlflow.pytorch.load_model`` returns for pt2 models, so a
logged model and the original module explain through one code path.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn


@dataclass
class CapturedGraph:
    """An unlifted ATen graph plus how user inputs map onto its placeholders."""

    gm: fx.GraphModule
    placeholders: list[fx.Node]


def _shape_key(obj: Any) -> tuple:
    args, kwargs = obj
    if not kwargs and all(type(a) is torch.Tensor for a in args):
        # the common call (positional tensors): no pytree spec to render
        return ("tensors", tuple((tuple(a.shape), a.dtype, a.device.type) for a in args))
    leaves, spec = pytree.tree_flatten(obj)
    key = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append((tuple(leaf.shape), leaf.dtype, leaf.device.type))
        else:
            key.append(repr(leaf))
    return (str(spec), tuple(key))


def is_aten_graph(model: nn.Module) -> bool:
    """True for a GraphModule whose graph already holds ATen ops (exported or loaded pt2)."""
    if not isinstance(model, fx.GraphModule):
        return False
    return any(
        n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
        for n in model.graph.nodes
    )


class GraphCache:
    """Exports a module once per input signature (shapes, dtypes, structure) and reuses it."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self._graphs: dict[tuple, CapturedGraph] = {}

    def get(self, args: tuple, kwargs: dict) -> CapturedGraph:
        model = self._model
        if isinstance(model, torch.export.ExportedProgram):
            key = ("ep",)
            if key not in self._graphs:
                self._graphs[key] = _wrap(model.module())
            return self._graphs[key]
        if is_aten_graph(model):
            key = ("gm",)
            if key not in self._graphs:
                self._graphs[key] = _wrap(model)
            return self._graphs[key]
        # parameters replaced by new objects (load_state_dict(assign=True), pruning) must not be
        # explained with the weights captured before; in-place updates are seen anyway
        key = _shape_key((args, kwargs)) + (_tensor_ids(model),)
        if key not in self._graphs:
            self._graphs[key] = _wrap(_export(model, args, kwargs).module())
        return self._graphs[key]


def _tensor_ids(model: nn.Module) -> tuple[int, ...]:
    """Identities of the model's modules, parameters and buffers, in a fixed order: a module,
    parameter or buffer replaced by a new object changes them (a plain loop over the module
    tree: ``model.parameters()`` costs more than a small model's forward pass)."""
    ids: list[int] = []
    stack = [model]
    while stack:
        m = stack.pop()
        ids.append(id(m))
        ids.extend(map(id, m._parameters.values()))
        ids.extend(map(id, m._buffers.values()))
        stack.extend(v for v in m._modules.values() if v is not None)
    return tuple(ids)


# Context managers entered around torch.export (``adapter(model)``): they may swap a module's
# forward for an export-friendly equivalent while exporting (e.g. rules/moe.py's dense expert
# dispatch) and must restore the model on exit.
EXPORT_ADAPTERS: list[Any] = []


def register_export_adapter(adapter: Any) -> Any:
    """Register ``adapter(model) -> context manager`` to wrap every export of an nn.Module."""
    EXPORT_ADAPTERS.append(adapter)
    return adapter


def _export(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for adapter in EXPORT_ADAPTERS:
                stack.enter_context(adapter(model))
            return torch.export.export(model, args, kwargs=kwargs, strict=False)
    finally:
        model.train(was_training)


def _wrap(gm: fx.GraphModule) -> CapturedGraph:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return CapturedGraph(gm=gm, placeholders=placeholders)


def flatten_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """User inputs flattened in the order of the graph's placeholders."""
    if not kwargs and all(type(a) is torch.Tensor for a in args):  # positional tensors: no pytree
        return list(args)
    in_spec = getattr(gm, "_in_spec", None)
    if in_spec is not None and kwargs:
        from torch.export._tree_utils import reorder_kwargs

        kwargs = reorder_kwargs(kwargs, in_spec)
    flat, _ = pytree.tree_flatten((args, kwargs))
    return flat


_FORWARD_PARAMS: "weakref.WeakKeyDictionary[Any, list[str]]" = weakref.WeakKeyDictionary()


def _forward_params(model: Any) -> list[str]:
    """The parameter names of ``model.forward`` (read once per model)."""
    try:
        return _FORWARD_PARAMS[model]
    except (KeyError, TypeError):
        pass
    try:
        forward = model.forward if isinstance(model, nn.Module) else None
        params = list(inspect.signature(forward).parameters) if forward is not None else []
    except (TypeError, ValueError):
        params = []
    try:
        _FORWARD_PARAMS[model] = params
    except TypeError:  # not weak-referenceable
        pass
    return params


def input_names(model: Any, args: tuple, kwargs: dict) -> list[str]:
    """Readable names of the flattened user inputs: forward's parameter names, dict keys."""
    params = _forward_params(model)
    names: list[str] = []
    for i, a in enumerate(args):
        base = params[i] if i < len(params) else f"arg{i}"
        if type(a) is torch.Tensor:  # one leaf: no pytree
            names.append(base)
            continue
        leaves = pytree.tree_leaves(a)
        names.extend([base] if len(leaves) == 1 else [f"{base}.{j}" for j in range(len(leaves))])
    for k, v in kwargs.items():
        leaves = pytree.tree_leaves(v)
        names.extend([k] if len(leaves) == 1 else [f"{k}.{j}" for j in range(len(leaves))])
    return names
