"""Rank correlations and their significance, as Ding et al. (2021) report them.

Kendall's τ (τ-b, ties handled) and Spearman's ρ come from `scipy.stats`. Significance is
one-sided (a good measure's distances *increase* with the functional difference):

* ``ding_one_sided(p, r)``: Ding et al.'s conversion of scipy's two-sided p-value,
  ``p/2`` when the correlation is positive, else ``1 − p/2``;
* permutation p-values: the fraction of random permutations of one vector (seeded) whose
  statistic is at least the observed one, ``(1 + #{stat* >= stat}) / (1 + n)``; exact in
  the sense of a Monte Carlo test, whatever the set size or the ties, which matters for
  the small sets of the quick presets;
* for a *mean* of correlations over several sets (Table 2 averages the layers), the
  permutation test of the mean: every set is permuted independently, the mean recomputed.

A correlation not significant at ``alpha`` is shown as ``≈ 0`` (Table 3's mark) in text;
its value is kept in the JSON.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

APPROX_ZERO = "≈ 0"


def ding_one_sided(p_two_sided: float, statistic: float) -> float:
    """Ding et al.'s one-sided p-value: p/2 if the correlation is positive, else 1 − p/2."""
    if not (math.isfinite(p_two_sided) and math.isfinite(statistic)):
        return float("nan")
    return p_two_sided / 2 if statistic > 0 else 1 - p_two_sided / 2


def _clean(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"rank correlation needs two vectors of one length, got shapes {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _defined(x: np.ndarray, y: np.ndarray) -> bool:
    """A rank correlation needs at least 3 pairs and variation on both sides."""
    return len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0


def _rank_correlation(test: str, x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(statistic, one-sided p in Ding's convention) of ``scipy.stats.<test>``; NaN when
    undefined (< 3 pairs, a constant side)."""
    from scipy import stats

    x, y = _clean(x, y)
    if not _defined(x, y):
        return float("nan"), float("nan")
    res = getattr(stats, test)(x, y)
    return float(res.statistic), ding_one_sided(float(res.pvalue), float(res.statistic))


def kendall(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(τ-b, one-sided p in Ding's convention); NaN when undefined."""
    return _rank_correlation("kendalltau", x, y)


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(ρ, one-sided p in Ding's convention); NaN when undefined."""
    return _rank_correlation("spearmanr", x, y)


# -- permutation statistics -------------------------------------------------------------


def _ranks(v: np.ndarray) -> np.ndarray:
    from scipy import stats

    return stats.rankdata(v, axis=-1)


def _permuted_stats(x: np.ndarray, y: np.ndarray, n: int, rng: np.random.Generator,
                    chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """τ-b and ρ of (x, y[π]) for ``n`` random permutations π (vectorised in chunks).

    τ-b's denominator depends only on the tie counts of each side, which a permutation
    does not change; ρ is Pearson's r of the average ranks."""
    m = len(x)
    sx = np.sign(x[:, None] - x[None, :])
    iu = np.triu_indices(m, 1)
    sx_u = sx[iu]
    sy = np.sign(y[:, None] - y[None, :])[iu]
    denom = math.sqrt(float(np.sum(sx_u != 0)) * float(np.sum(sy != 0)))
    rx = _ranks(x)
    rx = (rx - rx.mean()) / np.linalg.norm(rx - rx.mean())
    ry = _ranks(y)
    ry_c = ry - ry.mean()
    ry_norm = np.linalg.norm(ry_c)
    taus, rhos = [], []
    done = 0
    while done < n:
        k = min(chunk, n - done)
        perm = np.argsort(rng.random((k, m)), axis=1)
        yp = y[perm]  # (k, m)
        syp = np.sign(yp[:, :, None] - yp[:, None, :])[:, iu[0], iu[1]]
        taus.append(syp @ sx_u / denom)
        rhos.append(ry_c[perm] @ rx / ry_norm)
        done += k
    return np.concatenate(taus), np.concatenate(rhos)


def _observed(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from scipy import stats

    return float(stats.kendalltau(x, y).statistic), float(stats.spearmanr(x, y).statistic)


def _p_greater(null: np.ndarray, observed: float) -> float:
    # a small tolerance so that a permutation reproducing the observed order counts
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + len(null)))


def seed_for(*parts: Any) -> int:
    """A stable 32-bit seed from any parts (e.g. the run's seed and a measure name)."""
    return zlib.crc32(repr(parts).encode())


def permutation_pvalues(x: Sequence[float], y: Sequence[float], n_permutations: int = 2000,
                        seed: int = 0) -> tuple[float, float]:
    """One-sided permutation p-values (τ, ρ) of one set; NaN when undefined."""
    return mean_permutation_pvalues([(x, y)], n_permutations, seed)


def mean_permutation_pvalues(sets: Sequence[tuple[Sequence[float], Sequence[float]]],
                             n_permutations: int = 2000, seed: int = 0) -> tuple[float, float]:
    """One-sided permutation p-values of the *mean* τ and ρ over ``sets`` (each set permuted
    independently). Sets where the correlation is undefined are left out, as in the mean."""
    rng = np.random.default_rng(seed)
    obs_t, obs_r, null_t, null_r = [], [], [], []
    for x, y in sets:
        x, y = _clean(x, y)
        if not _defined(x, y):
            continue
        t, r = _observed(x, y)
        pt, pr = _permuted_stats(x, y, n_permutations, rng)
        obs_t.append(t)
        obs_r.append(r)
        null_t.append(pt)
        null_r.append(pr)
    if not obs_t or n_permutations < 1:
        return float("nan"), float("nan")
    return (_p_greater(np.mean(null_t, axis=0), float(np.mean(obs_t))),
            _p_greater(np.mean(null_r, axis=0), float(np.mean(obs_r))))


# -- one summary per measure --------------------------------------------------------------


def correlate_sets(sets: Sequence[tuple[Sequence[float], Sequence[float]]], *, n_permutations: int,
                   seed: int, alpha: float, significance: str = "ding") -> dict[str, Any]:
    """Kendall's τ and Spearman's ρ of (|ΔF|, d) for one set, or their mean over sets.

    One set: ``p_tau``/``p_rho`` are Ding's one-sided p-values of scipy's tests,
    ``perm_p_tau``/``perm_p_rho`` the permutation p-values. Several sets: τ and ρ are the
    means over the sets where they are defined, and both kinds of p-value are those of the
    permutation test of the mean (scipy has no test of a mean of correlations).
    ``significance`` ("ding" or "permutation") picks the p-values that decide
    ``significant_tau``/``significant_rho`` (``significant``: both).
    """
    per = [(kendall(x, y), spearman(x, y)) for x, y in sets]
    taus = [t for (t, _), _ in per if math.isfinite(t)]
    rhos = [r for _, (r, _) in per if math.isfinite(r)]
    perm_t, perm_r = mean_permutation_pvalues(sets, n_permutations, seed)
    if len(sets) == 1:
        (tau, p_tau), (rho, p_rho) = per[0]
        method = "one-sided scipy p-values (Ding et al.'s convention)"
    else:
        tau = float(np.mean(taus)) if taus else float("nan")
        rho = float(np.mean(rhos)) if rhos else float("nan")
        p_tau, p_rho = perm_t, perm_r
        method = "permutation test of the mean over sets"
    decide_t, decide_r = (p_tau, p_rho) if significance == "ding" else (perm_t, perm_r)
    sig_t = bool(math.isfinite(decide_t) and decide_t < alpha)
    sig_r = bool(math.isfinite(decide_r) and decide_r < alpha)
    return {
        "tau": tau,
        "rho": rho,
        "p_tau": p_tau,
        "p_rho": p_rho,
        "perm_p_tau": perm_t,
        "perm_p_rho": perm_r,
        "significant_tau": sig_t,
        "significant_rho": sig_r,
        "significant": sig_t and sig_r,
        "n_sets": len(taus),
        "n_pairs": int(sum(len(_clean(x, y)[0]) for x, y in sets)),
        "p_method": method,
    }


def mark(value: float, significant: bool, digits: int = 4) -> str:
    """A table cell: the value, or ``≈ 0`` when it is not significant (NaN: ``n/a``)."""
    if not math.isfinite(value):
        return "n/a"
    if not significant:
        return APPROX_ZERO
    return f"{value:.{digits}f}"
