"""Figures in the paper's style (matplotlib, Agg backend; imported when first drawn)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def heatmap(
    values: Any,
    layers: Sequence[str],
    *,
    title: str,
    higher_is_more_similar: bool = True,
    source_label: str = "source layer",
    target_label: str = "target layer",
):
    """A similarity matrix as in Fig. 1a: source layer on the vertical axis, target layer on
    the horizontal axis, one annotated cell per pair. Returns the matplotlib Figure."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(layers)
    size = max(3.5, 0.55 * n + 1.5)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    cmap = "viridis" if higher_is_more_similar else "viridis_r"
    im = ax.imshow(values, cmap=cmap, origin="upper", aspect="equal")
    ticks = [str(i + 1) for i in range(n)]
    ax.set_xticks(range(n), ticks)
    ax.set_yticks(range(n), ticks)
    ax.set_xlabel(target_label)
    ax.set_ylabel(source_label)
    ax.set_title(title, fontsize=9)
    if n <= 16:
        finite = values[np.isfinite(values)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for i in range(n):
            for j in range(n):
                v = values[i, j]
                color = "white" if (v < mid) == higher_is_more_similar else "black"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig
