"""Charts for the report as deterministic PNG bytes (matplotlib Agg, no timestamps, no mathtext).

Every function takes plain prepared values and returns PNG bytes; the same values give the same
bytes. Labels come from data and are untrusted: mathtext parsing is off and long labels are cut.
"""

from __future__ import annotations

import base64
import io
from typing import Sequence

import numpy as np

_RC = {
    "text.parse_math": False,
    "font.family": "DejaVu Sans",
    "font.size": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "svg.hashsalt": "governance",
}
PRIMARY = "#1f4e79"
ACCENT = "#c0504d"
MUTED = "#9db3c9"


def _plt():  # noqa: ANN202 - returns the pyplot module
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def short_label(text: str, width: int = 38) -> str:
    """A label cut to ``width`` characters with an ellipsis."""
    text = str(text).replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _png(fig) -> bytes:
    """PNG bytes of ``fig`` without metadata (deterministic); closes the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, metadata={"Software": None}, bbox_inches="tight", pad_inches=0.05)
    _plt().close(fig)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI for embedding."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def importance_chart(features: Sequence[str], importance: Sequence[float], ci_low: Sequence[float],
                     ci_high: Sequence[float]) -> bytes:
    """Horizontal bars of mean |share| with 95% CI whiskers, most important on top."""
    plt = _plt()
    with plt.rc_context(_RC):
        n = len(features)
        fig, ax = plt.subplots(figsize=(6.2, 0.28 * n + 0.8))
        y = np.arange(n)[::-1]
        imp = np.asarray(importance, dtype=float)
        lo = np.clip(imp - np.asarray(ci_low, dtype=float), 0, None)
        hi = np.clip(np.asarray(ci_high, dtype=float) - imp, 0, None)
        ax.barh(y, imp, color=PRIMARY, xerr=np.vstack([lo, hi]), ecolor="#333333", capsize=2, height=0.65)
        ax.set_yticks(y, [short_label(f) for f in features])
        ax.set_xlabel("mean |relevance share| (95% bootstrap CI)")
        ax.grid(axis="x", color="#dddddd", linewidth=0.5)
        ax.set_axisbelow(True)
        return _png(fig)


def distribution_chart(features: Sequence[str], values: Sequence[np.ndarray]) -> bytes:
    """Box plots of each feature's signed relevance share over the samples."""
    plt = _plt()
    with plt.rc_context(_RC):
        n = len(features)
        fig, ax = plt.subplots(figsize=(6.2, 0.32 * n + 0.9))
        data = [np.asarray(v, dtype=float) for v in values][::-1]
        ax.boxplot(data, orientation="horizontal", widths=0.6, showfliers=True,
                   flierprops={"markersize": 1.5, "markerfacecolor": MUTED, "markeredgecolor": MUTED},
                   medianprops={"color": ACCENT}, boxprops={"color": PRIMARY})
        ax.set_yticks(np.arange(1, n + 1), [short_label(f) for f in features][::-1])
        ax.axvline(0, color="#888888", linewidth=0.6)
        ax.set_xlabel("signed relevance share per sample (> 0 pushes towards the predicted outcome)")
        ax.grid(axis="x", color="#dddddd", linewidth=0.5)
        return _png(fig)


def layer_chart(modules: Sequence[str], shares: Sequence[float]) -> bytes:
    """Horizontal bars of each module's share of relevance."""
    plt = _plt()
    with plt.rc_context(_RC):
        n = len(modules)
        fig, ax = plt.subplots(figsize=(6.2, 0.28 * n + 0.8))
        y = np.arange(n)[::-1]
        ax.barh(y, np.asarray(shares, dtype=float), color=MUTED, edgecolor=PRIMARY, height=0.65)
        ax.set_yticks(y, [short_label(m) for m in modules])
        ax.set_xlabel("share of relevance at the module's output")
        ax.grid(axis="x", color="#dddddd", linewidth=0.5)
        ax.set_axisbelow(True)
        return _png(fig)


def heatmap(image: np.ndarray, relevance: np.ndarray, title: str) -> bytes:
    """An input image beside its relevance heatmap (red = for the prediction, blue = against)."""
    plt = _plt()
    img = np.asarray(image, dtype=float)
    rel = np.asarray(relevance, dtype=float)
    if img.ndim == 3 and img.shape[0] in (1, 3):  # C, H, W -> H, W, C
        img = np.moveaxis(img, 0, -1)
    if rel.ndim == 3:
        rel = rel.sum(axis=0) if rel.shape[0] in (1, 3) else rel.sum(axis=-1)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    span = img.max() - img.min()
    img = (img - img.min()) / span if span > 0 else np.zeros_like(img)
    bound = float(np.abs(rel).max()) or 1.0
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(1, 2, figsize=(3.6, 1.9))
        axes[0].imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        axes[1].imshow(rel, cmap="bwr", vmin=-bound, vmax=bound, interpolation="nearest")
        axes[0].set_title("input", fontsize=7)
        axes[1].set_title(short_label(title, 30), fontsize=7)
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color("#999999")
                spine.set_linewidth(0.5)
        return _png(fig)
