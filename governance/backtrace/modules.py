"""Which module each graph node belongs to, and which node is each module's output."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx


@dataclass
class ModuleMap:
    """Module paths per node (innermost last), each module's output node and type name."""

    paths: dict[fx.Node, tuple[str, ...]]
    outputs: dict[str, fx.Node]
    types: dict[str, str]
    _crossed: dict = field(default_factory=dict, repr=False)
    plans: dict = field(default_factory=dict, repr=False)  # the books' plans per walk pattern (walk.py)

    def innermost(self, node: fx.Node) -> str:
        p = self.paths.get(node, ("",))
        return p[-1] if p else ""

    def path_set(self, node: fx.Node) -> frozenset[str]:
        return frozenset(self.paths.get(node, ("",)))

    def crossed(self, user: fx.Node, arg: fx.Node) -> tuple[frozenset[str], frozenset[str]]:
        """Modules that relevance leaves and enters on the edge from ``user`` back to ``arg``
        (memoised: the books visit the same edges on every call)."""
        key = (user, arg)
        hit = self._crossed.get(key)
        if hit is None:
            pu = self.path_set(user)
            pa = frozenset() if arg.op == "placeholder" else self.path_set(arg)
            hit = self._crossed[key] = (pu - pa, pa - pu)
        return hit


def build_module_map(gm: fx.GraphModule, root_type: str = "") -> ModuleMap:
    """Read ``nn_module_stack`` (torch.export) into module paths; the root module is ``""``."""
    paths: dict[fx.Node, tuple[str, ...]] = {}
    types: dict[str, str] = {"": root_type}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        chain = [""]
        for fqn, typ in stack.values():
            name = fqn if isinstance(fqn, str) else str(fqn)
            if name and name not in chain:
                chain.append(name)
            if name:
                types.setdefault(name, str(typ).rsplit(".", 1)[-1].strip("'>"))
            elif not types[""]:
                types[""] = str(typ).rsplit(".", 1)[-1].strip("'>")
        paths[node] = tuple(chain)
    outputs: dict[str, fx.Node] = {}
    for node, chain in paths.items():
        user_sets = [paths.get(u, ("",)) for u in node.users]
        for mod in chain:
            if not mod:
                continue
            if not node.users or any(u.op == "output" or mod not in us for u, us in zip(node.users, user_sets)):
                outputs[mod] = node  # graph order: the last such node wins
    return ModuleMap(paths=paths, outputs=outputs, types=types)
