"""The ``opd`` similarity index: orthogonal Procrustes distance."""

from __future__ import annotations

import math
from typing import Any, Literal

import stitchbench

from ._base import IndexParams, PairwiseIndex
from ._linalg import CrossMoments, LayerStatistics, centred_cross, nuclear_norm, prefer_gram


class OrthogonalProcrustesDistance(PairwiseIndex):
    """Orthogonal Procrustes distance (Ding et al. 2021), paper eq. 8; lower is more similar.

    Preprocessing (Ding et al.): centre every neuron (column) over the rows, then divide
    the whole matrix by its Frobenius norm: Â = Aᶜ/‖Aᶜ‖_F, B̂ = Bᶜ/‖Bᶜ‖_F. Then::

        OPD(A, B) = ‖Â‖²_F + ‖B̂‖²_F − 2‖B̂ᵀÂ‖_* = 2 − 2‖BᶜᵀAᶜ‖_* / (‖Aᶜ‖_F ‖Bᶜ‖_F)

    = min over orthogonal R of ‖B̂ − ÂR‖²_F (eq. 7), after padding the narrower side
    with zero columns when p1 ≠ p2. A distance in [0, 2], 0 for A = B, symmetric,
    invariant to orthogonal transforms and isotropic scaling of either side.

    Arrangement: ``"reference"`` (default, the paper's code): conv pairs of equal shape
    (C, H, W) per position, (n·H·W, C); token pairs with equal token counts per token,
    (n·T, D); any other pair global-average-pooled, (n, C) / (n, D). ``"pooled"`` pools
    every conv/token input; ``"flatten"`` flattens to (n, C·H·W) / (n, T·D).

    Numerics: float64 throughout; ``form="auto"`` uses the cross-product BᶜᵀAᶜ (p2 x p1)
    when both sides have fewer columns than rows, else the Gram form ‖F_BᵀF_A‖_* with
    F Fᵀ = XᶜXᶜᵀ (F from the eigendecomposition of the centred Gram matrix, eigenvalues
    below rows·ε·λ_max dropped as rounding noise). A side constant over the rows (zero norm
    after centring) raises ValueError. Nothing is clamped: rounding may give −1e-16 for
    identical inputs.
    """

    name = "opd"
    higher_is_more_similar = False
    family = "cca"

    class Params(IndexParams):
        #: "auto": Gram form when a side has more columns than rows, else feature form.
        form: Literal["auto", "gram", "feature"] = "auto"

    def _pair(self, sa: LayerStatistics, sb: LayerStatistics, p: Any) -> float:
        if prefer_gram(sa.rows, sa.cols, sb.cols, p.form):
            nuc = nuclear_norm(sb.factor().T @ sa.factor())
        else:
            nuc = nuclear_norm(centred_cross(sa, sb))
        sa.require_not_constant(self.name)
        sb.require_not_constant(self.name)
        return _opd(nuc, sa.column_stats().sq_norm, sb.column_stats().sq_norm)

    def _streamed(self, sa: LayerStatistics, sb: LayerStatistics, p: Any) -> tuple[bool, bool]:
        return not prefer_gram(sa.rows, sa.cols, sb.cols, p.form), False

    def from_moments(self, acc: CrossMoments, params: Any = None) -> float:
        for i in (0, 1):
            if acc.constant(i).all():
                raise ValueError(f"{self.name}: {acc.labels[i]} is constant across examples "
                                 "(zero norm after centring); the index is undefined")
        nuc = nuclear_norm(acc.comoment(0, 1))
        return _opd(nuc, float(acc.colsq(0).sum()), float(acc.colsq(1).sum()))


def _opd(nuc: float, sq_norm_a: float, sq_norm_b: float) -> float:
    return 2.0 - 2.0 * nuc / math.sqrt(sq_norm_a * sq_norm_b)


@stitchbench.hookimpl
def register_similarity_indices(register):
    register(OrthogonalProcrustesDistance())
