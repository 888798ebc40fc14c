"""The ``lcka`` similarity index: linear centred kernel alignment."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

import stitchbench

from ._base import IndexParams, PairwiseIndex
from ._linalg import CrossMoments, LayerStatistics, centred_cross, prefer_gram


class LinearCKA(PairwiseIndex):
    """Linear CKA (Kornblith et al. 2019), paper eq. 4; higher is more similar.

    Formula, with Aᶜ, Bᶜ the column-centred arranged matrices (n x p1, n x p2)::

        LCKA(A, B) = ‖BᶜᵀAᶜ‖²_F / (‖AᶜᵀAᶜ‖_F · ‖BᶜᵀBᶜ‖_F)                  (feature form)
                   = ⟨K_A, K_B⟩_F / (‖K_A‖_F · ‖K_B‖_F),  K = XᶜXᶜᵀ          (Gram form)

    i.e. Kornblith et al.'s biased-HSIC linear CKA. Symmetric, in [0, 1], 1 for A = B,
    invariant to orthogonal transforms and isotropic scaling of either side.

    Arrangement: ``"reference"`` (default, the paper's code) flattens conv and token
    activations to (n, C·H·W) / (n, T·D); ``"pooled"`` averages over positions / tokens;
    ``"flatten"`` is the same as ``"reference"`` here. 2-D inputs are used as given.

    Numerics: float64 throughout; ``form="auto"`` uses the Gram form when either side has
    more columns than rows, else the feature form (both exact). Gram matrices are built
    from column blocks, cross-products from row blocks; in ``matrix`` each layer's Gram or
    covariance matrix is computed once. An input that is constant over the examples
    (zero norm after centring) raises ValueError; constant columns are otherwise harmless.
    """

    name = "lcka"
    higher_is_more_similar = True
    family = "cka"

    class Params(IndexParams):
        #: "auto": Gram form (n x n) when a side has more columns than rows, else the
        #: feature form (p x p); "gram" / "feature" force one (they agree to rounding).
        form: Literal["auto", "gram", "feature"] = "auto"

    def _pair(self, sa: LayerStatistics, sb: LayerStatistics, p: Any) -> float:
        if prefer_gram(sa.rows, sa.cols, sb.cols, p.form):
            ka, kb = sa.gram(), sb.gram()
            sa.require_not_constant(self.name)
            sb.require_not_constant(self.name)
            num = float(np.vdot(ka, kb))
            return num / (_memo_norm(sa, "gram_norm", ka) * _memo_norm(sb, "gram_norm", kb))
        caa, cbb = sa.covariance(), sb.covariance()
        sa.require_not_constant(self.name)
        sb.require_not_constant(self.name)
        cab = centred_cross(sa, sb)
        num = float(np.vdot(cab, cab))
        return num / (_memo_norm(sa, "cov_norm", caa) * _memo_norm(sb, "cov_norm", cbb))

    def _streamed(self, sa: LayerStatistics, sb: LayerStatistics, p: Any) -> tuple[bool, bool]:
        feature = not prefer_gram(sa.rows, sa.cols, sb.cols, p.form)
        return feature, feature

    def from_moments(self, acc: CrossMoments, params: Any = None) -> float:
        for i in (0, 1):
            if acc.constant(i).all():
                raise ValueError(f"{self.name}: {acc.labels[i]} is constant across examples "
                                 "(zero norm after centring); the index is undefined")
        cab = acc.comoment(0, 1)
        num = float(np.vdot(cab, cab))
        return num / (float(np.linalg.norm(acc.comoment(0, 0))) * float(np.linalg.norm(acc.comoment(1, 1))))


def _memo_norm(s: LayerStatistics, key: str, m: np.ndarray) -> float:
    if key not in s.memo:
        s.memo[key] = float(np.linalg.norm(m))
    return s.memo[key]


@stitchbench.hookimpl
def register_similarity_indices(register):
    register(LinearCKA())
