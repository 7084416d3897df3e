"""``Backtrace``: the engine's public face (capture, record, seed, walk, report)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from . import arena, rules  # noqa: F401  (rules: registers the built-in rules)
from .capture import GraphCache, flatten_inputs, input_names
from .context import PARALLEL_WORK, RuleContext, walk_threads
from .explanation import Explanation, NetRelevance
from .modules import ModuleMap, build_module_map
from .recording import forward_work, record
from .rules.affine import is_nonnegative, mark_foldable_batch_norms
from .seeding import TASKS, make_seed
from .walk import check_rules, walk

from governance.tasks import MODES


# Forward passes below this many multiply-adds explain on one intra-op thread: their ops are too
# small for parallel regions to pay (an MLP at batch 1024 is ~4M).
SMALL_MODEL_WORK = 16 * PARALLEL_WORK


def infer_task(y: torch.Tensor) -> str:
    """A task from the output's shape and range when the caller gives none."""
    if y.dim() == 3:
        return "generation"
    flat = y.reshape(y.shape[0], -1)
    if flat.shape[1] == 1:
        return "binary-classification" if bool(((y >= 0) & (y <= 1)).all()) else "regression"
    return "multiclass-classification"


class Backtrace:
    """DLBacktrace relevance for a PyTorch model (``nn.Module``, an exported ``GraphModule`` as
    ``mlflow.pytorch.load_model`` returns for pt2 models, or a ``torch.export.ExportedProgram``).

    The graph is captured with ``torch.export`` once per input signature, activations are
    recorded in one forward pass, and the rules walk it backwards op by op.

    ``explain(x, mode=...)`` gives one mode's ``Explanation``; ``explain_modes(x, modes=(...))``
    gives several (``{mode: Explanation}``) from one recorded forward pass, each identical to its
    own ``explain`` call: use it when a batch is explained in more than one mode.
    """

    def __init__(self, model: nn.Module | torch.export.ExportedProgram, output_index: int = 0) -> None:
        self.model = model
        self.output_index = output_index
        self._graphs = GraphCache(model)
        self._module_maps: dict[int, ModuleMap] = {}
        self._fused: dict[int, dict] = {}  # batch norms folded into the layer before, per graph
        self._work: dict[tuple, float] = {}  # forward multiply-adds per graph and input shapes
        self._outputs: dict[int, list[fx.Node]] = {}  # the output's node leaves, per graph

    def explain(
        self,
        x: torch.Tensor | tuple | Mapping[str, Any],
        mode: str = "default",
        task: str | None = None,
        target: int | torch.Tensor | None = None,
        multiplier: float = 100.0,
        seed: str = "output",
        threshold: float = 0.5,
    ) -> Explanation:
        """Relevance of every input element (and every module) for the model's output.

        ``x``: one tensor, a tuple of positional inputs, or a dict of keyword inputs.
        ``mode``: "default" (spec 3), "contrastive" (spec 4) or "signed" (spec 3b).
        ``task``: one of ``TASKS`` (inferred from the output when omitted).
        ``target``: the explained class / token per sample (default: the argmax).
        """
        return self.explain_modes(x, (mode,), task=task, target=target, multiplier=multiplier,
                                  seed=seed, threshold=threshold)[mode]

    def explain_modes(
        self,
        x: torch.Tensor | tuple | Mapping[str, Any],
        modes: Sequence[str] = MODES,
        task: str | None = None,
        target: int | torch.Tensor | None = None,
        multiplier: float = 100.0,
        seed: str = "output",
        threshold: float = 0.5,
    ) -> dict[str, Explanation]:
        """``explain`` in several modes over ONE recorded forward pass: ``{mode: Explanation}``
        in the order of ``modes``, each the same (bit for bit) as ``explain(x, mode=m, ...)``
        with the same arguments. The recording is shared; each mode's walk frees its own
        intermediates before the next starts, so the extra memory is one walk's at a time plus
        the explanations returned (:meth:`iter_modes` hands them over one at a time)."""
        return dict(self.iter_modes(x, modes, task=task, target=target, multiplier=multiplier, seed=seed,
                                    threshold=threshold))

    def iter_modes(
        self,
        x: torch.Tensor | tuple | Mapping[str, Any],
        modes: Sequence[str] = MODES,
        task: str | None = None,
        target: int | torch.Tensor | None = None,
        multiplier: float = 100.0,
        seed: str = "output",
        threshold: float = 0.5,
    ) -> Iterator[tuple[str, Explanation]]:
        """:meth:`explain_modes` one ``(mode, Explanation)`` at a time, over one recording: the
        next mode's walk runs when the caller asks for it, so a caller that drops each
        explanation before taking the next holds one at a time (the explain stage does).
        The arguments are checked when this is called, not at the first step."""
        modes = (modes,) if isinstance(modes, str) else tuple(dict.fromkeys(modes))
        if not modes:
            raise ValueError(f"explain_modes() needs at least one mode; choose from {', '.join(MODES)}")
        for mode in modes:
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if task is not None and task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        return self._walk_modes(x, modes, task, target, multiplier, seed, threshold)

    def _walk_modes(self, x, modes, task, target, multiplier, seed, threshold) -> Iterator[tuple[str, Explanation]]:
        """Record once, then walk each mode on demand (see :meth:`iter_modes`)."""
        args, kwargs, single = _as_call(x)
        captured = self._graphs.get(args, kwargs)
        gm = captured.gm
        if kwargs and getattr(gm, "_in_spec", None) is not None:
            from torch.export._tree_utils import reorder_kwargs

            kwargs = reorder_kwargs(kwargs, gm._in_spec)
        flat = flatten_inputs(gm, args, kwargs)
        names = input_names(self.model, args, kwargs)
        tensors = [v for v in flat if isinstance(v, torch.Tensor)]
        if not tensors:
            raise ValueError("explain() needs at least one tensor input")
        n = int(tensors[0].shape[0])
        # a small model runs on one intra-op thread throughout; a large one records with the
        # caller's threads and walks on one, its big products on the caller's (context.walk_threads)
        size_key = (id(gm), tuple(tuple(t.shape) for t in tensors))
        work = self._work.get(size_key)
        on_cpu = tensors[0].device.type == "cpu"
        if on_cpu:
            arena.hold(self)
        with arena.scope(on_cpu), (walk_threads(parallel=False) if work is not None and work < SMALL_MODEL_WORK
                                   else nullcontext()):
            recording = record(gm, flat)
        if work is None:
            work = self._work[size_key] = forward_work(gm, recording.values)
            if work < SMALL_MODEL_WORK and torch.get_num_threads() > 1:
                # record again as every later call will (one thread), so that the first call's
                # relevance has the same bits as the next ones'
                with arena.scope(on_cpu), walk_threads(parallel=False):
                    recording = record(gm, flat)
        for mode in modes:
            with arena.scope(on_cpu), walk_threads(parallel=work >= SMALL_MODEL_WORK):
                exp = self._walk(gm, recording, captured, names, flat, single, n, mode, task,
                                 target, multiplier, seed, threshold)
            yield mode, exp
            del exp

    def explain_generation(self, input_ids: torch.Tensor, max_new_tokens: int = 1,
                           attention_mask: torch.Tensor | None = None, mode: str = "default",
                           multiplier: float = 100.0, seed: str = "output", **kwargs: Any):
        """Generate ``max_new_tokens`` tokens greedily and explain each one over the prompt and
        the earlier generated tokens: a ``generation.GenerationExplanation`` (k x T relevance
        matrix per sample, per-layer relevance per step). See ``generation.py``."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        from .generation import explain_generation

        return explain_generation(self, input_ids, max_new_tokens=max_new_tokens,
                                  attention_mask=attention_mask, mode=mode,
                                  multiplier=multiplier, seed=seed, **kwargs)

    def _walk(self, gm, recording, captured, names, flat, single, n, mode, task, target, multiplier,
              seed, threshold) -> Explanation:
        """Seed the output, walk the graph back and assemble the explanation."""
        modules = self._module_map(gm)
        out_node, y = self._output(gm, recording)
        task = task or infer_task(y)
        seeds, tgt = make_seed(y, task, mode, target, multiplier, seed, threshold)
        ctxs = [RuleContext(recording, modules, mode, n) for _ in seeds]
        for c, s in zip(ctxs, seeds):
            c.one_signed = mode != "signed" and is_nonnegative(s)
            c.peers = ctxs
        fused = self._fused.get(id(gm))
        if fused is None:
            fused = self._fused[id(gm)] = mark_foldable_batch_norms(gm, ctxs[0])
        for c in ctxs:
            c.fused = fused
        check_rules(ctxs[0], gm)
        with torch.no_grad():
            results = walk(gm, ctxs, [{out_node: s} for s in seeds])
        exps = [
            self._explanation(mode, task, captured.placeholders, names, flat, single, r, modules,
                              recording, y, tgt, s)
            for r, s in zip(results, seeds)
        ]
        for e, c in zip(exps, ctxs):
            e.extras.update(c.extras)
        if mode != "contrastive":
            return exps[0]
        pos, neg = exps
        return Explanation(
            mode=mode, task=task,
            input_relevance=_combine(pos.input_relevance, neg.input_relevance),
            layer_relevance=NetRelevance(pos.layer_relevance, neg.layer_relevance),
            output=y, target=tgt,
            seed_relevance=pos.seed_relevance - neg.seed_relevance,
            module_types=modules.types, positive=pos, negative=neg,
            extras=_combine_extras(pos.extras, neg.extras),
        )

    # -- helpers ---------------------------------------------------------------------------
    def _module_map(self, gm: fx.GraphModule) -> ModuleMap:
        key = id(gm)
        if key not in self._module_maps:
            root = self.model
            root_type = type(root).__name__ if isinstance(root, nn.Module) and not isinstance(root, fx.GraphModule) else ""
            self._module_maps[key] = build_module_map(gm, root_type)
        return self._module_maps[key]

    def _output(self, gm: fx.GraphModule, recording) -> tuple[fx.Node, torch.Tensor]:
        leaves = self._outputs.get(id(gm))
        if leaves is None:
            out = next(n for n in gm.graph.nodes if n.op == "output")
            leaves = self._outputs[id(gm)] = [a for a in pytree.tree_leaves(out.args[0]) if isinstance(a, fx.Node)]
        floats = [a for a in leaves if isinstance(recording.values.get(a), torch.Tensor)
                  and recording.values[a].is_floating_point()]
        if not floats:
            raise ValueError("the model returns no float tensor to explain")
        if self.output_index >= len(floats):
            raise ValueError(f"output_index {self.output_index} but the model returns {len(floats)} float tensors")
        node = floats[self.output_index]
        if node not in recording.relevant:
            raise ValueError("the model's output does not depend on its float inputs; nothing to explain")
        return node, recording.values[node]

    def _explanation(self, mode, task, placeholders, names, flat, single, result, modules,
                     recording, y, tgt, seed) -> Explanation:
        rel = result.relevance
        inputs: dict[str, torch.Tensor] = {}
        for ph, name, v in zip(placeholders, names, flat):
            if not isinstance(v, torch.Tensor):
                continue
            r = rel.get(ph)
            dtype = v.dtype if v.is_floating_point() else seed.dtype
            inputs[name] = r.to(dtype) if isinstance(r, torch.Tensor) else torch.zeros(v.shape, dtype=dtype, device=v.device)
        layer: dict[str, torch.Tensor] = {}
        for mod, node in modules.outputs.items():
            r = rel.get(node)
            if isinstance(r, dict):
                r = r.get(0)
            if isinstance(r, torch.Tensor):
                layer[mod] = r
            else:
                v = recording.values.get(node)
                v = v[0] if isinstance(v, (tuple, list)) else v
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    layer[mod] = torch.zeros_like(v)
        input_relevance: Any = next(iter(inputs.values())) if single else inputs
        n = seed.shape[0]
        return Explanation(
            mode=mode, task=task, input_relevance=input_relevance, layer_relevance=layer,
            output=y, target=tgt, seed_relevance=seed.reshape(n, -1).sum(1),
            books=result.books, module_types=modules.types,
        )


def _as_call(x: Any) -> tuple[tuple, dict, bool]:
    if isinstance(x, torch.Tensor):
        return (x,), {}, True
    if isinstance(x, Mapping):
        return (), dict(x), False
    if isinstance(x, (tuple, list)):
        return tuple(x), {}, False
    raise TypeError(f"explain() takes a tensor, a tuple of tensors or a dict of tensors, not {type(x).__name__}")


def _combine(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return {k: a[k] - b[k] for k in a}
    return a - b


def _combine_extras(a: dict, b: dict) -> dict:
    """Contrastive: per-expert relevance (and other tables of tensors) as R+ - R-."""
    out: dict = {}
    for k, v in a.items():
        w = b.get(k)
        if isinstance(v, dict) and isinstance(w, dict):
            out[k] = {m: v[m] - w[m] for m in v if m in w}
        else:
            out[k] = v
    return out
