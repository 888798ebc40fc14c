"""The ``pwcca`` similarity index: projection-weighted CCA, reported as a distance."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

import stitchbench

from ._base import IndexParams, PairwiseIndex
from ._linalg import CrossMoments, ExplicitRows, LayerStatistics, StatsCache, centred_cross

log = logging.getLogger(__name__)

#: Largest condition number of a side's correlation matrix (after dropping constant
#: columns) that PWCCA accepts. Canonical correlations from covariance matrices are
#: accurate to about ε·cond, so 1e10 keeps them to ~1e-6 or better; a worse-conditioned
#: (numerically collinear) side raises ValueError instead of returning noise.
MAX_CONDITION = 1e10


class PWCCA(PairwiseIndex):
    """Projection-weighted CCA as a distance, 1 − PWCCA (paper eq. 6); lower is more similar.

    Morcos et al. 2018, as computed by Ding et al. 2021. Asymmetric: the weights come from
    the first argument A.

    Preprocessing (Ding et al.): centre every neuron (column) over the rows and divide the
    matrix by its Frobenius norm (the scale cancels in everything below). With Aᶜ (n x p1),
    Bᶜ (n x p2) centred, the canonical correlations ρ_1 >= ... >= ρ_k, k = min(p1, p2), are
    the singular values of Σ_AA^(-1/2) Σ_AB Σ_BB^(-1/2) (Σ_XY = XᶜᵀYᶜ), with canonical
    variates h_i = Aᶜ w_i of A scaled to unit norm. Then::

        α_i = Σ_j |⟨h_i, a_j⟩|   (a_j: the j-th centred column of A)
        pwcca(A, B) = 1 − Σ_{i<=k} α_i ρ_i / Σ_{i<=k} α_i

    The p1 > p2 rule: only the k = min(p1, p2) canonical directions of A that have a
    partner in B carry weight. (Ding et al.'s code also weights the p1 − p2 further
    directions, with correlation 0 in the numerator but their weights in the denominator;
    those directions are an arbitrary basis of a null space picked by the SVD routine, so
    their weights, and the result, depend on the implementation.) For p1 <= p2 the two
    agree.

    Arrangement: ``"reference"`` (default, the paper's code): conv pairs of equal shape
    (C, H, W) per position, (n·H·W, C); token pairs with equal token counts per token,
    (n·T, D); any other pair global-average-pooled. ``"pooled"`` pools every conv/token
    input; ``"flatten"`` flattens (then p is usually >= n: see ``reduce_to``).

    Degenerate input: after the arrangement each side needs more rows than columns
    (n > p), else ValueError naming both shapes (unless ``reduce_to`` makes it so).
    Constant columns (exactly: min == max over the rows) are dropped by default
    (``constant_columns="drop"``; they are zero after centring, so they can enter no
    canonical variate and add nothing to any α_i: the result is the same as the limit of
    vanishing variance); ``"raise"`` makes them an error. A side that is numerically
    collinear (correlation-matrix condition number > 1e10) raises ValueError.

    ``reduce_to=r`` (only when asked): each side with more than r columns is replaced by
    its top-r principal-component scores (SVCCA-style; these scores are then the
    "neurons" a_j), from the p x p covariance when p < rows, else from the n x n Gram
    matrix.

    Numerics: float64 covariance matrices streamed over row blocks; whitening by the
    eigendecomposition of each side's correlation matrix, computed once per layer in
    ``matrix``. Nothing is clamped: ρ may exceed 1 by rounding (distance −1e-16).
    """

    name = "pwcca"
    higher_is_more_similar = False
    family = "cca"

    class Params(IndexParams):
        #: Reduce each side with more columns to its top-r principal components first.
        reduce_to: int | None = Field(None, ge=1)
        #: Columns constant over the rows: "drop" them (documented rule) or "raise".
        constant_columns: Literal["drop", "raise"] = "drop"

    # -- public extras ----------------------------------------------------------------
    def canonical(self, A: Any, B: Any) -> CCAResult:
        """Distance, canonical correlations ρ (descending) and weights α of A vs B."""
        p = self.params
        sa, sb = self._stats_pair(StatsCache(p.block_elements), A, B, ("A", "B"), p)
        return self._result(sa, sb, p)

    # -- internals ------------------------------------------------------------------
    def _pair(self, sa: LayerStatistics, sb: LayerStatistics, p: Any) -> float:
        return self._result(sa, sb, p).distance

    def _result(self, sa: LayerStatistics, sb: LayerStatistics, p: Any) -> CCAResult:
        _check_rows(sa.rows, sa.cols, sb.cols, p.reduce_to,
                    lambda: f"{sa.source.describe()}; {sb.source.describe()}")
        side_a, side_b = self._side(sa, p), self._side(sb, p)
        cab = _restrict(centred_cross(side_a.stats, side_b.stats), side_a.select, side_b.select)
        return _pwcca(cab, side_a, side_b)

    def _streamed(self, sa: LayerStatistics, sb: LayerStatistics, p: Any) -> tuple[bool, bool]:
        r = p.reduce_to
        for s in (sa, sb):
            q = s.cols if r is None else min(s.cols, r)
            if s.rows <= q or (r is not None and s.cols > r and s.cols >= s.rows):
                return False, False  # raises, or a Gram-form reduction: computed on demand
        return True, True

    def _side(self, s: LayerStatistics, p: Any) -> _Side:
        key = ("pwcca-side", p.reduce_to, p.constant_columns)
        if key not in s.memo:
            r = p.reduce_to
            if r is not None and s.cols > r and s.cols >= s.rows:
                s.memo[key] = _gram_reduced_side(s, r)
            else:
                select, white, cov_white = _feature_side(s.covariance(), s.column_stats().constant,
                                                         s.label, r, p.constant_columns)
                s.memo[key] = _Side(s, select, white, cov_white)
        return s.memo[key]

    def from_moments(self, acc: CrossMoments, params: Any = None) -> float:
        p = self._resolve(params)
        cols = [acc.comoment(i, i).shape[0] for i in (0, 1)]
        _check_rows(acc.n, cols[0], cols[1], p.reduce_to,
                    lambda: f"A arranged as ({acc.n}, {cols[0]}); B arranged as ({acc.n}, {cols[1]})")
        sides = []
        for i in (0, 1):
            select, white, cov_white = _feature_side(acc.comoment(i, i), acc.constant(i), acc.labels[i],
                                                     p.reduce_to, p.constant_columns)
            sides.append(_Side(None, select, white, cov_white))
        cab = _restrict(acc.comoment(0, 1), sides[0].select, sides[1].select)
        return _pwcca(cab, sides[0], sides[1]).distance


@dataclass
class CCAResult:
    """``distance`` = 1 − Σα_iρ_i/Σα_i; ``rho``: the k canonical correlations (descending);
    ``alpha``: the projection weights of A's k canonical variates (not normalised)."""

    distance: float
    rho: np.ndarray
    alpha: np.ndarray

    @property
    def weights(self) -> np.ndarray:
        return self.alpha / self.alpha.sum()


@dataclass
class _Side:
    """One side of a CCA: where its cross-products come from (``stats``; None when they are
    given), which columns or principal directions of that source it uses (``select``: None,
    an index array or a p x r projection), its whitening S (q x q, SᵀΣS = I) and ΣS (so
    that Aᶜᵀh_i = ΣS u_i: the inner products of a unit canonical variate with the neurons)."""

    stats: LayerStatistics | None
    select: np.ndarray | None
    white: np.ndarray
    cov_white: np.ndarray


def _check_rows(rows: int, cols_a: int, cols_b: int, reduce_to: int | None, describe: Any) -> None:
    for cols in (cols_a, cols_b):
        q = cols if reduce_to is None else min(cols, reduce_to)
        if rows <= q:
            hint = (f"reduce_to={reduce_to} must be below the number of rows {rows}" if reduce_to is not None
                    else f"use more examples, arrangement='pooled', or reduce_to=r with r < {rows}")
            raise ValueError(
                f"pwcca needs more rows (observations) than columns (neurons) on each side after the "
                f"arrangement, since canonical correlations of n <= p data are trivially 1: {describe()}; "
                f"{hint}"
            )


def _whitening(cov: np.ndarray, label: str) -> tuple[np.ndarray, np.ndarray]:
    """S = D^-½ V Λ^-½ and G = Σ S = D^½ V Λ^½, from the eigendecomposition V Λ Vᵀ of the
    correlation matrix D^-½ Σ D^-½ (D = diag Σ); SᵀΣS = I."""
    d = np.diag(cov).copy()
    inv = 1.0 / np.sqrt(d)
    lam, vec = np.linalg.eigh(cov * inv[:, None] * inv[None, :])
    if not lam[0] > lam[-1] / MAX_CONDITION:
        raise ValueError(
            f"pwcca: the centred columns of {label} are numerically linearly dependent (condition number "
            f"of their correlation matrix {lam[-1] / max(lam[0], 1e-300):.3g} > {MAX_CONDITION:.0e}); "
            "pass reduce_to=r to compare the top-r principal subspaces instead"
        )
    root = np.sqrt(lam)
    return (inv[:, None] * vec) / root, (np.sqrt(d)[:, None] * vec) * root


def _feature_side(cov: np.ndarray, constant: np.ndarray, label: str, reduce_to: int | None,
                  rule: str) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(select, S, G) of a side given its p x p centred covariance."""
    p = cov.shape[0]
    if reduce_to is not None and p > reduce_to:
        lam, vec = np.linalg.eigh(cov)
        top = vec[:, ::-1][:, :reduce_to]
        _check_reduction(lam[::-1], reduce_to, label)
        white, cov_white = _whitening(top.T @ cov @ top, f"{label} (top {reduce_to} principal components)")
        return top, white, cov_white
    select = None
    if constant.any():
        idx = np.flatnonzero(constant)
        if rule == "raise" or idx.size == p:
            raise ValueError(
                f"pwcca: {label} has {idx.size} of {p} columns constant over the rows (zero variance; "
                f"columns {idx[:10].tolist()}{' ...' if idx.size > 10 else ''})"
                + ("" if idx.size == p else "; constant_columns='drop' leaves them out")
            )
        log.info("pwcca: dropping %d constant column(s) of %s", idx.size, label)
        select = np.flatnonzero(~constant)
        cov = cov[np.ix_(select, select)]
    white, cov_white = _whitening(cov, label)
    return select, white, cov_white


def _check_reduction(lam_desc: np.ndarray, r: int, label: str) -> None:
    if not lam_desc[r - 1] > lam_desc[0] / MAX_CONDITION:
        raise ValueError(
            f"pwcca: reduce_to={r} exceeds the numerical rank of {label} (its {r}-th principal "
            f"variance is {lam_desc[r - 1]:.3g}, the largest {lam_desc[0]:.3g})"
        )


def _gram_reduced_side(s: LayerStatistics, r: int) -> _Side:
    """Top-r principal-component scores Z = U_r Λ_r^½ of a side with p >= rows, from its
    centred Gram matrix (Z Zᵀ is the best rank-r approximation of XᶜXᶜᵀ)."""
    lam, vec = np.linalg.eigh(s.gram())
    lam, vec = lam[::-1], vec[:, ::-1]
    _check_reduction(lam, r, s.label)
    z = vec[:, :r] * np.sqrt(lam[:r])
    zs = LayerStatistics(ExplicitRows(z, s.source.rows_per_example, f"{s.label} (top {r} principal components)"),
                         s.block_elements)
    white, cov_white = _whitening(zs.covariance(), zs.label)
    return _Side(zs, None, white, cov_white)


def _restrict(cross: np.ndarray, sel_a: np.ndarray | None, sel_b: np.ndarray | None) -> np.ndarray:
    """The cross-covariance of the two sides' selected columns or principal directions."""
    if sel_a is not None:
        cross = cross[sel_a] if sel_a.dtype.kind == "i" else sel_a.T @ cross
    if sel_b is not None:
        cross = cross[:, sel_b] if sel_b.dtype.kind == "i" else cross @ sel_b
    return cross


def _pwcca(cab: np.ndarray, a: _Side, b: _Side) -> CCAResult:
    u, rho, _ = np.linalg.svd(a.white.T @ cab @ b.white, full_matrices=False)
    alpha = np.abs(a.cov_white @ u).sum(axis=0)
    return CCAResult(float(1.0 - alpha @ rho / alpha.sum()), rho, alpha)


@stitchbench.hookimpl
def register_similarity_indices(register):
    register(PWCCA())
