"""The backward walk: from the seeded output to the inputs, op by op, in reverse graph order."""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import fx

from . import native
from .context import RuleContext
from .errors import UnsupportedOperationError
from .explanation import BOOK_TABLES, BookTable
from .modules import ModuleMap
from .registry import lookup_rule

_NO_RULE_NEEDED = {"sym_size", "sym_numel", "sym_stride", "_assert_tensor_metadata", "_assert_scalar"}


@dataclass
class WalkResult:
    """Relevance at every node of one map, and the per-module books."""

    relevance: dict[fx.Node, Any]
    books: BookTable


def _name(target: Any) -> str:
    name = getattr(target, "_opname", None) or getattr(target, "__name__", None)
    return name if name is not None else str(target)


_CHECKED: "weakref.WeakKeyDictionary[fx.GraphModule, set[frozenset]]" = weakref.WeakKeyDictionary()


def check_rules(ctx: RuleContext, gm: fx.GraphModule) -> None:
    """Fail before any work if a relevance-carrying op has no rule (never a silent guess).
    A graph that passed once with the same relevant nodes passes again (rules are only ever
    added or replaced), so the check runs once per graph and relevance pattern."""
    seen = _CHECKED.setdefault(gm, set())
    key = frozenset(ctx.recording.relevant)  # the recording's own frozenset: no copy
    if key in seen:
        return
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target != "_guards_fn" and node in ctx.recording.relevant:
            raise UnsupportedOperationError(f"call_module {node.target}", ctx.module_path(node))
        if node.op != "call_function" or node not in ctx.recording.relevant:
            continue
        if node.target is operator.getitem or _name(node.target) in _NO_RULE_NEEDED:
            continue
        if lookup_rule(node.target) is None:
            raise ctx.unsupported(node)
    seen.add(key)


def _accumulate(table: dict, node: fx.Node, r: Any) -> None:
    if node in table and table[node] is not None:
        table[node] = table[node] + r
    else:
        table[node] = r


def walk(gm: fx.GraphModule, ctxs: list[RuleContext], seeds: list[dict[fx.Node, torch.Tensor]]) -> list[WalkResult]:
    """Propagate each seeded map (one, or R+ and R- in contrastive mode) back to the inputs."""
    n_maps = len(ctxs)
    maps: list[dict[fx.Node, Any]] = [dict(s) for s in seeds]
    edges: list[list[tuple[fx.Node, fx.Node, torch.Tensor, torch.Tensor]]] = [[] for _ in range(n_maps)]
    branch: list[dict[str, list[torch.Tensor]]] = [{} for _ in range(n_maps)]
    ctx0 = ctxs[0]
    contrastive = ctx0.mode == "contrastive"
    paths = ctx0.modules.paths
    relevant = ctx0.recording.relevant

    def crossing(user: fx.Node, arg: fx.Node) -> bool:
        return arg.op == "placeholder" or paths.get(user) != paths.get(arg)

    # per-sample sums by tensor: pass-through rules hand the same tensor across several module
    # boundaries, and its sums are read once (a weak reference tells a reused id apart)
    sums: dict[tuple[int, int], tuple[weakref.ref, torch.Tensor, torch.Tensor]] = {}

    def sample_sums(c: RuleContext, k: int, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (k, id(r))
        hit = sums.get(key)
        if hit is None or hit[0]() is not r:
            s = c.per_sample(r)
            hit = sums[key] = (weakref.ref(r), s, s if c.one_signed else c.per_sample_abs(r))
        return hit[1], hit[2]

    def pair_sums(v: Any) -> None:
        """Contrastive: when R- directly follows R+ in one buffer (an affine rule's stacked
        result), both maps' per-sample sums in one pass, into ``sums``."""
        n = ctx0.batch_size
        if not (isinstance(v, tuple) and len(v) == 2 and all(c.one_signed for c in ctxs)):
            return
        r0, r1 = v
        if not (isinstance(r0, torch.Tensor) and isinstance(r1, torch.Tensor) and r0.dim() >= 1
                and r0.shape[0] == n and r0.shape == r1.shape and r0.dtype == r1.dtype
                and r0.is_contiguous() and r1.is_contiguous()):
            return
        size = r0.numel() * r0.element_size()
        store = r0.untyped_storage()
        if (r1.data_ptr() != r0.data_ptr() + size or r1.untyped_storage().data_ptr() != store.data_ptr()
                or r0.data_ptr() - store.data_ptr() + 2 * size > store.nbytes()):
            return
        k = r0.numel() // n
        both = native.row_sums(r0.reshape(n, k).as_strided((2 * n, k), (k, 1)), 2 * n)
        if both is not None:
            for m, (r, part) in enumerate(((r0, both[:n]), (r1, both[n:]))):
                sums[(m, id(r))] = (weakref.ref(r), part, part)

    for node in reversed(list(gm.graph.nodes)):
        if node.op != "call_function":
            continue
        rs = [m.get(node) for m in maps]
        if all(r is None for r in rs):
            continue
        if node.target is operator.getitem:
            parent, idx = node.args[0], node.args[1]
            for k in range(n_maps):
                if rs[k] is None:
                    continue
                slots = maps[k].get(parent)
                if not isinstance(slots, dict):
                    slots = {}
                    maps[k][parent] = slots
                slots[idx] = slots[idx] + rs[k] if idx in slots else rs[k]
            continue
        name = _name(node.target)
        if name in _NO_RULE_NEEDED:
            continue
        entry = lookup_rule(node.target)
        if entry is None:
            raise ctx0.unsupported(node)
        outs: list[dict]
        if contrastive and entry.contrastive:
            for c in ctxs:
                c.set_current(node)
            zero = lambda r, other: r if r is not None else _zeros_like_rel(other)  # noqa: E731
            pair = (zero(rs[0], rs[1]), zero(rs[1], rs[0]))
            res = entry.fn(ctx0, node, pair)
            for arg, v in res.items():
                if arg in relevant and crossing(node, arg):
                    pair_sums(v)
            outs = [{a: v[k] for a, v in res.items()} for k in range(n_maps)]
        else:
            outs = []
            for k in range(n_maps):
                ctxs[k].set_current(node)
                outs.append(entry.fn(ctxs[k], node, rs[k]) if rs[k] is not None else {})
        residual = name in ("add", "sub") and sum(a in relevant for a in node.args if isinstance(a, fx.Node)) >= 2
        for k in range(n_maps):
            ck = ctxs[k]
            for arg, r in outs[k].items():
                if r is None or arg not in relevant:
                    continue
                _accumulate(maps[k], arg, r)
                if crossing(node, arg):  # only edges that enter or leave a module count in the books
                    edges[k].append((node, arg, *sample_sums(ck, k, r)))
            if residual:
                mod = ctx0.module_path(node)
                rec = branch[k].setdefault(mod, [0.0, 0.0])
                for arg, r in outs[k].items():
                    if arg not in relevant:
                        continue
                    inside = mod in ctx0.modules.path_set(arg) if arg.op != "placeholder" else False
                    rec[0 if inside else 1] = rec[0 if inside else 1] + sample_sums(ck, k, r)[0]
    return [WalkResult(m, b) for m, b in zip(maps, _books(ctxs, seeds, edges, branch))]


def _zeros_like_rel(r: Any) -> Any:
    if isinstance(r, dict):
        return {i: torch.zeros_like(v) for i, v in r.items()}
    return torch.zeros_like(r)


def _book_plan(mods: ModuleMap, seeds: tuple, edges: tuple, absorbed: tuple, rerouted: tuple):
    """Where each per-sample amount of one map's walk goes: (module names, the table row of each
    addition into its ``BookTable``'s (quantities x modules, N) table, the place in the map's
    list of amounts of what each addition adds, the number of amounts)."""
    names = [m for m in mods.types if m == "" or m in mods.outputs]
    row = {m: i for i, m in enumerate(names)}
    rows: list[int] = []
    picks: list[int] = []

    def add(quantity: str, modules, j: int) -> None:
        base = BOOK_TABLES.index(quantity) * len(names)
        for m in modules:
            if m in row:
                rows.append(base + row[m])
                picks.append(j)

    def paths(node: fx.Node) -> frozenset[str]:
        return frozenset() if node.op == "placeholder" else mods.path_set(node)

    j = 0
    for node in seeds:  # amounts: the seed's sum and |sum|
        add("relevance_in", paths(node), j)
        add("abs_relevance_in", paths(node), j + 1)
        j += 2
    for user, arg in edges:  # each edge's sum and |sum|
        left, entered = mods.crossed(user, arg)
        add("relevance_out", left, j)
        add("relevance_in", entered, j)
        add("abs_relevance_in", entered, j + 1)
        j += 2
    for quantity, nodes in (("bias_absorbed", absorbed), ("saturation_rerouted", rerouted)):
        for node in nodes:
            add(quantity, paths(node), j)
            j += 1
    return names, rows, picks, j


class _BookPlan(NamedTuple):
    """The books' additions for one walk pattern over one graph, every map's one after the
    other (map k's table rows offset by k tables, its amounts by the amounts before it)."""

    names: list[str]  # the modules with books, in table order
    size: int  # rows of one map's table: quantities x modules
    index: torch.Tensor  # the table row of each addition
    picks: list[int]  # the amount each addition adds
    used: list[int]  # the amounts added anywhere, each stacked once
    take: torch.Tensor  # each addition's row in that stack
    on_device: dict  # ``index`` copied to a device, per device


def _plan_books(mods: ModuleMap, keys: tuple) -> _BookPlan:
    """Every map's ``_book_plan`` in one (worked out once per graph and walk pattern)."""
    parts = [_book_plan(mods, *key) for key in keys]
    names = parts[0][0]
    size = len(BOOK_TABLES) * len(names)
    rows: list[int] = []
    picks: list[int] = []
    taken = 0
    for k, (_, r, p, count) in enumerate(parts):
        rows += [k * size + i for i in r]
        picks += [taken + j for j in p]
        taken += count
    used = sorted(set(picks))
    where = {j: i for i, j in enumerate(used)}
    return _BookPlan(names, size, torch.tensor(rows, dtype=torch.long), picks, used,
                     torch.tensor([where[j] for j in picks], dtype=torch.long), {})


def _books(ctxs: list[RuleContext], seeds: list[dict], edges: list[list], branch: list[dict]) -> list[BookTable]:
    """Each map's ``BookTable`` from the per-sample sums of its seeds, of the edges that cross
    module boundaries and of the absorbed / rerouted amounts: every map's tables are one
    (maps x quantities x modules, N) tensor filled by one row add (``native.add_rows``, else
    ``index_add_``), in the plan's order, so each sum adds up in the same order whatever the
    number of maps."""
    ctx0 = ctxs[0]
    n, mods = ctx0.batch_size, ctx0.modules
    device = next(iter(seeds[0].values())).device if seeds[0] else None
    keys = tuple((tuple(s), tuple((e[0], e[1]) for e in es), tuple(c.absorbed), tuple(c.rerouted))
                 for c, s, es in zip(ctxs, seeds, edges))
    plan = mods.plans.get(keys)
    if plan is None:
        plan = mods.plans[keys] = _plan_books(mods, keys)
    amounts: list[torch.Tensor] = []
    for c, s, es in zip(ctxs, seeds, edges):
        for r in s.values():
            amounts += (c.per_sample(r), c.per_sample_abs(r))
        for e in es:
            amounts += (e[2], e[3])
        amounts += c.absorbed.values()
        amounts += c.rerouted.values()
    acc = torch.zeros(len(ctxs) * plan.size, n, dtype=torch.float64, device=device)
    if plan.picks and not native.add_rows(acc, plan.index, torch.stack([amounts[j] for j in plan.used]), plan.take):
        idx = plan.index if device is None or device.type == "cpu" else plan.on_device.get(device)
        if idx is None:
            idx = plan.on_device[device] = plan.index.to(device)
        acc.index_add_(0, idx, torch.stack([amounts[j] for j in plan.picks]))
    return [BookTable(plan.names, acc[k * plan.size:(k + 1) * plan.size], b) for k, b in enumerate(branch)]
