"""The ``pwcca`` similarity index: projection-weighted CCA, reported as a distance."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

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

    The p1 > p2 rule (``convention="matched"``, the default): only the k = min(p1, p2)
    canonical directions of A that have a partner in B carry weight. For p1 <= p2 the two
    conventions agree.

    ``convention="ding"``: Ding et al.'s ``pwcca_dist`` (js-d/sim_metric, ``cca_decomp``).
    All of A's canonical directions carry weight: the p1 − p2 that have no partner in B
    enter the denominator with their weights and the numerator with correlation 0. Those
    directions span a null space in which any orthonormal basis is a valid set of
    canonical variates; like Ding et al.'s code this takes the basis of a full SVD of
    M = Σ_AA^-½ Σ_AB Σ_BB^-½ (symmetric roots), so the value is theirs (with the same
    LAPACK); another basis gives another value (docs/indices.md measures by how much).
    Each side's roots are taken on its numerical range (eigenvalues above 1/MAX_CONDITION
    of the largest) instead of the side being refused, so a rank-r side (e.g. a low-rank
    approximation of a layer, as in Ding et al.'s sensitivity test) has r directions.

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
    symmetric = False  # the weights come from A's canonical directions
    family = "cca"

    class Params(IndexParams):
        #: Reduce each side with more columns to its top-r principal components first.
        reduce_to: int | None = Field(None, ge=1)
        #: Columns constant over the rows: "drop" them (documented rule) or "raise".
        constant_columns: Literal["drop", "raise"] = "drop"
        #: "matched": weights over the min(p1, p2) matched directions; full-rank sides only.
        #: "ding": Ding et al.'s weights over all of A's directions; rank-deficient sides allowed.
        convention: Literal["matched", "ding"] = "matched"

        @model_validator(mode="after")
        def _ding_has_no_reduction(self) -> Any:
            if self.convention == "ding" and self.reduce_to is not None:
                raise ValueError("convention 'ding' takes the sides as they are: leave reduce_to unset")
            return self

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
        if p.convention == "ding":
            return _pwcca_ding(sa.covariance(), sb.covariance(), centred_cross(sa, sb), sa.rows,
                               (sa.label, sb.label))
        _check_rows(sa.rows, sa.cols, sb.cols, p.reduce_to,
                    lambda: f"{sa.source.describe()}; {sb.source.describe()}")
        side_a, side_b = self._side(sa, p), self._side(sb, p)
        cab = _restrict(centred_cross(side_a.stats, side_b.stats), side_a.select, side_b.select)
        return _pwcca(cab, side_a, side_b)

    def _streamed(self, sa: LayerStatistics, sb: LayerStatistics, p: Any) -> tuple[bool, bool]:
        if p.convention == "ding":
            return True, True
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
        if p.convention == "ding":
            return _pwcca_ding(acc.comoment(0, 0), acc.comoment(1, 1), acc.comoment(0, 1), acc.n,
                               acc.labels).distance
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
    """``distance`` = 1 − Σα_iρ_i/Σα_i; ``rho``: the canonical correlations (descending;
    under ``convention="ding"`` padded with zeros for A's unmatched directions); ``alpha``:
    the projection weights of A's canonical variates (not normalised)."""

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


def _correlation_eigh(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d^-½, Λ, V): the eigendecomposition V Λ Vᵀ (ascending) of the correlation matrix
    D^-½ Σ D^-½ (D = diag Σ), and the column scales d^-½ (0 for a column of zero variance)."""
    d = np.diag(cov).copy()
    inv = np.zeros_like(d)
    live = d > 0
    inv[live] = 1.0 / np.sqrt(d[live])
    lam, vec = np.linalg.eigh(cov * inv[:, None] * inv[None, :])
    return inv, lam, vec


def _whitening(cov: np.ndarray, label: str) -> tuple[np.ndarray, np.ndarray]:
    """S = D^-½ V Λ^-½ and G = Σ S = D^½ V Λ^½, from the eigendecomposition V Λ Vᵀ of the
    correlation matrix D^-½ Σ D^-½ (D = diag Σ); SᵀΣS = I."""
    inv, lam, vec = _correlation_eigh(cov)
    if not lam[0] > lam[-1] / MAX_CONDITION:
        raise ValueError(
            f"pwcca: the centred columns of {label} are numerically linearly dependent (condition number "
            f"of their correlation matrix {lam[-1] / max(lam[0], 1e-300):.3g} > {MAX_CONDITION:.0e}); "
            "pass reduce_to=r to compare the top-r principal subspaces instead"
        )
    root = np.sqrt(lam)
    return (inv[:, None] * vec) / root, (np.sqrt(np.diag(cov))[:, None] * vec) * root


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


def _pwcca_ding(saa: np.ndarray, sbb: np.ndarray, sab: np.ndarray, rows: int,
                labels: Any) -> CCAResult:
    """``convention="ding"`` from the centred cross-products AᶜᵀAᶜ, BᶜᵀBᶜ and AᶜᵀBᶜ, as
    Ding et al.'s ``cca_decomp`` / ``pwcca_dist`` compute it: M = Σ_AA^-½ Σ_AB Σ_BB^-½ with
    symmetric (pseudo-)inverse square roots, its full SVD M = U diag(ρ) Vᵀ, and weights
    α_i = Σ_j |(Uᵀ Σ_AA^½)_ij| for all p1 columns of U. For p1 > p2 the last p1 − p2
    columns of U are the basis LAPACK's SVD picks for a null space; the same M gives the
    same basis, so the value is Ding et al.'s (docs/indices.md gives the size of this
    basis dependence)."""
    ia, ra, rank_a = _symmetric_roots(saa)
    ib, _, rank_b = _symmetric_roots(sbb)
    if rank_a == 0 or rank_b == 0:
        raise ValueError(f"pwcca: {labels[0] if rank_a == 0 else labels[1]} is constant over the rows")
    if rows <= max(rank_a, rank_b):
        raise ValueError(
            f"pwcca needs more rows than (effective) columns on each side: {rows} rows, ranks "
            f"{rank_a} ({labels[0]}) and {rank_b} ({labels[1]})"
        )
    u, rho, _ = np.linalg.svd(ia @ sab @ ib, full_matrices=True)
    alpha = np.abs(u.T @ ra).sum(axis=1)
    rho_all = np.concatenate([rho, np.zeros(u.shape[1] - len(rho))])
    return CCAResult(float(1.0 - alpha @ rho_all / alpha.sum()), rho_all, alpha)


def _symmetric_roots(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(Σ^-½, Σ^½, rank): symmetric roots of a covariance on its numerical range
    (eigenvalues above 1/MAX_CONDITION of the largest; the others count as 0, where Ding et
    al.'s code inverts whatever rounding leaves above 0)."""
    lam, vec = np.linalg.eigh(cov)
    keep = lam > max(lam[-1], 0.0) / MAX_CONDITION if lam[-1] > 0 else np.zeros_like(lam, dtype=bool)
    v = vec[:, keep]
    root = np.sqrt(lam[keep])
    return (v / root) @ v.T, (v * root) @ v.T, int(keep.sum())


@stitchbench.hookimpl
def register_similarity_indices(register):
    register(PWCCA())
