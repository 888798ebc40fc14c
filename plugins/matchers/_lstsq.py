"""Streaming float64 least squares for direct matching, and the fixed low-rank projection.

The problem (paper eq. 2-3): rows ``X`` (n, p) of source activations and ``Y`` (n, q) of
target activations (one row per spatial position or token, `stitchbench.stitching.to_rows`);
find the affine map ``y ≈ W x + b`` minimising ``‖X Wᵀ + 1 bᵀ − Y‖²_F``. Among all
minimisers we return the one of minimum norm ``‖W‖²_F + ‖b‖²``: the Moore-Penrose
solution ``pinv([X, 1]) Y``, which is what the reference code computes.

Rows arrive batch by batch; memory depends on p and q only, never on n. Two accumulators:

`QRAccumulator` (the default, ``solver="qr"``)
    Keeps the triangular factor ``R`` (m x m, m = 1 + p + q) of the augmented matrix
    ``A = [1, X, Y]``, updated by a QR factorisation of ``[R; new rows]``. ``RᵀR = AᵀA``:
    these are the normal equations in square-root (Cholesky-factor) form, but without
    ever forming ``AᵀA``, so the condition number is not squared. Everything is read
    off ``R`` exactly: with the ones column first, ``R[1:1+p, 1:1+p]`` is a factor of the
    centred source, ``pinv([1, X]) Y = pinv(R11) R12`` (``R11`` is the leading
    (1+p) x (1+p) block, with the singular values of ``[1, X]`` itself), and the residual
    of any linear combination ``A v`` is ``‖R v‖``. Cost per row: about 2 m² flops.

`GramAccumulator` (``solver="gram"``)
    The normal equations proper, accumulated *centred*: the row count, the column
    means and the centred cross-products ``Xcᵀ Xc``, ``Xcᵀ Yc`` (and ``Ycᵀ Yc`` or its
    diagonal), merged batch by batch with Chan et al.'s pairwise update, so no
    ``1ᵀX`` mean term is ever subtracted from a large uncentred sum. Solved by an
    eigendecomposition of ``Xcᵀ Xc``; eigenvalues at or below the cut-off define its null
    space, and the minimum-norm solution over (W, b) *jointly* is restored exactly from
    the centred one (see `GramAccumulator.solve`). About p·(p+q) flops per row, as GEMM:
    several times faster than QR on a CPU, but the Gram squares the condition number,
    so singular values of the centred source below about ``sqrt(eps·n)`` times the
    largest cannot be resolved.

Cut-offs (``rcond`` is always relative to a *singular value*, never to an eigenvalue):

* qr: singular values ``s`` of ``[1, X_r]`` (X_r the source after the optional low-rank
  approximation) with ``s <= rcond * s_max`` are treated as zero, as ``numpy.linalg.pinv``
  does; default ``rcond = eps * max(n, 1 + p)``, the default of ``numpy.linalg.lstsq``.
* gram: eigenvalues ``λ`` of the centred ``X_rᵀ X_r`` with ``sqrt(λ) <= rcond * sqrt(λ_max)``
  are treated as zero; default ``rcond = sqrt(eps * max(n, p))``, because the Gram's
  eigenvalues carry absolute errors of order ``eps·λ_max``.

`PinvAccumulator` (``cutoff="authors"``, any ``solver``)
    The authors' solve (szegedai/stitching-ood ``nn_stitching/init/least_squares.py``,
    ``ps_inv``): every row is kept, in float32, and the map is
    ``torch.linalg.pinv([X, 1]) @ Y`` in float32 (bias column last, as theirs) with torch's
    default tolerance: singular values ``s <= max(n, 1 + p) * eps_float32 * s_max`` are
    dropped (0.3-1.2% of ``s_max`` for the 16x16-32x32 targets of K = 100 CIFAR images).
    Memory grows with n: ``4 n (1 + p + q)`` bytes plus the SVD's ``4 n (1 + p)``.

Low-rank approximation (the authors' ``low_rank_approx``, szegedai/stitching-ood
``nn_stitching/utils/low_rank/low_rank.py``): the rank-r approximation
of the centred rows, ``X_r = mean + (X − mean) V_r V_rᵀ`` with ``V_r`` the r leading right
singular vectors, is a linear map of the columns of ``[1, X]``. It is therefore applied to
the accumulated factor, not to the rows: no second pass over the data is needed, and the
same projection (`LowRankProjection`) is what the stitching layer applies at evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_EPS = torch.finfo(torch.float64).eps
_EPS32 = torch.finfo(torch.float32).eps


@dataclass
class LeastSquaresFit:
    """The solution and what to report about it (all tensors float64).

    ``weight`` (q, p) and ``bias`` (q,): the map ``y = weight @ x + bias``.
    ``residual``: ‖[1 X_r] θ − Y‖²_F / ‖Y − mean(Y)‖²_F, against the *unreduced* target.
    ``residual_uncentred``: the same over ‖Y‖²_F (the reference code's normalisation).
    ``rank``: numerical rank of the design ``[1, X_r]`` under ``cutoff`` (relative, as above).
    ``projection``: ``(mean (p,), basis (p, r))`` of the source's low-rank approximation,
    or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    residual: float
    residual_uncentred: float
    rank: int
    n_rows: int
    cutoff: float
    projection: tuple[torch.Tensor, torch.Tensor] | None = None


def _as_rows(x: torch.Tensor, width: int, what: str, device: torch.device) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[1] != width:
        raise ValueError(f"{what} rows must have shape (n, {width}), got {tuple(x.shape)}")
    x = x.to(device=device, dtype=torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} activations contain NaN or inf")
    return x


def _check_rank(rank: int | None, width: int, what: str) -> int | None:
    """None when no reduction is asked for or ``rank >= width`` (the identity)."""
    if rank is None:
        return None
    if rank < 1:
        raise ValueError(f"{what} rank must be >= 1, got {rank}")
    return None if rank >= width else int(rank)


class _Accumulator:
    def __init__(self, p: int, q: int, device: torch.device | str | None = None):
        if p < 1 or q < 1:
            raise ValueError(f"need at least one source and one target column, got p={p}, q={q}")
        self.p, self.q = int(p), int(q)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.n = 0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows ``x`` (b, p) and ``y`` (b, q) (any float dtype; converted to float64)."""
        x = _as_rows(x, self.p, "source", self.device)
        y = _as_rows(y, self.q, "target", self.device)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} source rows but {y.shape[0]} target rows")
        if x.shape[0]:
            self._update(x, y)
            self.n += x.shape[0]

    def _update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        raise NotImplementedError

    def _require_rows(self) -> None:
        if self.n == 0:
            raise ValueError("no rows were accumulated: the least-squares problem is empty")


class QRAccumulator(_Accumulator):
    """Triangular factor of ``[1, X, Y]``, updated by QR of ``[R; new rows]``.

    ``max_rows`` bounds the rows factorised at once (a batch is split), which bounds the
    float64 working memory at about ``max_rows * m * 8`` bytes, times two for LAPACK.
    """

    def __init__(self, p: int, q: int, device: torch.device | str | None = None, max_rows: int = 65536):
        super().__init__(p, q, device)
        self.m = 1 + self.p + self.q
        self.max_rows = max(int(max_rows), self.m)
        self.R = torch.zeros(0, self.m, dtype=torch.float64, device=self.device)

    def _update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        for start in range(0, x.shape[0], self.max_rows):
            xs, ys = x[start : start + self.max_rows], y[start : start + self.max_rows]
            ones = torch.ones(xs.shape[0], 1, dtype=torch.float64, device=self.device)
            stacked = torch.cat([self.R, torch.cat([ones, xs, ys], dim=1)], dim=0)
            self.R = torch.linalg.qr(stacked, mode="r")[1]

    def factor(self) -> torch.Tensor:
        """R (m, m) with RᵀR = [1 X Y]ᵀ[1 X Y] (zero rows added when n < m)."""
        self._require_rows()
        R = self.R
        if R.shape[0] < self.m:
            R = torch.cat([R, R.new_zeros(self.m - R.shape[0], self.m)], dim=0)
        return R

    def solve(
        self, rcond: float | None = None, source_rank: int | None = None, target_rank: int | None = None
    ) -> LeastSquaresFit:
        """Minimum-norm least squares of Y (or its rank-``target_rank`` approximation) on
        ``[1, X_r]``, X_r the rank-``source_rank`` approximation of X (or X)."""
        R = self.factor()
        p, q, m = self.p, self.q, self.m
        p1 = 1 + p
        source_rank = _check_rank(source_rank, p, "source")
        target_rank = _check_rank(target_rank, q, "target")
        eye = torch.eye(m, dtype=torch.float64, device=self.device)
        # ±sqrt(n) in R[0, 0]; row 0 of R is that times the column means.
        means = R[0] / R[0, 0]
        mean_x, mean_y = means[1:p1], means[p1:]

        # Columns of [1, X_r] and of the target, as combinations of the columns of [1, X, Y].
        Bs = eye[:, :p1].clone()
        projection = None
        if source_rank is not None:
            # Singular vectors of the centred source: R[1:p1, 1:p1] is its R factor.
            basis = torch.linalg.svd(R[1:p1, 1:p1], full_matrices=False)[2][:source_rank].T
            P = basis @ basis.T
            Bs[1:p1, 1:] = P
            Bs[0, 1:] = mean_x - mean_x @ P
            projection = (mean_x.clone(), basis.contiguous())
        By = eye[:, p1:]
        Bt = By
        if target_rank is not None:
            # Rows 1.. of the Y columns of R are a factor of the centred target.
            basis_y = torch.linalg.svd(R[1:, p1:], full_matrices=False)[2][:target_rank].T
            Q = basis_y @ basis_y.T
            Bt = torch.zeros(m, q, dtype=torch.float64, device=self.device)
            Bt[p1:] = Q
            Bt[0] = mean_y - mean_y @ Q

        # Only the first p1 rows of R touch the first p1 columns (R is triangular).
        M = R[:p1, :p1] @ Bs[:p1]
        rhs = (R @ Bt)[:p1]
        U, s, Vh = torch.linalg.svd(M, full_matrices=False)
        rel = _EPS * max(self.n, p1) if rcond is None else float(rcond)
        keep = s > rel * s[0]
        theta = Vh[keep].T @ ((U[:, keep].T @ rhs) / s[keep, None])  # (p1, q): [b; Wᵀ]

        resid = R @ (Bs @ theta - By)
        res_sq = float((resid * resid).sum())
        yc_sq = float((R[1:, p1:] ** 2).sum())
        y_sq = float((R[:, p1:] ** 2).sum())
        return LeastSquaresFit(
            weight=theta[1:].T.contiguous(),
            bias=theta[0].clone(),
            residual=_ratio(res_sq, yc_sq),
            residual_uncentred=_ratio(res_sq, y_sq),
            rank=int(keep.sum()),
            n_rows=self.n,
            cutoff=rel,
            projection=projection,
        )


class GramAccumulator(_Accumulator):
    """Centred normal equations, merged batch by batch (Chan, Golub & LeVeque 1979).

    ``full_yy`` keeps the whole ``Ycᵀ Yc`` (needed for a low-rank target); otherwise only
    its trace is kept.
    """

    def __init__(self, p: int, q: int, device: torch.device | str | None = None, full_yy: bool = False):
        super().__init__(p, q, device)
        self.full_yy = full_yy
        z = {"dtype": torch.float64, "device": self.device}
        self.mean_x = torch.zeros(self.p, **z)
        self.mean_y = torch.zeros(self.q, **z)
        self.Sxx = torch.zeros(self.p, self.p, **z)
        self.Sxy = torch.zeros(self.p, self.q, **z)
        self.Syy = torch.zeros(self.q, self.q, **z) if full_yy else torch.zeros(self.q, **z)

    def _update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        nb = x.shape[0]
        mx, my = x.mean(0), y.mean(0)
        xc, yc = x - mx, y - my
        dx, dy = mx - self.mean_x, my - self.mean_y
        n = self.n + nb
        w = self.n * nb / n
        self.Sxx += xc.T @ xc + w * torch.outer(dx, dx)
        self.Sxy += xc.T @ yc + w * torch.outer(dx, dy)
        if self.full_yy:
            self.Syy += yc.T @ yc + w * torch.outer(dy, dy)
        else:
            self.Syy += (yc * yc).sum(0) + w * dy * dy
        self.mean_x += dx * (nb / n)
        self.mean_y += dy * (nb / n)

    def solve(
        self, rcond: float | None = None, source_rank: int | None = None, target_rank: int | None = None
    ) -> LeastSquaresFit:
        """Minimum-norm solution over (W, b) jointly, from the centred normal equations.

        With ``Xc`` the centred (and optionally rank-reduced) source, every least-squares
        solution is ``W = W0 + V`` (rows of ``V`` in the null space N of ``Xc``) with
        ``b = ȳ − W x̄``, where ``W0`` is the minimum-norm centred solution. Minimising
        ``‖W‖² + ‖b‖²`` over V gives, with ``a = U_Nᵀ x̄`` (U_N a basis of N) and
        ``b0 = ȳ − W0 x̄``: ``b = b0 / (1 + ‖a‖²)`` and ``W = W0 + b (U_N a)ᵀ``: exactly
        ``pinv([X, 1]) Y``, not merely the minimum-norm W.
        """
        self._require_rows()
        if target_rank is not None and not self.full_yy:
            raise ValueError("a low-rank target needs GramAccumulator(full_yy=True)")
        source_rank = _check_rank(source_rank, self.p, "source")
        target_rank = _check_rank(target_rank, self.q, "target")
        Sxx, Sxy = self.Sxx, self.Sxy
        projection = None
        P = None
        if source_rank is not None:
            basis = torch.linalg.eigh(Sxx)[1][:, -source_rank:].flip(1)
            P = basis @ basis.T
            Sxx = P @ Sxx @ P
            Sxy = P @ Sxy
            projection = (self.mean_x.clone(), basis.contiguous())
        if target_rank is not None:
            basis_y = torch.linalg.eigh(self.Syy)[1][:, -target_rank:]
            Sxy = Sxy @ (basis_y @ basis_y.T)

        lam, V = torch.linalg.eigh(Sxx)  # ascending
        rel = (_EPS * max(self.n, self.p)) ** 0.5 if rcond is None else float(rcond)
        lam_max = float(lam[-1])
        keep = lam > (rel * rel) * lam_max if lam_max > 0 else torch.zeros_like(lam, dtype=torch.bool)
        Vk = V[:, keep]
        Wt0 = Vk @ ((Vk.T @ Sxy) / lam[keep, None])  # (p, q)
        b0 = self.mean_y - self.mean_x @ Wt0
        a = V[:, ~keep].T @ self.mean_x
        denom = 1.0 + float(a @ a)
        b = b0 / denom
        Wt = Wt0 + torch.outer(V[:, ~keep] @ a, b)

        # Residual against the unreduced target; the bias makes the row-mean residual zero.
        E = Wt if P is None else P @ Wt  # the map applied to the centred, unreduced source
        syy = torch.diagonal(self.Syy).sum() if self.full_yy else self.Syy.sum()
        res_sq = float(syy - 2 * (E * self.Sxy).sum() + (E * (self.Sxx @ E)).sum())
        y_sq = float(syy + self.n * (self.mean_y @ self.mean_y))
        return LeastSquaresFit(
            weight=Wt.T.contiguous(),
            bias=b,
            residual=_ratio(res_sq, float(syy)),
            residual_uncentred=_ratio(res_sq, y_sq),
            rank=1 + int(keep.sum()),
            n_rows=self.n,
            cutoff=rel,
            projection=projection,
        )


class PinvAccumulator(_Accumulator):
    """Every row, in float32, solved as the authors' ``ps_inv`` does: float32
    ``torch.linalg.pinv([X_r, 1]) @ Y_t`` with torch's default tolerance (or ``rcond``).

    ``max_rows`` bounds the float64 chunks used for the statistics (means, Grams,
    residual). The solve itself needs the whole design matrix at once.
    """

    def __init__(self, p: int, q: int, device: torch.device | str | None = None, max_rows: int = 65536):
        super().__init__(p, q, device)
        self.max_rows = max(int(max_rows), 1)
        self._x: list[torch.Tensor] = []
        self._y: list[torch.Tensor] = []

    def _update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._x.append(x.to(torch.float32))
        self._y.append(y.to(torch.float32))

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The accumulated rows (n, p) and (n, q), float32, in the order they came."""
        self._require_rows()
        if len(self._x) > 1:  # keep one copy
            self._x, self._y = [torch.cat(self._x)], [torch.cat(self._y)]
        return self._x[0], self._y[0]

    def _chunks(self, *ts: torch.Tensor):
        for start in range(0, ts[0].shape[0], self.max_rows):
            yield tuple(t[start : start + self.max_rows].to(torch.float64) for t in ts)

    def _centred_basis(self, Z: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Column mean (float64) and the r leading right singular vectors of the centred
        rows of Z (from the eigenvectors of their float64 Gram), as (width, r)."""
        mean = sum(c.sum(0) for (c,) in self._chunks(Z)) / Z.shape[0]
        gram = sum((c - mean).T @ (c - mean) for (c,) in self._chunks(Z))
        basis = torch.linalg.eigh(gram)[1][:, -r:].flip(1)
        return mean, basis.contiguous()

    def _reduce(self, Z: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """``mean + (Z - mean) basis basisᵀ`` (computed in float64), as float32."""
        out = torch.empty_like(Z)
        P = basis @ basis.T
        for start in range(0, Z.shape[0], self.max_rows):
            c = Z[start : start + self.max_rows].to(torch.float64)
            out[start : start + self.max_rows] = (mean + (c - mean) @ P).to(torch.float32)
        return out

    def solve(
        self, rcond: float | None = None, source_rank: int | None = None, target_rank: int | None = None
    ) -> LeastSquaresFit:
        """``pinv([X_r, 1]) Y_t`` in float32, X_r / Y_t the rank-reduced source / target (or
        X / Y); the approximations themselves are fitted in float64 on the same rows."""
        X, Y = self.rows()
        n = X.shape[0]
        source_rank = _check_rank(source_rank, self.p, "source")
        target_rank = _check_rank(target_rank, self.q, "target")
        projection = None
        Xr, Yt = X, Y
        if source_rank is not None:
            projection = self._centred_basis(X, source_rank)
            Xr = self._reduce(X, *projection)
        if target_rank is not None:
            Yt = self._reduce(Y, *self._centred_basis(Y, target_rank))
        A = torch.cat([Xr, torch.ones(n, 1, dtype=torch.float32, device=Xr.device)], dim=1)
        pinv, rank, rtol = _pinv_float32(A, rcond)
        theta = pinv @ Yt  # (p1, q): [Wᵀ; b], as the authors' A_ones.T
        del pinv, A

        # Residual (float64) against the unreduced target, with the source as the layer sees it.
        t64 = theta.to(torch.float64)
        res_sq = yc_sq = y_sq = 0.0
        mean_y = sum(c.sum(0) for (c,) in self._chunks(Y)) / n
        for xc, yc in self._chunks(Xr, Y):
            r = xc @ t64[:-1] + t64[-1] - yc
            res_sq += float((r * r).sum())
            yc_sq += float(((yc - mean_y) ** 2).sum())
            y_sq += float((yc * yc).sum())
        return LeastSquaresFit(
            weight=t64[:-1].T.contiguous(),
            bias=t64[-1].clone(),
            residual=_ratio(res_sq, yc_sq),
            residual_uncentred=_ratio(res_sq, y_sq),
            rank=rank,
            n_rows=n,
            cutoff=rtol,
            projection=projection,
        )


def _pinv_float32(A: torch.Tensor, rcond: float | None = None) -> tuple[torch.Tensor, int, float]:
    """``torch.linalg.pinv(A)`` (``torch.linalg.pinv(A, rtol=rcond)``) for float32 ``A``
    (n, m), computed as torch computes it; with the number of singular values kept and the
    relative tolerance used.

    torch's non-Hermitian ``linalg.pinv``: a thin SVD, ``tol = rtol * s_max`` with default
    ``rtol = eps * max(n, m)`` (atol 0), ``1/s`` where ``s > tol`` (else 0), and
    ``(Vhᴴ * s⁺) @ Uᴴ``. Done here rather than by calling it so that the rank comes from the
    same SVD (one factorisation instead of two); the tests check that the result equals
    ``torch.linalg.pinv``'s.
    """
    A = A.to(torch.float32)
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    rtol = _EPS32 * max(A.shape) if rcond is None else float(rcond)
    keep = s > rtol * s[:1]
    s_inv = torch.where(keep, s.reciprocal(), torch.zeros((), dtype=s.dtype, device=s.device))
    pinv = (Vh.mH * s_inv.unsqueeze(-2)) @ U.mH
    return pinv, int(keep.sum()), float(rtol)


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else float("inf")


def make_accumulator(
    solver: str,
    p: int,
    q: int,
    device: torch.device | str | None = None,
    *,
    target_rank: int | None = None,
    cutoff: str = "exact",
) -> QRAccumulator | GramAccumulator | PinvAccumulator:
    """The accumulator for ``solver`` ("qr" or "gram") with ``cutoff="exact"``; the
    authors' float32 pinv (`PinvAccumulator`, whatever ``solver``) with ``cutoff="authors"``."""
    if cutoff == "authors":
        return PinvAccumulator(p, q, device)
    if cutoff != "exact":
        raise ValueError(f"unknown cutoff {cutoff!r}; use 'exact' or 'authors'")
    if solver == "qr":
        return QRAccumulator(p, q, device)
    if solver == "gram":
        return GramAccumulator(p, q, device, full_yy=target_rank is not None)
    raise ValueError(f"unknown solver {solver!r}; use 'qr' or 'gram'")


