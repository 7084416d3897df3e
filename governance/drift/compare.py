"""Explanation drift between two explanations (:class:`~governance.drift.summary.Side`): pure
computation, no I/O.

Per unit: importance before and after, the difference with a bootstrap interval, ranks,
directions and three flags:

* ``significant``: the interval excludes 0 and |difference| > ``drift.min_difference``;
* ``rank_shift``: the unit enters or leaves the top ``drift.top_k``;
* ``direction_flip``: the direction went from ``raises`` to ``lowers`` or back (``mixed`` on
  either side is no flip).

The interval is *paired* when both sides explain the same rows (same sample ids, same seed):
replicate b of the difference is then the weighted mean of the per-sample differences
|share_after| - |share_before| with replicate b's weight per sample, which is exactly
``replicate_after[b] - replicate_before[b]`` because both sides weight each sample the same. The
per-sample noise common to both sides cancels, so the interval is much narrower. Otherwise the
sides are independent samples and replicate b of the difference pairs replicate b of the after
side with replicate b+1 of the before side (independent weights even where the two data sets
reuse the same row positions as ids).

Overall: Spearman correlation of the importance vectors, Jensen-Shannon divergence (base 2, 0..1)
of the importance vectors normalised to sum 1, top-k overlap, layer-share shifts, changes of the
reason-code leaders and (paired only) the share of samples whose top supporting reason changed.
The verdict is ``changed`` when any threshold of :class:`~governance.config.DriftConfig` is
crossed; ``reasons`` says which.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from governance.aggregate import rank_of, spearman
from governance.config import DriftConfig
from governance.drift.summary import Side

FORMAT = "governance-drift"
VERSION = 1
FLIPS = {("raises", "lowers"), ("lowers", "raises")}


@dataclass
class UnitDrift:
    """One unit (feature, region, word) before and after."""

    unit: str
    importance_before: float
    importance_after: float
    difference: float
    ci_low: float
    ci_high: float
    rank_before: int | None
    rank_after: int | None
    direction_before: str | None
    direction_after: str | None
    significant: bool
    rank_shift: bool
    direction_flip: bool


@dataclass
class LayerShift:
    """A layer's share of the relevance before and after (None: the layer is absent on that side)."""

    module: str
    share_before: float | None
    share_after: float | None
    shift: float | None


@dataclass
class LeaderChange:
    """The unit that most often leads one side of the reason codes, before and after."""

    side: str
    before: str | None
    after: str | None
    share_before: float | None
    share_after: float | None
    changed: bool


@dataclass
class DriftSummary:
    """The comparison as a whole."""

    spearman: float | None
    js_divergence: float
    top_k: int
    top_k_before: list[str]
    top_k_after: list[str]
    top_k_overlap: float
    n_significant: int
    n_significant_top: int
    significant_rate: float
    n_rank_shifts: int
    n_direction_flips_top: int
    mean_interval_width: float
    mean_interval_width_top: float
    max_layer_shift: float | None
    layer_shifts: list[LayerShift]
    leaders: list[LeaderChange]
    top_reason_changed: float | None
    n_top_reason_samples: int


@dataclass
class DriftResult:
    """Everything ``drift.json`` holds (see :meth:`to_dict`)."""

    kind: str
    paired: bool
    pairing: str
    baseline: dict[str, Any]
    current: dict[str, Any]
    confidence: float
    n_bootstrap: int
    thresholds: dict[str, Any]
    units: list[UnitDrift]
    overall: DriftSummary
    verdict: str
    reasons: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.verdict == "changed"

    def to_dict(self) -> dict[str, Any]:
        """The ``drift.json`` document."""
        d = asdict(self)
        return {"format": FORMAT, "version": VERSION, **d}

    def metrics(self) -> dict[str, float]:
        """The MLflow metrics of the comparison (``governance_drift_*``)."""
        o = self.overall
        out = {
            "governance_drift_changed": 1.0 if self.changed else 0.0,
            "governance_drift_js_divergence": o.js_divergence,
            "governance_drift_top_k_overlap": o.top_k_overlap,
            "governance_drift_n_significant": float(o.n_significant),
            "governance_drift_significant_rate": o.significant_rate,
            "governance_drift_n_rank_shifts": float(o.n_rank_shifts),
            "governance_drift_n_direction_flips_top": float(o.n_direction_flips_top),
            "governance_drift_mean_interval_width": o.mean_interval_width,
        }
        if o.spearman is not None:
            out["governance_drift_spearman"] = o.spearman
        if o.max_layer_shift is not None:
            out["governance_drift_max_layer_shift"] = o.max_layer_shift
        if o.top_reason_changed is not None:
            out["governance_drift_top_reason_changed"] = o.top_reason_changed
        return out


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) of two non-negative vectors, each normalised
    to sum 1 (an all-zero vector is taken as uniform)."""
    def norm(v: np.ndarray) -> np.ndarray:
        v = np.maximum(np.asarray(v, dtype=np.float64), 0.0)
        s = v.sum()
        return v / s if s > 0 else np.full(len(v), 1.0 / max(len(v), 1))

    p, q = norm(p), norm(q)
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        ok = a > 0
        return float((a[ok] * np.log2(a[ok] / m[ok])).sum())

    return max(0.0, min(1.0, 0.5 * kl(p) + 0.5 * kl(q)))


def _aligned(side: Side, units: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(importance, replicates, present) over ``units`` (0 where the side lacks a unit)."""
    index = {u: i for i, u in enumerate(side.units)}
    cols = np.array([index.get(u, -1) for u in units], dtype=np.int64)
    present = cols >= 0
    imp = np.zeros(len(units))
    reps = np.zeros((side.replicates.shape[0], len(units)))
    imp[present] = side.importance[cols[present]]
    reps[:, present] = side.replicates[:, cols[present]]
    return imp, reps, present


def same_rows(before: Side, after: Side) -> bool:
    """Whether the two sides explain the same sample ids with the same bootstrap weights (the
    replicate weight totals are a fingerprint of the id set under one seed)."""
    return (before.n_samples == after.n_samples and before.weight_totals.shape == after.weight_totals.shape
            and bool(np.array_equal(before.weight_totals, after.weight_totals)))


def _top_reason_changed(before: Side, after: Side) -> tuple[float | None, int]:
    """Share of the samples on both sides (matched by id) whose top supporting reason changed."""
    if before.reason_keys is None or after.reason_keys is None:
        return None, 0
    common, ib, ia = np.intersect1d(before.reason_keys, after.reason_keys, assume_unique=False, return_indices=True)
    if not len(common):
        return None, 0
    names_b = np.array(before.units + [""], dtype=object)[before.top_reason[ib]]
    names_a = np.array(after.units + [""], dtype=object)[after.top_reason[ia]]
    return float(np.mean(names_b != names_a)), int(len(common))


def _leaders(before: Side, after: Side) -> list[LeaderChange]:
    out = []
    for side in ("supporting", "adverse"):
        b, a = before.leaders.get(side) or {}, after.leaders.get(side) or {}
        lb = next(iter(b), None)
        la = next(iter(a), None)
        nb, na = sum(b.values()), sum(a.values())
        out.append(LeaderChange(side=side, before=lb, after=la,
                                share_before=(b[lb] / nb) if lb is not None and nb else None,
                                share_after=(a[la] / na) if la is not None and na else None,
                                changed=lb != la))
    return out


def _layers(before: Side, after: Side) -> tuple[list[LayerShift], float | None]:
    modules = list(before.layer_shares) + [m for m in after.layer_shares if m not in before.layer_shares]
    shifts = []
    for m in modules:
        b, a = before.layer_shares.get(m), after.layer_shares.get(m)
        shifts.append(LayerShift(m, b, a, None if b is None or a is None else a - b))
    common = [abs(s.shift) for s in shifts if s.shift is not None]
    shifts.sort(key=lambda s: (-(abs(s.shift) if s.shift is not None else math.inf), s.module))
    return shifts, (max(common) if common else None)


def compare(before: Side, after: Side, cfg: DriftConfig, *, paired: bool, kind: str,
            pairing: str = "") -> DriftResult:
    """Compare two explanations (see the module docstring). ``paired``: the caller asserts the
    two sides explain the same rows (checked: a :class:`ValueError` when they do not)."""
    if paired and not same_rows(before, after):
        raise ValueError("a paired comparison needs both explanations over the same sample ids and seed "
                         f"({before.n_samples} vs {after.n_samples} samples, or different ids)")
    if before.replicates.shape[0] != after.replicates.shape[0]:
        raise ValueError(f"the two sides have {before.replicates.shape[0]} and {after.replicates.shape[0]} "
                         "bootstrap replicates")
    units = list(before.units) + [u for u in after.units if u not in set(before.units)]
    imp_b, rep_b, has_b = _aligned(before, units)
    imp_a, rep_a, has_a = _aligned(after, units)
    diff = imp_a - imp_b
    reps = rep_a - (rep_b if paired else np.roll(rep_b, -1, axis=0))
    alpha = (1.0 - cfg.confidence) / 2.0
    lo, hi = np.quantile(reps, [alpha, 1.0 - alpha], axis=0)
    lo, hi = np.minimum(lo, diff), np.maximum(hi, diff)
    rank_b, rank_a = rank_of(imp_b, units), rank_of(imp_a, units)
    k = min(cfg.top_k, len(units))
    top_b = [u for u, r, h in zip(units, rank_b, has_b) if r <= k and h]
    top_a = [u for u, r, h in zip(units, rank_a, has_a) if r <= k and h]
    rows: list[UnitDrift] = []
    for i, u in enumerate(units):
        db, da = before.directions.get(u), after.directions.get(u)
        significant = bool((lo[i] > 0 or hi[i] < 0) and abs(diff[i]) > cfg.min_difference)
        rows.append(UnitDrift(
            unit=u, importance_before=float(imp_b[i]), importance_after=float(imp_a[i]), difference=float(diff[i]),
            ci_low=float(lo[i]), ci_high=float(hi[i]),
            rank_before=int(rank_b[i]) if has_b[i] else None, rank_after=int(rank_a[i]) if has_a[i] else None,
            direction_before=db, direction_after=da, significant=significant,
            rank_shift=(u in top_b) != (u in top_a), direction_flip=(db, da) in FLIPS))
    rows.sort(key=lambda r: (-abs(r.difference), r.unit))
    top_units = set(top_b) | set(top_a)
    width = hi - lo
    top_idx = [i for i, u in enumerate(units) if u in top_units]
    n_sig_top = sum(1 for r in rows if r.significant and r.unit in top_units)
    flips_top = sum(1 for r in rows if r.direction_flip and r.unit in top_units)
    rho = spearman(imp_b, imp_a) if len(units) > 1 else float("nan")
    layer_shifts, max_layer = _layers(before, after)
    changed_share, n_reason = _top_reason_changed(before, after) if paired else (None, 0)
    overall = DriftSummary(
        spearman=float(rho) if math.isfinite(rho) else None, js_divergence=js_divergence(imp_b, imp_a), top_k=k,
        top_k_before=top_b, top_k_after=top_a, top_k_overlap=len(set(top_b) & set(top_a)) / max(k, 1),
        n_significant=sum(r.significant for r in rows), n_significant_top=n_sig_top,
        significant_rate=n_sig_top / max(k, 1), n_rank_shifts=sum(r.rank_shift for r in rows),
        n_direction_flips_top=flips_top, mean_interval_width=float(width.mean()) if len(width) else 0.0,
        mean_interval_width_top=float(width[top_idx].mean()) if top_idx else 0.0,
        max_layer_shift=max_layer, layer_shifts=layer_shifts, leaders=_leaders(before, after),
        top_reason_changed=changed_share, n_top_reason_samples=n_reason)
    reasons = _verdict_reasons(overall, cfg)
    return DriftResult(
        kind=kind, paired=paired, pairing=pairing, baseline={"label": before.label, "n_samples": before.n_samples,
                                                            **before.source},
        current={"label": after.label, "n_samples": after.n_samples, **after.source}, confidence=cfg.confidence,
        n_bootstrap=int(reps.shape[0]), thresholds=asdict(cfg), units=rows, overall=overall,
        verdict="changed" if reasons else "stable", reasons=reasons)


def _verdict_reasons(o: DriftSummary, cfg: DriftConfig) -> list[str]:
    """Every threshold the comparison crosses, in words (empty: stable)."""
    reasons = []
    if o.significant_rate > cfg.max_significant_rate:
        reasons.append(f"{o.n_significant_top} of the top {o.top_k} units changed significantly "
                       f"(rate {o.significant_rate:.2f} > {cfg.max_significant_rate:.2f})")
    if o.js_divergence > cfg.max_js_divergence:
        reasons.append(f"Jensen-Shannon divergence {o.js_divergence:.4f} > {cfg.max_js_divergence:.4f}")
    if o.top_k_overlap < cfg.min_top_k_overlap:
        reasons.append(f"top-{o.top_k} overlap {o.top_k_overlap:.2f} < {cfg.min_top_k_overlap:.2f}")
    if o.n_direction_flips_top > cfg.max_direction_flips:
        reasons.append(f"{o.n_direction_flips_top} direction flip(s) among the top {o.top_k} units "
                       f"(> {cfg.max_direction_flips})")
    return reasons
