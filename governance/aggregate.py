"""Local relevance -> global importance, layer ranking, reason codes, stability and direction.

Everything here is a mergeable reduction (sums, counts, sums of squares, bootstrap replicate
sums) or a pure function of one, so memory does not grow with the number of rows and the same
code runs per batch, per chunk or per Spark partition, merged with ``merge``.

Conventions:

* a sample's *share* of unit i is ``R_i / sum_j |R_j|`` (L1-normalised; all-zero rows give 0);
* ``importance`` is the mean of ``|share|``, ``signed`` the mean of ``share``, ``std`` the
  standard deviation of ``|share|``; ``ci_low``/``ci_high`` a 95% Poisson-bootstrap percentile
  interval of the importance; ``rank`` 1 is the most important (ties broken by name);
* the bootstrap weights and the random halves for stability are functions of (seed, sample
  id) (``governance.stage.keys``), so any batching or partitioning gives the same result;
* a unit's *direction* is the sign of the Spearman correlation between its input value and its
  signed relevance (``raises`` / ``lowers``; ``mixed`` when |rho| < 0.1); units without a single
  input value (image regions, words) take the sign of their mean signed share over their mean
  |share| instead, with the same 0.1 threshold, and no correlation.

Units are named by strings and may be a fixed set (table columns) or grow as batches bring new
ones (words): every accumulator keeps its own ordered vocabulary and merges by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from governance.stage.keys import Draws

TABLE_COLUMNS = ["feature", "importance", "signed", "std", "ci_low", "ci_high", "rank"]
DIRECTION_COLUMNS = ["direction", "value_relevance_correlation"]
MIXED_BELOW = 0.1

#: Batch draws keyed by sample id (kept under this name for callers of the first version).
BatchDraws = Draws


def l1_normalise(relevance: np.ndarray) -> np.ndarray:
    """Each row divided by its L1 norm (sum of |R| = 1); all-zero rows stay zero. (N, F) float64."""
    return l1_shares(relevance)[0]


def l1_shares(relevance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shares, norms): each row of ``relevance`` over its L1 norm (all-zero rows stay zero), and
    the norms (N,), with one pass for the absolute values. (N, F) and (N,) float64."""
    r = np.asarray(relevance, dtype=np.float64).reshape(len(relevance), -1)
    norm = np.abs(r).sum(axis=1)
    ok = norm > 0
    if ok.all():
        return r / norm[:, None], norm
    return np.divide(r, norm[:, None], out=np.zeros_like(r), where=ok[:, None]), norm


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` on torch's thread pool when torch is loaded: numpy's BLAS threads and torch's
    OpenMP threads competing for the same cores made these small products 10x slower."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return a @ b
    return torch.matmul(torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(np.ascontiguousarray(b))).numpy()


def rank_of(values: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Rank (1 = largest) of each value, ties broken by name."""
    order = sorted(range(len(values)), key=lambda i: (-float(values[i]), names[i]))
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[order] = np.arange(1, len(values) + 1)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    ra = pd.Series(np.asarray(a, dtype=np.float64)).rank().to_numpy()
    rb = pd.Series(np.asarray(b, dtype=np.float64)).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def column_spearman(values: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    """Per column, the Spearman correlation between ``values[:, j]`` and ``relevance[:, j]``
    (average ranks for ties; NaN where a column is constant or has fewer than 3 rows)."""
    v = pd.DataFrame(np.asarray(values, dtype=np.float64)).rank().to_numpy()
    r = pd.DataFrame(np.asarray(relevance, dtype=np.float64)).rank().to_numpy()
    if len(v) < 3:
        return np.full(v.shape[1], np.nan)
    v = v - v.mean(0)
    r = r - r.mean(0)
    den = np.sqrt((v * v).sum(0) * (r * r).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (v * r).sum(0) / den
    return np.where(den > 0, rho, np.nan)


def direction_label(score: float | None) -> str:
    """``raises`` / ``lowers`` / ``mixed`` (|score| < 0.1 or unknown)."""
    if score is None or not math.isfinite(score) or abs(score) < MIXED_BELOW:
        return "mixed"
    return "raises" if score > 0 else "lowers"


# ----------------------------------------------------------------------------- units


class UnitVocabulary:
    """An ordered set of unit names with their column index; grows as new units appear."""

    def __init__(self, names: Sequence[str] = ()) -> None:
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        self.add(names)

    def __len__(self) -> int:
        return len(self.names)

    def add(self, names: Sequence[str]) -> np.ndarray:
        """Column indices of ``names``, appending the ones not seen yet."""
        out = np.empty(len(names), dtype=np.int64)
        for i, name in enumerate(names):
            j = self._index.get(name)
            if j is None:
                j = self._index[name] = len(self.names)
                self.names.append(name)
            out[i] = j
        return out

    def columns(self, names: Sequence[str] | None) -> np.ndarray | None:
        """None when ``names`` is this vocabulary in order (the dense fast path), else indices."""
        if names is None or names is self.names or list(names) == self.names:
            return None
        return self.add(names)


def _grow(arr: np.ndarray, size: int) -> np.ndarray:
    """``arr`` with its last axis zero-padded to ``size``."""
    if arr.shape[-1] >= size:
        return arr
    pad = [(0, 0)] * (arr.ndim - 1) + [(0, size - arr.shape[-1])]
    return np.pad(arr, pad)


def _add_columns(target: np.ndarray, cols: np.ndarray | None, values: np.ndarray) -> None:
    if cols is None:
        target += values
    else:
        target[..., cols] += values


@dataclass
class _Moments:
    """Column sums of |share|, share and share^2 over ``n`` samples."""

    n: int = 0
    abs_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    abs_sq: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def grow(self, size: int) -> None:
        self.abs_sum, self.sum, self.abs_sq = (_grow(a, size) for a in (self.abs_sum, self.sum, self.abs_sq))

    def add_sums(self, n: float, cols: np.ndarray | None, abs_sum: np.ndarray, total: np.ndarray,
                 abs_sq: np.ndarray) -> None:
        """Add precomputed column sums of |s|, s and s^2 over ``n`` rows."""
        self.n += int(n)
        _add_columns(self.abs_sum, cols, abs_sum)
        _add_columns(self.sum, cols, total)
        _add_columns(self.abs_sq, cols, abs_sq)

    def merge(self, o: "_Moments", cols: np.ndarray | None) -> None:
        self.add_sums(o.n, cols, o.abs_sum, o.sum, o.abs_sq)

    def stats(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = max(self.n, 1)
        mean_abs = self.abs_sum / n
        var = np.maximum(self.abs_sq / n - mean_abs**2, 0.0) * (n / max(n - 1, 1))
        return mean_abs, self.sum / n, np.sqrt(var)

    def dump(self, prefix: str, arrays: dict[str, np.ndarray]) -> None:
        arrays[f"{prefix}.n"] = np.array([self.n], dtype=np.int64)
        arrays[f"{prefix}.abs_sum"], arrays[f"{prefix}.sum"], arrays[f"{prefix}.abs_sq"] = (
            self.abs_sum, self.sum, self.abs_sq)

    @classmethod
    def load(cls, prefix: str, arrays: Mapping[str, np.ndarray]) -> "_Moments":
        return cls(int(arrays[f"{prefix}.n"][0]), arrays[f"{prefix}.abs_sum"].astype(np.float64),
                   arrays[f"{prefix}.sum"].astype(np.float64), arrays[f"{prefix}.abs_sq"].astype(np.float64))


def _class_key(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


class ImportanceAccumulator:
    """Global importance of one mode as a mergeable reduction over batches of local relevance:
    moments overall, per predicted class and per stability half, and the Poisson-bootstrap
    replicate sums of |share|."""

    def __init__(self, feature_names: Sequence[str] = (), n_bootstrap: int = 200) -> None:
        self.units = UnitVocabulary(feature_names)
        self.n_bootstrap = int(n_bootstrap)
        self.overall = _Moments()
        self.by_class: dict[Any, _Moments] = {}
        self.halves = (_Moments(), _Moments())
        self.boot_sum = np.zeros((self.n_bootstrap, 0))
        self.boot_weight = np.zeros(self.n_bootstrap)
        self._grow()

    @property
    def feature_names(self) -> list[str]:
        return self.units.names

    def _all_moments(self) -> list[_Moments]:
        return [self.overall, *self.halves, *self.by_class.values()]

    def _grow(self) -> None:
        size = len(self.units)
        for m in self._all_moments():
            m.grow(size)
        self.boot_sum = _grow(self.boot_sum, size)

    def update(self, relevance: np.ndarray | None, draws: Draws, predicted_class: np.ndarray | None = None, *,
               shares: np.ndarray | None = None, units: Sequence[str] | None = None) -> np.ndarray:
        """Add a batch of local relevance (N, U) (or its precomputed ``shares``) over the units
        ``units`` (default: this accumulator's units, in order); returns the shares."""
        s = l1_normalise(relevance) if shares is None else np.asarray(shares, dtype=np.float64)
        if units is None and s.shape[1] != len(self.units):
            raise ValueError(f"relevance has {s.shape[1]} features, expected {len(self.units)}")
        cols = self.units.columns(units)
        if cols is not None:
            self._grow()
        n = len(s)
        a = np.abs(s)
        # every group's column sums in one product: all rows, half 0, half 1, each class
        groups = [np.ones(n, dtype=bool), draws.half == 0, draws.half == 1]
        keys: list[Any] = []
        if predicted_class is not None:
            pc = np.asarray(predicted_class).reshape(n)
            for c in np.unique(pc):
                keys.append(_class_key(c))
                groups.append(pc == c)
        for k in keys:
            if k not in self.by_class:
                self.by_class[k] = _Moments()
                self.by_class[k].grow(len(self.units))
        g = np.stack(groups).astype(np.float64)
        abs_sums, sums, sq_sums = _matmul(g, a), _matmul(g, s), _matmul(g, a * a)
        counts = g.sum(1)
        targets = [self.overall, self.halves[0], self.halves[1]] + [self.by_class[k] for k in keys]
        for i, m in enumerate(targets):
            if counts[i] > 0:
                m.add_sums(counts[i], cols, abs_sums[i], sums[i], sq_sums[i])
        if draws.n_bootstrap < self.n_bootstrap:
            raise ValueError(f"draws carry {draws.n_bootstrap} bootstrap replicates, expected {self.n_bootstrap}")
        b = self.n_bootstrap
        _add_columns(self.boot_sum, cols, _matmul(draws.weights[:b], a))
        self.boot_weight += draws.weight_totals[:b]
        return s

    def merge(self, other: "ImportanceAccumulator") -> "ImportanceAccumulator":
        """Fold another partition's reduction into this one (same bootstrap size); units by name."""
        if other.n_bootstrap != self.n_bootstrap:
            raise ValueError(f"cannot merge {other.n_bootstrap} bootstrap replicates into {self.n_bootstrap}")
        cols = self.units.columns(other.units.names)
        if cols is not None:
            self._grow()
        self.overall.merge(other.overall, cols)
        for k, m in other.by_class.items():
            if k not in self.by_class:
                self.by_class[k] = _Moments()
                self.by_class[k].grow(len(self.units))
            self.by_class[k].merge(m, cols)
        self.halves[0].merge(other.halves[0], cols)
        self.halves[1].merge(other.halves[1], cols)
        _add_columns(self.boot_sum, cols, other.boot_sum)
        self.boot_weight += other.boot_weight
        return self

    @property
    def n_samples(self) -> int:
        return self.overall.n

    def table(self) -> pd.DataFrame:
        """The global importance table sorted by rank (columns ``TABLE_COLUMNS``)."""
        mean_abs, signed, std = self.overall.stats()
        if self.overall.n:
            reps = self.boot_sum / np.maximum(self.boot_weight, 1e-12)[:, None]
            lo, hi = np.percentile(reps, [2.5, 97.5], axis=0)
        else:
            lo = hi = mean_abs
        return self._frame(mean_abs, signed, std, lo, hi)

    def class_tables(self) -> dict[str, tuple[pd.DataFrame, int]]:
        """Per predicted class: the same table, with a normal-approximation 95% CI."""
        out = {}
        for key in sorted(self.by_class, key=lambda k: str(k)):
            m = self.by_class[key]
            mean_abs, signed, std = m.stats()
            half = 1.959964 * std / math.sqrt(max(m.n, 1))
            out[str(key)] = (self._frame(mean_abs, signed, std, mean_abs - half, mean_abs + half), m.n)
        return out

    def stability(self) -> dict[str, Any]:
        """Spearman correlation of the importance between the two random halves."""
        a, b = self.halves
        if a.n == 0 or b.n == 0:
            return {"spearman": float("nan"), "n_half_a": a.n, "n_half_b": b.n}
        return {"spearman": spearman(a.stats()[0], b.stats()[0]), "n_half_a": a.n, "n_half_b": b.n}

    def _frame(self, imp, signed, std, lo, hi) -> pd.DataFrame:
        names = self.units.names
        df = pd.DataFrame({
            "feature": names, "importance": imp, "signed": signed, "std": std,
            "ci_low": np.minimum(lo, imp), "ci_high": np.maximum(hi, imp),
            "rank": rank_of(imp, names),
        })
        return df.sort_values("rank", kind="stable").reset_index(drop=True)[TABLE_COLUMNS]

    # -- serialisation (plain arrays and JSON metadata, no pickle) ------------------------------
    def dump(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able metadata, named arrays) that :meth:`load` restores exactly."""
        arrays: dict[str, np.ndarray] = {"boot_sum": self.boot_sum, "boot_weight": self.boot_weight}
        self.overall.dump("overall", arrays)
        self.halves[0].dump("half0", arrays)
        self.halves[1].dump("half1", arrays)
        classes = list(self.by_class)
        for i, k in enumerate(classes):
            self.by_class[k].dump(f"class{i}", arrays)
        return {"units": list(self.units.names), "n_bootstrap": self.n_bootstrap, "classes": classes}, arrays

    @classmethod
    def load(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> "ImportanceAccumulator":
        acc = cls(meta["units"], n_bootstrap=meta["n_bootstrap"])
        acc.overall = _Moments.load("overall", arrays)
        acc.halves = (_Moments.load("half0", arrays), _Moments.load("half1", arrays))
        acc.by_class = {k: _Moments.load(f"class{i}", arrays) for i, k in enumerate(meta["classes"])}
        acc.boot_sum = arrays["boot_sum"].astype(np.float64)
        acc.boot_weight = arrays["boot_weight"].astype(np.float64)
        return acc


# ----------------------------------------------------------------------------- documents


@dataclass
class Directions:
    """Value-relevance correlations of one mode: per group ("all" or a predicted class) the
    correlation of each unit by name and the number of samples it was computed on."""

    rho: dict[str, dict[str, float | None]] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=dict)


def _direction_of(rec: dict[str, Any], rho: Mapping[str, float | None] | None) -> dict[str, Any]:
    r = None if rho is None else rho.get(rec["feature"])
    if r is not None and math.isfinite(r):
        return {"direction": direction_label(r), "value_relevance_correlation": float(r)}
    if rho is None:  # a unit without a single input value: the sign of its mean signed share
        ratio = rec["signed"] / rec["importance"] if rec["importance"] > 0 else None
        return {"direction": direction_label(ratio), "value_relevance_correlation": None}
    return {"direction": "mixed", "value_relevance_correlation": None}


def table_records(df: pd.DataFrame, rho: Mapping[str, float | None] | None = None,
                  with_direction: bool = False) -> list[dict[str, Any]]:
    """A table as JSON-ready records (plain floats and ints); with ``with_direction`` each also
    gets ``direction`` and ``value_relevance_correlation`` (from ``rho``, see the module doc)."""
    recs = []
    for row in df.itertuples(index=False):
        rec = {
            "feature": str(row.feature), "importance": float(row.importance), "signed": float(row.signed),
            "std": float(row.std), "ci_low": float(row.ci_low), "ci_high": float(row.ci_high),
            "rank": int(row.rank),
        }
        if with_direction:
            rec.update(_direction_of(rec, rho))
        recs.append(rec)
    return recs


def global_importance_document(
    accumulators: Mapping[str, ImportanceAccumulator], primary_mode: str, *,
    directions: Mapping[str, Directions | None] | None = None, modality: str | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """``global_importance.json`` and the long table for ``global_importance.parquet``
    (columns ``mode``, ``class`` ("all" or the predicted class), then ``TABLE_COLUMNS`` and, with
    ``directions``, ``DIRECTION_COLUMNS``).

    ``directions``: per mode the value-relevance correlations, or None for a mode whose units
    have no single input value (their direction comes from the signed share). Without
    ``directions`` no direction is added.
    """
    with_dir = directions is not None
    modes: dict[str, Any] = {}
    frames = []

    def records(table: pd.DataFrame, mode: str, group: str) -> list[dict[str, Any]]:
        d = (directions or {}).get(mode)  # None: the units have no single input value
        rho = None if d is None else d.rho.get(group, {})
        return table_records(table, rho, with_direction=with_dir)

    def frame(recs: list[dict[str, Any]], mode: str, group: str) -> pd.DataFrame:
        return pd.DataFrame(recs, columns=TABLE_COLUMNS + (DIRECTION_COLUMNS if with_dir else [])).assign(
            mode=mode, **{"class": group})

    for mode in [primary_mode] + sorted(m for m in accumulators if m != primary_mode):
        acc = accumulators[mode]
        recs = records(acc.table(), mode, "all")
        frames.append(frame(recs, mode, "all"))
        by_class = {}
        for key, (t, n) in acc.class_tables().items():
            class_recs = records(t, mode, key)
            by_class[key] = {"n_samples": int(n), "features": class_recs}
            frames.append(frame(class_recs, mode, key))
        modes[mode] = {"n_samples": acc.n_samples, "features": recs, "by_class": by_class}
        d = (directions or {}).get(mode)
        if d is not None:
            modes[mode]["direction_sample"] = int(d.n.get("all", 0))
            for key in by_class:
                by_class[key]["direction_sample"] = int(d.n.get(key, 0))
    doc = {
        "method": "dlbacktrace",
        "primary_mode": primary_mode,
        "n_samples": accumulators[primary_mode].n_samples,
        "normalisation": "l1 per sample",
        "ci": "95% Poisson bootstrap percentile (overall); normal approximation (by class)",
        "features": modes[primary_mode]["features"],
        "by_class": modes[primary_mode]["by_class"],
        "modes": modes,
    }
    if modality is not None:
        doc["modality"] = modality
    if with_dir:
        d = directions.get(primary_mode)
        doc["direction_sample"] = int(d.n.get("all", 0)) if d else 0
        doc["direction_method"] = (
            "Spearman rank correlation between a unit's input value and its signed relevance over "
            "the direction_sample samples with the smallest hash of (seed, sample id); raises / "
            f"lowers, mixed when |rho| < {MIXED_BELOW}")
    cols = ["mode", "class"] + TABLE_COLUMNS + (DIRECTION_COLUMNS if with_dir else [])
    long = pd.concat(frames, ignore_index=True)[cols]
    return doc, long


def stability_document(
    accumulators: Mapping[str, ImportanceAccumulator], primary_mode: str, seed: int
) -> dict[str, Any]:
    """``stability.json``: rank correlation between two random halves, per mode."""
    modes = {m: accumulators[m].stability() for m in sorted(accumulators)}
    return {
        "method": "spearman rank correlation of global importance between two random halves",
        "seed": int(seed),
        "primary_mode": primary_mode,
        "stability": modes[primary_mode]["spearman"],
        "modes": modes,
    }


# ----------------------------------------------------------------------------- layer ranking

#: Per-sample quantities summed per (module, map): see :class:`LayerBatch`.
LAYER_SUMS = ("share", "bias_share", "relevance_in", "branch_share", "branch_count")


@dataclass
class LayerBatch:
    """One batch's layer books in one mode, already summed over its samples.

    ``sums[(module, map)]`` holds, in the order of ``LAYER_SUMS``: the sum over samples of the
    module's |relevance| at its output over the |seed| (share), of the part its biases absorbed
    (bias share), of its signed relevance at the output, of its residual branch share (over the
    samples where it is defined) and that number of samples. ``unit_sum`` / ``unit_abs``: per
    module and output unit, the sum over samples of the unit's (absolute) relevance.
    """

    n: int
    types: dict[str, str] = field(default_factory=dict)
    sums: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    unit_sum: dict[str, np.ndarray] = field(default_factory=dict)
    unit_abs: dict[str, np.ndarray] = field(default_factory=dict)


class LayerAccumulator:
    """Layer ranking of one mode: per (module, map) sums over samples, per-unit relevance sums."""

    def __init__(self, top_units: int = 5) -> None:
        self.top_units = int(top_units)
        self.n = 0
        self.types: dict[str, str] = {}
        self.sums: dict[tuple[str, str], np.ndarray] = {}
        self.unit_sum: dict[str, np.ndarray] = {}
        self.unit_abs: dict[str, np.ndarray] = {}

    def update(self, batch: LayerBatch) -> None:
        """Add one batch's :class:`LayerBatch`."""
        self.n += batch.n
        for module, t in batch.types.items():
            self.types.setdefault(module, t)
        for key, v in batch.sums.items():
            if key in self.sums:
                self.sums[key] = self.sums[key] + v
            else:
                self.sums[key] = np.asarray(v, dtype=np.float64).copy()
        for module, s in batch.unit_sum.items():
            a = batch.unit_abs[module]
            if module in self.unit_sum and self.unit_sum[module].shape == s.shape:
                self.unit_sum[module] = self.unit_sum[module] + s
                self.unit_abs[module] = self.unit_abs[module] + a
            else:
                self.unit_sum[module], self.unit_abs[module] = s.copy(), a.copy()

    def merge(self, other: "LayerAccumulator") -> "LayerAccumulator":
        """Fold another partition's layer sums into this one."""
        self.update(LayerBatch(n=other.n, types=other.types, sums=other.sums, unit_sum=other.unit_sum,
                               unit_abs=other.unit_abs))
        return self

    def layers(self) -> list[dict[str, Any]]:
        """Per module: mean share, branch share, bias share, top units; sorted by rank."""
        out = []
        n = max(self.n, 1)
        for module in sorted(self.types):
            maps = {m: v for (mod, m), v in self.sums.items() if mod == module}
            entry: dict[str, Any] = {"module": module, "type": self.types[module]}
            shares = []
            for m, v in sorted(maps.items()):
                sh = float(v[0] / n)
                shares.append(sh)
                if len(maps) > 1:
                    entry[f"share_{m}"] = sh
            entry["share"] = float(np.mean(shares)) if shares else 0.0
            entry["bias_share"] = float(np.mean([v[1] / n for v in maps.values()])) if maps else 0.0
            entry["relevance"] = float(np.mean([v[2] / n for v in maps.values()])) if maps else 0.0
            bw = sum(float(v[4]) for v in maps.values())
            entry["branch_share"] = float(sum(float(v[3]) for v in maps.values()) / bw) if bw > 0 else None
            if module in self.unit_sum:
                mean_s = self.unit_sum[module] / n
                mean_a = self.unit_abs[module] / n
                top = np.argsort(-mean_a, kind="stable")[: self.top_units]
                entry["n_units"] = int(len(mean_a))
                entry["top_units"] = [
                    {"unit": int(i), "mean_relevance": float(mean_s[i]), "mean_abs_relevance": float(mean_a[i])}
                    for i in top
                ]
            out.append(entry)
        names = [e["module"] for e in out]
        ranks = rank_of(np.array([e["share"] for e in out]), names) if out else []
        for e, r in zip(out, ranks):
            e["rank"] = int(r)
        return sorted(out, key=lambda e: e["rank"])

    def dump(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able metadata, named arrays) that :meth:`load` restores exactly."""
        keys = sorted(self.sums)
        units = sorted(self.unit_sum)
        arrays = {f"sums{i}": self.sums[k] for i, k in enumerate(keys)}
        arrays.update({f"unit_sum{i}": self.unit_sum[m] for i, m in enumerate(units)})
        arrays.update({f"unit_abs{i}": self.unit_abs[m] for i, m in enumerate(units)})
        return {"n": self.n, "top_units": self.top_units, "types": self.types,
                "sums": [list(k) for k in keys], "units": units}, arrays

    @classmethod
    def load(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> "LayerAccumulator":
        acc = cls(top_units=meta["top_units"])
        acc.n = int(meta["n"])
        acc.types = dict(meta["types"])
        acc.sums = {(k[0], k[1]): arrays[f"sums{i}"].astype(np.float64) for i, k in enumerate(meta["sums"])}
        acc.unit_sum = {m: arrays[f"unit_sum{i}"].astype(np.float64) for i, m in enumerate(meta["units"])}
        acc.unit_abs = {m: arrays[f"unit_abs{i}"].astype(np.float64) for i, m in enumerate(meta["units"])}
        return acc


def layer_ranking_document(layers: Mapping[str, LayerAccumulator], primary_mode: str) -> dict[str, Any]:
    """``layer_ranking.json``: the primary mode's ranking in ``layers``, every mode in ``modes``."""
    modes = {m: {"layers": layers[m].layers()} for m in sorted(layers)}
    return {"primary_mode": primary_mode, "layers": modes[primary_mode]["layers"], "modes": modes}


# ----------------------------------------------------------------------------- reason codes


def decision_direction(task: str, output: np.ndarray, predicted_class: np.ndarray | None) -> np.ndarray:
    """+1 where positive relevance supports the decision, -1 where it pushes against it.

    Binary classification seeds the probability of the positive class, so for a sample
    predicted negative the features that lower that probability support the decision.
    Regression seeds the output itself and has no decision: positive relevance raises the
    predicted value, negative lowers it, whatever the output's sign (no threshold at 0).
    """
    n = len(output)
    if task == "binary-classification" and predicted_class is not None:
        return np.where(np.asarray(predicted_class).reshape(n) > 0, 1.0, -1.0)
    return np.ones(n)


def top_reasons(
    shares: np.ndarray | None,
    direction: np.ndarray | None,
    *,
    top_n: int = 4,
    supporting: np.ndarray | None = None,
    adverse: np.ndarray | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per side (``supporting``, ``adverse``) the feature indices (N, top_n; -1 = empty slot)
    and their share magnitudes (N, top_n; NaN where empty), largest first.

    ``shares`` are L1-normalised signed shares (N, F); a feature *supports* the decision when
    ``direction * share > 0`` and is *adverse* (pushed against it) when it is < 0. In contrastive
    mode pass ``supporting`` and ``adverse`` (the normalised R+ and R- maps, already oriented to
    the decision) instead.
    """
    if supporting is None or adverse is None:
        # one oriented copy: the largest values support, the smallest (negative) are adverse
        oriented = np.asarray(shares, dtype=np.float64) * np.asarray(direction, dtype=np.float64).reshape(-1, 1)
        adverse_work = -oriented
        return {"supporting": _top_k(oriented, top_n), "adverse": _top_k(adverse_work, top_n)}
    return {"supporting": _top_k(np.array(supporting, dtype=np.float64), top_n),
            "adverse": _top_k(np.array(adverse, dtype=np.float64), top_n)}


def _top_k(work: np.ndarray, top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row the ``top_n`` columns with the largest values among those > 0, largest first,
    ties by column index (the first maximum); -1 / NaN for empty slots. ``top_n`` passes of
    argmax, each masking its pick in ``work`` (a copy the caller hands over): for a handful of
    reasons several times faster than a per-row partition and sort."""
    n, f = work.shape
    idx = np.full((n, top_n), -1, dtype=np.int64)
    mag = np.full((n, top_n), np.nan)
    if n == 0 or f == 0:
        return idx, mag
    rows = np.arange(n)
    for j in range(min(top_n, f)):
        col = work.argmax(axis=1)
        top = work[rows, col]
        ok = top > 0
        if not ok.any():
            break
        idx[:, j] = np.where(ok, col, -1)
        mag[:, j] = np.where(ok, top, np.nan)
        work[rows, col] = -np.inf
    return idx, mag


def reason_codes(
    shares: np.ndarray,
    direction: np.ndarray,
    feature_names: list[str],
    *,
    top_n: int = 4,
    dictionary: Mapping[str, str] | None = None,
    supporting: np.ndarray | None = None,
    adverse: np.ndarray | None = None,
) -> pd.DataFrame:
    """Per sample the top ``top_n`` supporting and adverse features (see :func:`top_reasons`).

    Columns: ``supporting_k``, ``supporting_k_share``, ``supporting_k_text`` and the same for
    ``adverse_k``, k = 1..top_n; a share is the magnitude (>= 0) and a slot is empty (None /
    NaN) when fewer features point that way.
    """
    dictionary = dict(dictionary or {})
    names = np.asarray(list(feature_names) + [None], dtype=object)
    texts = np.asarray([dictionary.get(f, f) for f in feature_names] + [None], dtype=object)
    cols: dict[str, Any] = {}
    for label, (idx, mag) in top_reasons(shares, direction, top_n=top_n,
                                         supporting=supporting, adverse=adverse).items():
        for j in range(top_n):
            cols[f"{label}_{j + 1}"] = names[idx[:, j]]
            cols[f"{label}_{j + 1}_share"] = mag[:, j]
            cols[f"{label}_{j + 1}_text"] = texts[idx[:, j]]
    return pd.DataFrame(cols)


def contrastive_maps(
    positive: np.ndarray, negative: np.ndarray, direction: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """R+ and R- normalised by the L1 norm of both maps and oriented to the decision:
    returns (supporting, adverse) magnitudes (N, F)."""
    p = np.asarray(positive, dtype=np.float64)
    q = np.asarray(negative, dtype=np.float64)
    norm = np.abs(p).sum(1, keepdims=True) + np.abs(q).sum(1, keepdims=True)
    p = np.divide(p, norm, out=np.zeros_like(p), where=norm > 0)
    q = np.divide(q, norm, out=np.zeros_like(q), where=norm > 0)
    flip = np.asarray(direction).reshape(-1, 1) < 0
    sup, adv = np.where(flip, q, p), np.where(flip, p, q)
    return np.maximum(sup, 0.0), np.maximum(adv, 0.0)
