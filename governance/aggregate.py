"""Local relevance -> global importance, layer ranking, reason codes and stability.

Everything here is a mergeable reduction over batches (sums, counts, sums of squares, bootstrap
sums), so memory does not grow with the number of rows and the same code can run per partition
(e.g. Spark ``mapInArrow``) and be merged with :meth:`ImportanceAccumulator.merge`.

Conventions:

* a sample's *share* of feature i is ``R_i / sum_j |R_j|`` (L1-normalised; all-zero rows give 0);
* ``importance`` is the mean of ``|share|``, ``signed`` the mean of ``share``, ``std`` the
  standard deviation of ``|share|``; ``ci_low``/``ci_high`` a 95% Poisson-bootstrap percentile
  interval of the importance; ``rank`` 1 is the most important (ties broken by name);
* the bootstrap weights and the random halves for stability are drawn once per batch from a
  seed and the batch's first row index, so results are deterministic for a given batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pandas as pd

TABLE_COLUMNS = ["feature", "importance", "signed", "std", "ci_low", "ci_high", "rank"]


def _poisson_lut(size: int = 65536) -> np.ndarray:
    cdf = np.cumsum([math.exp(-1.0) / math.factorial(k) for k in range(16)]) * size
    return np.searchsorted(cdf, np.arange(size) + 0.5, side="right").astype(np.float32)


_POISSON_LUT = _poisson_lut()


def l1_normalise(relevance: np.ndarray) -> np.ndarray:
    """Each row divided by its L1 norm (sum of |R| = 1); all-zero rows stay zero. (N, F) float64."""
    r = np.asarray(relevance, dtype=np.float64).reshape(len(relevance), -1)
    norm = np.abs(r).sum(axis=1, keepdims=True)
    return np.divide(r, norm, out=np.zeros_like(r), where=norm > 0)


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` on torch's thread pool when torch is loaded: numpy's BLAS threads and torch's
    OpenMP threads competing for the same cores made these small products 10x slower."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return a @ b
    return torch.matmul(torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(np.ascontiguousarray(b))).numpy()


@dataclass
class BatchDraws:
    """Random draws of one batch shared by every mode: Poisson(1) bootstrap weights (B, n) and
    the half (0/1) each row falls in for the stability estimate."""

    weights: np.ndarray
    half: np.ndarray

    @classmethod
    def make(cls, seed: int, start: int, n: int, n_bootstrap: int) -> "BatchDraws":
        """Deterministic draws for rows ``start .. start+n`` under ``seed``."""
        rng = np.random.default_rng([int(seed), int(start)])
        u = rng.integers(0, 65536, size=(n_bootstrap, n), dtype=np.uint16)
        half = rng.integers(0, 2, size=n, dtype=np.int8)
        return cls(weights=_POISSON_LUT[u], half=half)


def rank_of(values: np.ndarray, names: list[str]) -> np.ndarray:
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


@dataclass
class _Moments:
    n: int = 0
    abs_sum: np.ndarray | None = None
    sum: np.ndarray | None = None
    abs_sq: np.ndarray | None = None

    def add(self, s: np.ndarray) -> None:
        a = np.abs(s)
        self.add_sums(len(s), a.sum(0), s.sum(0), (a * a).sum(0))

    def add_sums(self, n: int, abs_sum: np.ndarray, total: np.ndarray, abs_sq: np.ndarray) -> None:
        """Add precomputed column sums of |s|, s and s^2 over ``n`` rows."""
        if self.abs_sum is None:
            f = len(abs_sum)
            self.abs_sum, self.sum, self.abs_sq = np.zeros(f), np.zeros(f), np.zeros(f)
        self.n += int(n)
        self.abs_sum += abs_sum
        self.sum += total
        self.abs_sq += abs_sq

    def merge(self, o: "_Moments") -> None:
        if o.abs_sum is None:
            return
        if self.abs_sum is None:
            self.n, self.abs_sum, self.sum, self.abs_sq = o.n, o.abs_sum.copy(), o.sum.copy(), o.abs_sq.copy()
            return
        self.n += o.n
        self.abs_sum += o.abs_sum
        self.sum += o.sum
        self.abs_sq += o.abs_sq

    def stats(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = max(self.n, 1)
        mean_abs = self.abs_sum / n
        var = np.maximum(self.abs_sq / n - mean_abs**2, 0.0) * (n / max(n - 1, 1))
        return mean_abs, self.sum / n, np.sqrt(var)


@dataclass
class ImportanceAccumulator:
    """Global importance of one mode as a mergeable reduction over batches of local relevance."""

    feature_names: list[str]
    n_bootstrap: int = 200
    overall: _Moments = field(default_factory=_Moments)
    by_class: dict[Any, _Moments] = field(default_factory=dict)
    halves: tuple[_Moments, _Moments] = field(default_factory=lambda: (_Moments(), _Moments()))
    boot_sum: np.ndarray | None = None
    boot_weight: np.ndarray | None = None

    def update(
        self, relevance: np.ndarray, draws: BatchDraws, predicted_class: np.ndarray | None = None
    ) -> np.ndarray:
        """Add a batch of local relevance (N, F); returns its L1-normalised shares."""
        s = l1_normalise(relevance)
        if s.shape[1] != len(self.feature_names):
            raise ValueError(
                f"relevance has {s.shape[1]} features, expected {len(self.feature_names)}"
            )
        n, f = s.shape
        a = np.abs(s)
        # every group's column sums in one matmul: groups = all rows, half 0, half 1, each class
        groups = [np.ones(n, dtype=bool), draws.half == 0, draws.half == 1]
        keys: list[Any] = []
        if predicted_class is not None:
            pc = np.asarray(predicted_class).reshape(n)
            for c in np.unique(pc):
                keys.append(c.item() if hasattr(c, "item") else c)
                groups.append(pc == c)
        g = np.stack(groups).astype(np.float64)
        sums = _matmul(g, np.concatenate([a, s, a * a], axis=1))
        counts = g.sum(1)
        targets = [self.overall, self.halves[0], self.halves[1]] + [
            self.by_class.setdefault(k, _Moments()) for k in keys]
        for i, m in enumerate(targets):
            if counts[i] > 0:
                m.add_sums(counts[i], sums[i, :f], sums[i, f:2 * f], sums[i, 2 * f:])
        w = draws.weights[: self.n_bootstrap]
        if self.boot_sum is None:
            self.boot_sum = np.zeros((self.n_bootstrap, f))
            self.boot_weight = np.zeros(self.n_bootstrap)
        self.boot_sum += _matmul(w, a.astype(np.float32)).astype(np.float64)
        self.boot_weight += w.sum(1, dtype=np.float64)
        return s

    def merge(self, other: "ImportanceAccumulator") -> "ImportanceAccumulator":
        """Fold another partition's reduction into this one (same features and bootstrap size)."""
        self.overall.merge(other.overall)
        for k, m in other.by_class.items():
            self.by_class.setdefault(k, _Moments()).merge(m)
        self.halves[0].merge(other.halves[0])
        self.halves[1].merge(other.halves[1])
        if other.boot_sum is not None:
            if self.boot_sum is None:
                self.boot_sum, self.boot_weight = other.boot_sum.copy(), other.boot_weight.copy()
            else:
                self.boot_sum += other.boot_sum
                self.boot_weight += other.boot_weight
        return self

    @property
    def n_samples(self) -> int:
        return self.overall.n

    def table(self) -> pd.DataFrame:
        """The global importance table sorted by rank (columns ``TABLE_COLUMNS``)."""
        mean_abs, signed, std = self.overall.stats()
        if self.boot_sum is not None:
            reps = self.boot_sum / np.maximum(self.boot_weight, 1e-12)[:, None]
            lo, hi = np.percentile(reps, [2.5, 97.5], axis=0)
        else:
            lo = hi = mean_abs
        return self._frame(mean_abs, signed, std, lo, hi)

    def class_tables(self) -> dict[str, pd.DataFrame]:
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
        df = pd.DataFrame({
            "feature": self.feature_names, "importance": imp, "signed": signed, "std": std,
            "ci_low": np.minimum(lo, imp), "ci_high": np.maximum(hi, imp),
            "rank": rank_of(imp, self.feature_names),
        })
        return df.sort_values("rank", kind="stable").reset_index(drop=True)[TABLE_COLUMNS]


def table_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """A table as JSON-ready records (plain floats and ints)."""
    recs = []
    for row in df.itertuples(index=False):
        recs.append({
            "feature": str(row.feature), "importance": float(row.importance), "signed": float(row.signed),
            "std": float(row.std), "ci_low": float(row.ci_low), "ci_high": float(row.ci_high),
            "rank": int(row.rank),
        })
    return recs


def global_importance_document(
    accumulators: Mapping[str, ImportanceAccumulator], primary_mode: str
) -> tuple[dict[str, Any], pd.DataFrame]:
    """``global_importance.json`` and the long table for ``global_importance.parquet``
    (columns ``mode``, ``class`` ("all" or the predicted class), then ``TABLE_COLUMNS``)."""
    modes: dict[str, Any] = {}
    frames = []
    for mode in [primary_mode] + sorted(m for m in accumulators if m != primary_mode):
        acc = accumulators[mode]
        table = acc.table()
        by_class = {}
        frames.append(table.assign(mode=mode, **{"class": "all"}))
        for key, (t, n) in acc.class_tables().items():
            by_class[key] = {"n_samples": int(n), "features": table_records(t)}
            frames.append(t.assign(mode=mode, **{"class": key}))
        modes[mode] = {"n_samples": acc.n_samples, "features": table_records(table), "by_class": by_class}
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
    long = pd.concat(frames, ignore_index=True)[["mode", "class"] + TABLE_COLUMNS]
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


def _unit_axis(ndim: int, module_type: str) -> int:
    if ndim <= 2:
        return 1
    return 1 if "conv" in module_type.lower() else ndim - 1


@dataclass
class LayerAccumulator:
    """Layer ranking of one mode: batch-weighted means of the layer summary, per-unit relevance."""

    top_units: int = 5
    n: int = 0
    rows: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    unit_sum: dict[str, np.ndarray] = field(default_factory=dict)
    unit_abs: dict[str, np.ndarray] = field(default_factory=dict)

    def update(self, summary: pd.DataFrame, n: int, layer_relevance: Mapping[str, Any] | None = None) -> None:
        """Add one batch: its ``layer_summary()`` (batch means) and ``layer_relevance``."""
        self.n += n
        for rec in summary.to_dict("records"):
            module = str(rec["module"])
            if not module:  # the root module: its output is the seed itself
                continue
            if module not in self.types:
                self.types[module] = str(rec.get("type", ""))
                self.order.append(module)
            key = (module, str(rec.get("map", "relevance")))
            acc = self.rows.setdefault(key, {"w": 0.0, "branch_w": 0.0})
            acc["w"] += n
            for col in ("share", "bias_share", "relevance_in", "relevance_out", "dropped", "saturation_rerouted"):
                v = rec.get(col)
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    acc[col] = acc.get(col, 0.0) + float(v) * n
            b = rec.get("branch_share")
            if b is not None and not (isinstance(b, float) and math.isnan(b)):
                acc["branch_share"] = acc.get("branch_share", 0.0) + float(b) * n
                acc["branch_w"] += n
        for module, rel in (layer_relevance or {}).items():
            if not module:
                continue
            t = rel.detach() if hasattr(rel, "detach") else rel
            arr = np.asarray(t.float().cpu() if hasattr(t, "float") else t, dtype=np.float64)
            if arr.ndim < 2:
                continue
            ax = _unit_axis(arr.ndim, self.types.get(module, ""))
            moved = np.moveaxis(arr, ax, -1).reshape(-1, arr.shape[ax])
            per_sample = moved.reshape(arr.shape[0], -1, arr.shape[ax]).sum(1)
            s, a = per_sample.sum(0), np.abs(per_sample).sum(0)
            if module in self.unit_sum and self.unit_sum[module].shape == s.shape:
                self.unit_sum[module] += s
                self.unit_abs[module] += a
            else:
                self.unit_sum[module], self.unit_abs[module] = s, a

    def layers(self) -> list[dict[str, Any]]:
        """Per module: mean share, branch share, bias share, top units; sorted by rank."""
        out = []
        for module in self.order:
            maps = {m: r for (mod, m), r in self.rows.items() if mod == module}
            entry: dict[str, Any] = {"module": module, "type": self.types[module]}
            shares = []
            for m, r in sorted(maps.items()):
                w = max(r["w"], 1.0)
                sh = r.get("share", 0.0) / w
                shares.append(sh)
                if len(maps) > 1:
                    entry[f"share_{m}"] = sh
            entry["share"] = float(np.mean(shares)) if shares else 0.0
            entry["bias_share"] = float(np.mean([r.get("bias_share", 0.0) / max(r["w"], 1) for r in maps.values()]))
            entry["relevance"] = float(np.mean([r.get("relevance_in", 0.0) / max(r["w"], 1) for r in maps.values()]))
            bw = sum(r["branch_w"] for r in maps.values())
            entry["branch_share"] = (
                float(sum(r.get("branch_share", 0.0) for r in maps.values()) / bw) if bw > 0 else None
            )
            if module in self.unit_sum:
                mean_s = self.unit_sum[module] / max(self.n, 1)
                mean_a = self.unit_abs[module] / max(self.n, 1)
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


def layer_ranking_document(layers: Mapping[str, LayerAccumulator], primary_mode: str) -> dict[str, Any]:
    """``layer_ranking.json``: the primary mode's ranking in ``layers``, every mode in ``modes``."""
    modes = {m: {"layers": layers[m].layers()} for m in sorted(layers)}
    return {"primary_mode": primary_mode, "layers": modes[primary_mode]["layers"], "modes": modes}


# ----------------------------------------------------------------------------- reason codes


def decision_direction(task: str, output: np.ndarray, predicted_class: np.ndarray | None) -> np.ndarray:
    """+1 where positive relevance supports the decision, -1 where it pushes against it.

    Binary classification seeds the probability of the positive class, so for a sample
    predicted negative the features that lower that probability support the decision.
    Regression seeds the output itself, so the sign of the output decides.
    """
    n = len(output)
    if task == "binary-classification" and predicted_class is not None:
        return np.where(np.asarray(predicted_class).reshape(n) > 0, 1.0, -1.0)
    if task == "regression":
        y = np.asarray(output, dtype=np.float64).reshape(n, -1).sum(1)
        return np.where(y >= 0, 1.0, -1.0)
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
        oriented = np.asarray(shares, dtype=np.float64) * np.asarray(direction).reshape(-1, 1)
        supporting, adverse = np.maximum(oriented, 0.0), np.maximum(-oriented, 0.0)
    out = {}
    for label, vals in (("supporting", supporting), ("adverse", adverse)):
        vals = np.asarray(vals, dtype=np.float64)
        n, f = vals.shape
        k = min(top_n, f)
        if k < f:  # the k largest per row (argpartition), then ordered among themselves
            part = np.argpartition(-vals, k - 1, axis=1)[:, :k]
            part_vals = np.take_along_axis(vals, part, axis=1)
            order = np.take_along_axis(part, np.lexsort((part, -part_vals), axis=1), axis=1)
        else:
            order = np.argsort(-vals, axis=1, kind="stable")
        top = np.take_along_axis(vals, order, axis=1)
        ok = top > 0
        idx = np.full((n, top_n), -1, dtype=np.int64)
        mag = np.full((n, top_n), np.nan)
        idx[:, :k] = np.where(ok, order, -1)
        mag[:, :k] = np.where(ok, top, np.nan)
        out[label] = (idx, mag)
    return out


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
