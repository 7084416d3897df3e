"""The stage's global-importance figure: every label inside the picture, colours by direction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from governance import plots


def _table(n: int = 20, direction: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    imp = np.sort(rng.uniform(0.01, 0.1, n))[::-1]
    t = pd.DataFrame({"feature": [f"purpose_debt_consolidation_{i}" for i in range(n)], "importance": imp,
                      "ci_low": imp * 0.9, "ci_high": imp * 1.1, "signed": rng.normal(0, 0.01, n),
                      "rank": np.arange(1, n + 1)})
    if direction:
        t["direction"] = ["raises", "lowers", "mixed", "lowers"] * (n // 4)
    return t


@pytest.mark.parametrize("direction", [True, False])
def test_every_label_is_inside_the_figure(direction):
    fig = plots.importance_figure(_table(direction=direction), title="Global importance (signed mode, top 20)")
    fig.canvas.draw()
    box = fig.bbox
    ax = fig.axes[0]
    for text in [ax.xaxis.label, ax.title, *ax.get_yticklabels()]:
        ext = text.get_window_extent()
        assert box.x0 - 0.5 <= ext.x0 and ext.x1 <= box.x1 + 0.5, text.get_text()
        assert box.y0 - 0.5 <= ext.y0 and ext.y1 <= box.y1 + 0.5, text.get_text()
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_bars_are_coloured_by_direction_not_by_the_mean_signed_share(tmp_path):
    from matplotlib.colors import to_hex

    fig = plots.importance_figure(_table(), title="t")
    bars = fig.axes[0].patches
    colours = [to_hex(b.get_facecolor()) for b in bars][::-1]  # rank order
    assert colours[:4] == [plots.DIRECTION_COLOURS[d] for d in ("raises", "lowers", "mixed", "lowers")]
    fig = plots.importance_figure(_table(direction=False), title="t")
    assert {to_hex(b.get_facecolor()) for b in fig.axes[0].patches} == {plots.NEUTRAL}
    path = plots.importance_bar(_table(), tmp_path / "gi.png", title="t")
    assert path.read_bytes() == plots.importance_bar(_table(), tmp_path / "again.png", title="t").read_bytes()
