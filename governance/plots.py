"""Static plots of the explanation (matplotlib Agg, deterministic bytes: no timestamps).

Each function draws from plain tables and writes one PNG; nothing here computes statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

_SAVE = {"dpi": 110, "metadata": {"Software": None}}


def _save(fig: Any, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format="png", bbox_inches="tight", pad_inches=0.05, **_SAVE)
    plt.close(fig)
    return p


#: Bar colour by direction of effect (``direction`` of global_importance.json's features).
DIRECTION_COLOURS = {"raises": "#b2182b", "lowers": "#2166ac", "mixed": "#8c8c8c"}
DIRECTION_LABELS = {"raises": "higher values raise the output", "lowers": "higher values lower the output",
                    "mixed": "mixed (|rho| < 0.1)"}
NEUTRAL = "#4d6f91"


def importance_figure(table: pd.DataFrame, *, title: str, top_k: int = 20) -> Any:
    """The figure of :func:`importance_bar` (not saved)."""
    from matplotlib.patches import Patch

    t = table.sort_values("rank").head(top_k).iloc[::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(t) + 1.6), layout="constrained")
    err = np.vstack([t["importance"] - t["ci_low"], t["ci_high"] - t["importance"]]).clip(min=0)
    has_direction = "direction" in t.columns
    colors = ([DIRECTION_COLOURS.get(str(d), NEUTRAL) for d in t["direction"]] if has_direction
              else [NEUTRAL] * len(t))
    ax.barh(t["feature"].astype(str), t["importance"], xerr=err, color=colors, ecolor="#333333", capsize=2)
    ax.set_xlabel("mean |share of relevance| (95% bootstrap CI)")
    if has_direction:
        ax.legend(handles=[Patch(color=c, label=DIRECTION_LABELS[d]) for d, c in DIRECTION_COLOURS.items()],
                  fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


def importance_bar(table: pd.DataFrame, path: str | Path, *, title: str, top_k: int = 20) -> Path:
    """Horizontal bars of the top ``top_k`` features' importance with their 95% CIs, coloured by
    the direction of effect when the table has a ``direction`` column (how a feature's value
    relates to its relevance), else in one colour: the sign of the mean signed share is no
    direction (it is near zero for any centred feature)."""
    return _save(importance_figure(table, title=title, top_k=top_k), path)


def mode_comparison(tables: Mapping[str, pd.DataFrame], path: str | Path, *, top_k: int = 15) -> Path:
    """Importance of the primary mode's top features in every mode, side by side."""
    modes = list(tables)
    first = tables[modes[0]].sort_values("rank").head(top_k)
    feats = list(first["feature"])[::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.36 * len(feats) + 1.4), layout="constrained")
    h = 0.8 / max(len(modes), 1)
    y = np.arange(len(feats))
    for i, m in enumerate(modes):
        vals = tables[m].set_index("feature").reindex(feats)["importance"].to_numpy()
        ax.barh(y + i * h - 0.4 + h / 2, vals, height=h, label=m)
    ax.set_yticks(y, feats)
    ax.set_xlabel("mean |share of relevance|")
    ax.set_title(f"Importance by mode (top {len(feats)} of {modes[0]})", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def share_distribution(shares: pd.DataFrame, path: str | Path, *, title: str) -> Path:
    """Per feature (columns, in order) the spread of per-sample signed shares (a strip plot)."""
    cols = list(shares.columns)[::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.36 * len(cols) + 1.4), layout="constrained")
    rng = np.random.default_rng(0)
    for i, c in enumerate(cols):
        v = shares[c].to_numpy(dtype=np.float64)
        jitter = rng.uniform(-0.3, 0.3, len(v))
        ax.scatter(v, np.full(len(v), i) + jitter, s=3, alpha=0.35,
                   c=np.where(v > 0, "#b2182b", "#2166ac"), linewidths=0)
    ax.axvline(0, color="#333333", lw=0.8)
    ax.set_yticks(range(len(cols)), cols)
    ax.set_xlabel("signed share of a sample's relevance")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def layer_ranking_bar(layers: Sequence[Mapping[str, Any]], path: str | Path, *, title: str) -> Path:
    """Each module's mean share of the output relevance, in rank order."""
    ls = sorted(layers, key=lambda d: d["rank"])[::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(ls) + 1.4), layout="constrained")
    labels = [f"{d['module']} ({d.get('type', '')})" for d in ls]
    ax.barh(labels, [d["share"] for d in ls], color="#4d9221")
    ax.set_xlabel("mean |relevance| at module output / |seed|")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def drift_shifts(units: Sequence[Mapping[str, Any]], path: str | Path, *, title: str, top_k: int = 15) -> Path:
    """Horizontal bars of the ``top_k`` largest importance differences (after - before) with
    their bootstrap intervals; significant shifts in colour, the others grey. ``units``: the
    ``units`` entries of ``drift.json`` (largest |difference| first)."""
    from matplotlib.patches import Patch

    rows = list(units)[:top_k][::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * max(len(rows), 1) + 1.6), layout="constrained")
    diff = np.array([float(r["difference"]) for r in rows])
    err = np.vstack([diff - np.array([float(r["ci_low"]) for r in rows]),
                     np.array([float(r["ci_high"]) for r in rows]) - diff]).clip(min=0) if rows else None
    colours = [("#b2182b" if d > 0 else "#2166ac") if r["significant"] else "#8c8c8c" for r, d in zip(rows, diff)]
    ax.barh([str(r["unit"]) for r in rows], diff, xerr=err, color=colours, ecolor="#333333", capsize=2)
    ax.axvline(0.0, color="#333333", linewidth=0.8)
    ax.set_xlabel("importance after - before (mean |share|), with its bootstrap interval")
    ax.legend(handles=[Patch(color="#b2182b", label="significant rise"), Patch(color="#2166ac", label="significant fall"),
                       Patch(color="#8c8c8c", label="not significant")], fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)
