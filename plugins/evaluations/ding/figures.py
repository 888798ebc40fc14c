"""The figure of Ding et al.'s tests: |ΔF| against d, one panel per measure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .params import DISPLAY

if TYPE_CHECKING:
    from .framework import SetResult


def scatter_figure(results: Sequence[SetResult], measures: Sequence[str], summary: dict[str, dict],
                   title: str) -> Any:
    """|ΔF| against d, one panel per measure, one colour per set."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(measures)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False, dpi=90)
    # fixed margins: tight_layout costs more than the whole plot
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.16, top=0.76, wspace=0.28)
    for ax, m in zip(axes[0], measures):
        for r in results:
            ax.scatter(r.d[m], r.delta, s=14, alpha=0.8, label=r.rset.name if len(results) > 1 else None)
        s = summary[m]
        ax.set_title(f"{DISPLAY.get(m, m)}\nτ={s['tau']:.3f} ρ={s['rho']:.3f}", fontsize=9)
        ax.set_xlabel(f"d(A, B): {_d_label(m)}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("|F(A) − F(B)|", fontsize=8)
    if len(results) > 1 and len(results) <= 12:
        axes[0][-1].legend(fontsize=6, loc="best")
    fig.suptitle(title, fontsize=10)
    return fig


def _d_label(m: str) -> str:
    return {"lcka": "1 − LCKA", "pwcca": "PWCCA distance", "opd": "OPD", "dm_func": "1 − rel. acc.",
            "dm_struct": "normalised error"}.get(m, m)
