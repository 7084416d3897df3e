"""The result of one ``Backtrace.explain`` call: relevance per input, per module, and the books."""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch

# Columns of ``Explanation.layer_summary()``; aggregation and reports rely on these names.
SUMMARY_COLUMNS = [
    "module",
    "type",
    "map",
    "relevance_in",
    "relevance_out",
    "abs_relevance_in",
    "share",
    "bias_absorbed",
    "bias_share",
    "saturation_rerouted",
    "dropped",
    "branch_share",
]


class NetRelevance(Mapping):
    """Contrastive layer relevance R+ − R- per module, worked out on first access: the
    explanation keeps both maps, and the net map of a module costs a full pass over it."""

    def __init__(self, positive: Mapping[str, torch.Tensor], negative: Mapping[str, torch.Tensor]) -> None:
        self._positive, self._negative = positive, negative
        self._net: dict[str, torch.Tensor] = {}

    def __getitem__(self, module: str) -> torch.Tensor:
        net = self._net.get(module)
        if net is None:
            net = self._net[module] = self._positive[module] - self._negative[module]
        return net

    def __iter__(self):
        return iter(self._positive)

    def __len__(self) -> int:
        return len(self._positive)


@dataclass
class ModuleBooks:
    """Per-sample (N,) totals of one module: what arrived at its output, what left through its
    inputs, what its biases absorbed, what saturation rerouted, and the relevance that entered
    its residual adds split into the in-module branch and the skip around it."""

    relevance_in: torch.Tensor
    relevance_out: torch.Tensor
    abs_relevance_in: torch.Tensor
    bias_absorbed: torch.Tensor
    saturation_rerouted: torch.Tensor
    branch_in: torch.Tensor | None = None
    skip_in: torch.Tensor | None = None


#: the quantities of ``ModuleBooks`` kept per module in a ``BookTable``, in its row order
BOOK_TABLES = ("relevance_in", "abs_relevance_in", "relevance_out", "bias_absorbed", "saturation_rerouted")


class BookTable(Mapping):
    """The books of one walk: module name -> ``ModuleBooks``, held as one (quantities x modules,
    N) float64 table (rows ``BOOK_TABLES[q]`` of module ``i`` at ``q * modules + i``). A
    module's ``ModuleBooks`` (views of its rows) is made when it is first read: most callers
    read a few modules, or the whole table."""

    def __init__(self, names: list[str], table: torch.Tensor,
                 branch: Mapping[str, tuple[Any, Any]]) -> None:
        self.names, self.table, self._branch = names, table, branch
        self._index = {m: i for i, m in enumerate(names)}
        self._built: dict[str, ModuleBooks] = {}

    def __getitem__(self, module: str) -> ModuleBooks:
        books = self._built.get(module)
        if books is None:
            i, k = self._index[module], len(self.names)
            rows = {q: self.table[j * k + i] for j, q in enumerate(BOOK_TABLES)}
            b_in, s_in = self._branch.get(module) or (None, None)
            books = self._built[module] = ModuleBooks(
                **rows,
                branch_in=b_in if isinstance(b_in, torch.Tensor) else None,
                skip_in=s_in if isinstance(s_in, torch.Tensor) else None,
            )
        return books

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class Explanation:
    """Relevance of one batch in one mode.

    ``input_relevance`` is shaped like the input (a dict by argument name when the model takes
    several tensors). ``layer_relevance`` maps a module's qualified name to the relevance at its
    output, batch first. In contrastive mode ``positive`` and ``negative`` hold the R+ and R-
    explanations and ``input_relevance`` is their difference.
    """

    mode: str
    task: str
    input_relevance: torch.Tensor | dict[str, torch.Tensor]
    layer_relevance: Mapping[str, torch.Tensor]
    output: torch.Tensor
    target: torch.Tensor | None
    seed_relevance: torch.Tensor
    books: Mapping[str, ModuleBooks] = field(default_factory=dict, repr=False)
    module_types: dict[str, str] = field(default_factory=dict, repr=False)
    positive: "Explanation | None" = None
    negative: "Explanation | None" = None
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def expert_relevance(self) -> dict[str, torch.Tensor]:
        """Mixture-of-experts blocks: {block module name: (N, T, E) relevance of each expert's
        term per token}; summed over experts it is the relevance at the block's output."""
        return self.extras.get("expert_relevance", {})

    def expert_summary(self) -> pd.DataFrame:
        """One row per (MoE block, expert), ranked within each block: the batch mean of the
        expert's total relevance, its absolute relevance, its share of the block's absolute
        relevance and the mean number of tokens per sample that gave it any (what pruning
        ranks by)."""
        rows = []
        for block, er in self.expert_relevance.items():
            er = er.double()
            tot = er.reshape(er.shape[0], -1, er.shape[-1])
            absd = tot.abs().sum(1)  # (N, E)
            block_abs = absd.sum(1, keepdim=True)
            share = torch.where(block_abs > 0, absd / torch.where(block_abs > 0, block_abs, torch.ones_like(block_abs)),
                                torch.zeros_like(absd))
            for e in range(tot.shape[-1]):
                rows.append({
                    "block": block, "expert": e,
                    "relevance": float(tot[..., e].sum(1).mean()),
                    "abs_relevance": float(absd[:, e].mean()),
                    "share": float(share[:, e].mean()),
                    "tokens": float((tot[..., e] != 0).sum(1).double().mean()),
                })
        df = pd.DataFrame(rows, columns=["block", "expert", "relevance", "abs_relevance", "share", "tokens"])
        return df.sort_values(["block", "abs_relevance"], ascending=[True, False], ignore_index=True)

    @property
    def batch_size(self) -> int:
        return int(self.seed_relevance.shape[0])

    def input_total(self) -> torch.Tensor:
        """Per-sample sum of the input relevance over every input (N,)."""
        tensors = (
            self.input_relevance.values()
            if isinstance(self.input_relevance, dict)
            else [self.input_relevance]
        )
        total = torch.zeros_like(self.seed_relevance)
        for t in tensors:
            total = total + t.reshape(t.shape[0], -1).sum(1).to(total.dtype)
        return total

    def module_totals(self) -> dict[str, torch.Tensor]:
        """Per-sample signed relevance at each module's output: {module: (N,)}."""
        return {name: b.relevance_in for name, b in self.books.items()}

    def layer_summary(self, per_sample: bool = False) -> pd.DataFrame:
        """One row per module (spec section 8), batch means unless ``per_sample``.

        ``share`` is the module's |relevance| at its output over the |seed|; ``bias_share`` the
        part of what arrived that its biases absorbed; ``branch_share`` the part of the relevance
        entering its residual adds that flowed through the in-module branch rather than the skip
        (NaN when the module has no residual add).
        """
        if self.mode == "contrastive" and self.positive is not None and self.negative is not None:
            parts = [
                self.positive.layer_summary(per_sample).assign(map="positive"),
                self.negative.layer_summary(per_sample).assign(map="negative"),
            ]
            return pd.concat(parts, ignore_index=True)[
                (["sample"] if per_sample else []) + SUMMARY_COLUMNS
            ]
        seed_abs = self.seed_relevance.abs()
        safe_seed = torch.where(seed_abs > 0, seed_abs, torch.ones_like(seed_abs))
        rows = []
        for name, b in self.books.items():
            a_in = b.relevance_in
            denom = torch.where(a_in.abs() > 0, a_in.abs(), torch.ones_like(a_in))
            dropped = b.relevance_in - b.relevance_out - b.bias_absorbed
            if b.branch_in is not None and b.skip_in is not None:
                tot = b.branch_in + b.skip_in
                branch = torch.where(tot.abs() > 0, b.branch_in / torch.where(tot.abs() > 0, tot, torch.ones_like(tot)), torch.full_like(tot, float("nan")))
            else:
                branch = torch.full_like(a_in, float("nan"))
            cols = {
                "relevance_in": a_in,
                "relevance_out": b.relevance_out,
                "abs_relevance_in": b.abs_relevance_in,
                "share": b.abs_relevance_in / safe_seed,
                "bias_absorbed": b.bias_absorbed,
                "bias_share": b.bias_absorbed / denom,
                "saturation_rerouted": b.saturation_rerouted,
                "dropped": dropped,
                "branch_share": branch,
            }
            if per_sample:
                for i in range(a_in.shape[0]):
                    rows.append(
                        {"sample": i, "module": name, "type": self.module_types.get(name, ""),
                         "map": "relevance", **{k: float(v[i]) for k, v in cols.items()}}
                    )
            else:
                rows.append(
                    {"module": name, "type": self.module_types.get(name, ""), "map": "relevance",
                     **{k: float(torch.nanmean(v.double())) if k == "branch_share" else float(v.double().mean()) for k, v in cols.items()}}
                )
        columns = (["sample"] if per_sample else []) + SUMMARY_COLUMNS
        return pd.DataFrame(rows, columns=columns)
