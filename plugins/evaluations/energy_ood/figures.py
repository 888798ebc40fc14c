"""The figures of ``energy_ood``: Fig. 2's layout (relative accuracy and OOD AUROC heat
maps) and Fig. 1c (a detector's energies). matplotlib is imported when a figure is drawn."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stitchbench import MatrixRecord

    from .analysis import Detector, MatrixResult


def _column_title(rec: MatrixRecord) -> str:
    if rec.scope == "intra":
        return f"intra: {rec.source}"
    return f"inter: {rec.source} ->\n{rec.target}"


def fig2(results: list[MatrixResult], measures: list[str]) -> Any:
    """Fig. 2's layout: per measure a row of relative-accuracy heat maps and a row of AUROC
    heat maps (TLM first, then DM), one column per stitching matrix (intra, then inter).
    Source layer on the vertical axis, target layer on the horizontal."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    by_measure = {
        m: sorted((r for r in results if r.record.plugin == m), key=lambda r: r.record.scope != "intra")
        for m in measures
    }
    ncols = max(len(v) for v in by_measure.values())
    nrows = 2 * len(measures)
    n = len(results[0].record.layers)
    cell = max(2.2, 0.3 * n + 0.8)
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols + 1.2, cell * nrows), squeeze=False)
    ticks = [str(k + 1) for k in range(n)]
    for r, m in enumerate(measures):
        for c in range(ncols):
            for k, (what, cmap, lo, hi) in enumerate((("accuracy", "viridis", 0.0, 1.0), ("auroc", "magma", 0.5, 1.0))):
                ax = axes[2 * r + k][c]
                if c >= len(by_measure[m]):
                    ax.axis("off")
                    continue
                res = by_measure[m][c]
                vals = np.asarray(res.record.values if what == "accuracy" else res.auroc, dtype=float)
                im = ax.imshow(vals, cmap=cmap, vmin=lo, vmax=max(hi, float(np.nanmax(vals))), origin="upper")
                ax.set_xticks(range(n), ticks, fontsize=6)
                ax.set_yticks(range(n), ticks, fontsize=6)
                if n <= 12:
                    for i in range(n):
                        for j in range(n):
                            v = vals[i, j]
                            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5,
                                    color="white" if v < (lo + hi) / 2 else "black")
                if r == 0 and k == 0:
                    ax.set_title(_column_title(res.record), fontsize=8)
                if c == 0:
                    label = "rel. accuracy" if what == "accuracy" else "OOD AUROC"
                    ax.set_ylabel(f"{m.upper()}\n{label}\nsource layer", fontsize=8)
                if 2 * r + k == nrows - 1:
                    ax.set_xlabel("target layer", fontsize=8)
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    fig.suptitle("Relative accuracy and OOD AUROC of stitched representations (0.5 = in distribution)", fontsize=9)
    fig.tight_layout()
    return fig


def fig_accuracy_vs_auroc(results: list[MatrixResult], measures: list[str],
                          high: dict[str, dict[str, dict[str, Any]]], threshold: float, ood_auroc: float) -> Any:
    """Relative accuracy (x) against OOD AUROC (y), one point per cell, one panel per
    matcher side by side (TLM, then DM): off-diagonal cells of intra-network matrices as
    circles, of inter-network ones as triangles; diagonal cells as small grey crosses (not
    counted by the statistic). Dashed lines: the accuracy threshold and the AUROC cut; dotted:
    AUROC 0.5 (in distribution). Each title gives the pooled statistic."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(measures), figsize=(4.2 * len(measures) + 0.4, 4.2), squeeze=False,
                             sharey=True)
    xs_all = [np.asarray(r.record.values, dtype=float) for r in results]
    finite = np.concatenate([x[np.isfinite(x)] for x in xs_all]) if xs_all else np.empty(0)
    x_lo = min(0.0, float(finite.min())) if finite.size else 0.0
    x_hi = max(1.05, float(finite.max()) + 0.05) if finite.size else 1.05
    for ax, m in zip(axes[0], measures, strict=True):
        for scope, marker, colour in (("intra", "o", "tab:blue"), ("inter", "^", "tab:orange")):
            sel = [r for r in results if r.record.plugin == m and r.record.scope == scope]
            if not sel:
                continue
            acc = np.concatenate([np.asarray(r.record.values, dtype=float).reshape(-1) for r in sel])
            auroc = np.concatenate([np.asarray(r.auroc, dtype=float).reshape(-1) for r in sel])
            diag = np.concatenate([np.eye(len(r.record.layers), dtype=bool).reshape(-1) for r in sel])
            ax.scatter(acc[~diag], auroc[~diag], s=16, marker=marker, color=colour, alpha=0.75,
                       label=f"{scope}, off-diagonal")
            ax.scatter(acc[diag], auroc[diag], s=14, marker="x" if scope == "intra" else "+", color="0.55",
                       linewidths=0.8,
                       label=f"{scope}, diagonal (not counted)")
        ax.axvline(threshold, color="black", linestyle="--", linewidth=0.8)
        ax.axhline(ood_auroc, color="tab:red", linestyle="--", linewidth=0.8)
        ax.axhline(0.5, color="0.5", linestyle=":", linewidth=0.8)
        ax.set_xlim(x_lo, x_hi)
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.02)
        ax.set_xlabel("relative accuracy")
        st = high.get(m, {}).get("all")
        title = m.upper()
        if st is not None:
            mean = "-" if st["mean_auroc"] is None else f"{st['mean_auroc']:.3f}"
            frac = "-" if st["fraction_ood"] is None else f"{100 * st['fraction_ood']:.0f}%"
            r = "-" if st["correlation"] is None else f"{st['correlation']:.2f}"
            title += (f"\nacc >= {threshold:g}: {st['cells']} cells, mean AUROC {mean}, "
                      f"{frac} > {ood_auroc:g}; r = {r}")
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=6, loc="lower left")
    axes[0][0].set_ylabel("OOD AUROC  (0.5 = in distribution)")
    fig.suptitle("Relative accuracy vs OOD AUROC of stitched representations, one point per cell", fontsize=9)
    fig.tight_layout()
    return fig


def fig1c(res: MatrixResult, j: int, det: Detector, aux_name: str) -> Any:
    """Fig. 1c: energies of detector (target, layer j). Top: ID test activations vs held-out
    auxiliary OOD activations. Bottom: the stitched activations from every source layer
    (column j of the AUROC matrix), with the ID energies for reference."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    rec = res.record
    e_st = res.energies[:, j]
    allv = np.concatenate([det.energy_id, det.energy_aux, e_st.reshape(-1)])
    lo, hi = np.percentile(allv, 0.5), np.percentile(allv, 99.5)
    if not hi > lo:
        lo, hi = lo - 1.0, hi + 1.0
    bins = np.linspace(lo, hi, 60)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.0, 6.0), sharex=True)
    top.hist(det.energy_id, bins=bins, density=True, alpha=0.6, label="in distribution (test)")
    top.hist(det.energy_aux, bins=bins, density=True, alpha=0.6, label=f"auxiliary OOD ({aux_name}, held out)")
    top.set_title(f"{rec.target}, layer {rec.layers[j]}: detector sanity AUROC {det.sanity['auroc']:.3f}", fontsize=8)
    top.set_ylabel("density")
    top.legend(fontsize=7)
    cmap = plt.get_cmap("viridis")
    n = e_st.shape[0]
    for i in range(n):
        bottom.hist(e_st[i], bins=bins, density=True, histtype="step", color=cmap(i / max(1, n - 1)),
                    label=f"from layer {i + 1} (AUROC {res.auroc[i, j]:.2f})")
    bottom.hist(det.energy_id, bins=bins, density=True, histtype="step", color="black", linestyle="--",
                label="target (ID)")
    bottom.set_title(f"{rec.plugin} stitching ({rec.scope}) into layer {j + 1}: {rec.source} -> {rec.target}",
                     fontsize=8)
    bottom.set_xlabel("energy  (higher = more OOD)")
    bottom.set_ylabel("density")
    bottom.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig
