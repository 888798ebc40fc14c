"""Energy scores and the OOD separation metrics of Liu et al. (2020), on scikit-learn;
the energies of a detector on a stream of activation batches.

Conventions (those of Liu et al.'s code and the paper's evaluation):

- Energy ``E(x) = -T * logsumexp(logits / T)``: higher means more out-of-distribution.
- In-distribution (ID) samples are the *positive* class and ``-E`` is their score, so a
  detector that gives ID samples lower energies than OOD ones has AUROC > 0.5; AUROC 0.5
  means the two sets are indistinguishable, 1.0 that they are fully separable.
- AUPR is scikit-learn's ``average_precision_score`` with the same labels and scores
  ("AUPR-In").
- FPR@95 is the false-positive rate (the fraction of OOD samples accepted as ID) at the
  first point of scikit-learn's ROC curve whose true-positive rate (recall of the ID set)
  reaches 0.95. Liu et al.'s ``fpr_and_fdr_at_recall`` takes the point whose recall is
  *closest* to 0.95 instead; the two agree whenever the curve has a point at exactly
  0.95 and differ by at most one ROC step otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn


def energy(logits: Any, temperature: float = 1.0) -> Any:
    """``-T * logsumexp(logits / T)`` over the last axis.

    ``logits`` (N, K) as a torch tensor (returns a tensor, differentiable) or array-like
    (returns a float64 numpy array of shape (N,))."""
    if temperature <= 0:
        raise ValueError(f"the energy temperature must be positive, got {temperature}")
    try:
        import torch

        if isinstance(logits, torch.Tensor):
            return -temperature * torch.logsumexp(logits / temperature, dim=-1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    from scipy.special import logsumexp

    z = np.asarray(logits, dtype=np.float64)
    return -temperature * logsumexp(z / temperature, axis=-1)


@dataclass(frozen=True)
class OODScores:
    """How well energies separate an ID set (positive) from an OOD set."""

    auroc: float
    aupr: float
    fpr95: float
    n_id: int
    n_ood: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _labels_scores(energy_id: Any, energy_ood: Any) -> tuple[np.ndarray, np.ndarray]:
    e_id = np.asarray(energy_id, dtype=np.float64).reshape(-1)
    e_ood = np.asarray(energy_ood, dtype=np.float64).reshape(-1)
    if e_id.size == 0 or e_ood.size == 0:
        raise ValueError(f"OOD metrics need both sets non-empty (got {e_id.size} ID, {e_ood.size} OOD energies)")
    if not (np.all(np.isfinite(e_id)) and np.all(np.isfinite(e_ood))):
        raise ValueError("OOD metrics got non-finite energies (NaN or inf): the detector diverged")
    labels = np.concatenate([np.ones(e_id.size, dtype=np.int64), np.zeros(e_ood.size, dtype=np.int64)])
    scores = -np.concatenate([e_id, e_ood])
    return labels, scores


def fpr_at_recall(labels: np.ndarray, scores: np.ndarray, recall: float = 0.95) -> float:
    """FPR at the first ROC point whose TPR (recall of the positive class) is >= ``recall``."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    k = int(np.searchsorted(tpr, recall, side="left"))
    return float(fpr[min(k, len(fpr) - 1)])


def ood_scores(energy_id: Any, energy_ood: Any, recall: float = 0.95) -> OODScores:
    """AUROC, AUPR and FPR at ``recall`` separating ``energy_id`` (positive class) from
    ``energy_ood``; both are 1-D energies (higher = more OOD)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    labels, scores = _labels_scores(energy_id, energy_ood)
    return OODScores(
        auroc=float(roc_auc_score(labels, scores)),
        aupr=float(average_precision_score(labels, scores)),
        fpr95=fpr_at_recall(labels, scores, recall),
        n_id=int(labels.sum()),
        n_ood=int(labels.size - labels.sum()),
    )


def diag_offdiag_means(values: Any) -> tuple[float, float]:
    """Means of the diagonal and of the off-diagonal cells of a square matrix (the
    off-diagonal mean is NaN for a 1x1 matrix)."""
    m = np.asarray(values, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {m.shape}")
    diag = np.diag(m)
    off = m[~np.eye(m.shape[0], dtype=bool)]
    return float(diag.mean()), float(off.mean()) if off.size else float("nan")


def pooled_means(mats: list[Any]) -> tuple[float, float]:
    """Means over every diagonal cell and over every off-diagonal cell of ``mats``."""
    diag, off = [], []
    for m in mats:
        m = np.asarray(m, dtype=float)
        mask = np.eye(m.shape[0], dtype=bool)
        diag.append(m[mask])
        off.append(m[~mask])
    d, o = np.concatenate(diag), np.concatenate(off)
    return float(d.mean()), float(o.mean()) if o.size else float("nan")


#: The keys of one high-accuracy statistic (``ood.high_accuracy.<matcher>.<scope>``).
HIGH_ACCURACY_KEYS = ("threshold", "cells", "mean_auroc", "fraction_ood", "correlation")


def offdiag_pairs(accuracy: list[Any], auroc: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(relative accuracy, AUROC) of every off-diagonal cell (i != j) of the paired square
    matrices, concatenated in order; cells whose accuracy or AUROC is not finite are left
    out."""
    xs, ys = [], []
    for a, r in zip(accuracy, auroc, strict=True):
        a, r = np.asarray(a, dtype=np.float64), np.asarray(r, dtype=np.float64)
        if a.shape != r.shape or a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"expected two square matrices of one shape, got {a.shape} and {r.shape}")
        off = ~np.eye(a.shape[0], dtype=bool)
        xs.append(a[off])
        ys.append(r[off])
    x = np.concatenate(xs) if xs else np.empty(0)
    y = np.concatenate(ys) if ys else np.empty(0)
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok]


def pearson(x: Any, y: Any) -> float | None:
    """Pearson's r of ``x`` and ``y``; None when undefined (fewer than 2 pairs, or either
    side constant)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    sx, sy = float(np.sqrt(np.sum(dx * dx))), float(np.sqrt(np.sum(dy * dy)))
    # constant (up to rounding) on either side: no correlation is defined
    if sx <= 1e-12 * max(1.0, float(np.abs(x).max())) or sy <= 1e-12 * max(1.0, float(np.abs(y).max())):
        return None
    return float(np.clip(np.sum(dx * dy) / (sx * sy), -1.0, 1.0))


def high_accuracy_stats(accuracy: list[Any], auroc: list[Any], threshold: float = 0.9,
                        ood_auroc: float = 0.9) -> dict[str, Any]:
    """The paper's conditional OOD statistic (Section 4) over the off-diagonal cells of the
    paired matrices (relative accuracy, AUROC) of one matcher and scope:

    - ``cells``: how many off-diagonal cells have relative accuracy >= ``threshold``;
    - ``mean_auroc``: their mean AUROC;
    - ``fraction_ood``: the fraction of them with AUROC > ``ood_auroc``;
    - ``correlation``: Pearson's r of relative accuracy with AUROC over *every*
      off-diagonal cell (not only the high-accuracy ones).

    Undefined values (no cell above the threshold; fewer than two cells, or constant
    values, for the correlation) are None."""
    x, y = offdiag_pairs(accuracy, auroc)
    high = y[x >= threshold]
    return {
        "threshold": float(threshold),
        "cells": int(high.size),
        "mean_auroc": float(high.mean()) if high.size else None,
        "fraction_ood": float(np.mean(high > ood_auroc)) if high.size else None,
        "correlation": pearson(x, y),
    }


def detector_energies(
    det: nn.Module, batches: Iterator[tuple[torch.Tensor, Any]], temperature: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Energies (N,) float64 of every batch's activations, and the predicted classes (N,)."""
    import torch

    det.eval()
    es, preds = [], []
    with torch.no_grad():
        for a, _ in batches:
            logits = det(a)
            es.append(energy(logits.double(), temperature).cpu())
            preds.append(logits.argmax(1).cpu())
    if not es:
        return np.empty(0), np.empty(0, dtype=np.int64)
    return torch.cat(es).numpy(), torch.cat(preds).numpy()
