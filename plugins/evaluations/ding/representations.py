"""The representations of Ding et al.'s tests: a (network, layer), optionally replaced by
its rank-r approximation.

The low-rank approximation follows the authors' code (szegedai/stitching-ood): rows
channels-last ((N·H·W, C) for conv maps, (N·T, D) for tokens), centred, SVD, the top r
directions kept. It is fitted once on all training activations of a layer (`RowMoments`
streams them), which the authors' per-mini-batch fit approximates; the same fixed
projection then serves the probe, the indices and DM (docs/ding.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stitchbench import LowRankProjection, to_rows


@dataclass(eq=False)
class Rep:
    """A representation: layer ``layer`` of network ``network``, optionally replaced by its
    rank-``rank`` approximation (``mean`` (C,), ``basis`` (C, r), float64)."""

    network: str
    layer: str
    rank: int | None = None
    mean: Any = None
    basis: Any = None
    _projection: Any = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"{self.network}/{self.layer}" + ("" if self.rank is None else f"@r{self.rank}")

    @property
    def projection(self) -> Any:
        """The fixed `LowRankProjection` (float32 buffers), or None for the full representation."""
        if self.basis is None:
            return None
        if self._projection is None:
            self._projection = LowRankProjection(self.mean, self.basis).eval()
        return self._projection

    def full(self, act: Any, dtype: Any = None) -> Any:
        """The representation of raw layer activations ``act`` (torch; conv or tokens)."""
        import torch

        dtype = dtype or act.dtype
        if self.basis is None:
            return act.to(dtype)
        return _apply_channels(act.to(torch.float64), lambda h: self.mean + (h - self.mean) @ self.basis
                               @ self.basis.T).to(dtype)

    def coords(self, act: Any) -> Any:
        """Its coordinates in the kept subspace, (x − m)V, float64, channels in place of C
        (an invertible affine image of the representation: same information, full rank)."""
        import torch

        if self.basis is None:
            return act.to(torch.float64)
        return _apply_channels(act.to(torch.float64), lambda h: (h - self.mean) @ self.basis)


def _apply_channels(act: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to the channel (embedding) axis: (N, C, H, W) channels-last and back;
    (N, T, D) and (N, D) on the last axis."""
    if act.ndim == 4:
        return fn(act.movedim(1, -1)).movedim(-1, 1).contiguous()
    return fn(act)


class RowMoments:
    """Streaming mean and centred scatter (float64) of rows, merged batch by batch with the
    pairwise update of Chan et al. (no uncentred sums are ever subtracted)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Any = None
        self.scatter: Any = None

    def update(self, rows: Any) -> None:
        import torch

        rows = rows.to(torch.float64)
        nb = rows.shape[0]
        if nb == 0:
            return
        if not torch.isfinite(rows).all():
            raise ValueError("low-rank approximation: the activations contain NaN or inf")
        mb = rows.mean(0)
        c = rows - mb
        sb = c.T @ c
        if self.n == 0:
            self.n, self.mean, self.scatter = nb, mb, sb
            return
        d = mb - self.mean
        n = self.n + nb
        self.scatter = self.scatter + sb + (self.n * nb / n) * torch.outer(d, d)
        self.mean = self.mean + d * (nb / n)
        self.n = n

    def basis(self, rank: int) -> tuple[Any, Any]:
        """(mean (C,), V (C, rank)): the ``rank`` leading right singular vectors of the
        centred rows (eigenvectors of their scatter, largest first), on the CPU."""
        import torch

        if self.n == 0:
            raise ValueError("low-rank approximation: no rows were seen")
        c = self.scatter.shape[0]
        if not 1 <= rank <= c:
            raise ValueError(f"rank must be in 1..{c}, got {rank}")
        _, vec = torch.linalg.eigh(self.scatter.cpu())
        return self.mean.cpu().clone(), vec[:, -rank:].flip(1).contiguous()


def fit_low_rank(act: Any, rank: int) -> Any:
    """The rank-``rank`` approximation fitted on activations ``act`` (N, C, H, W), (N, T, D)
    or (N, D), as a `LowRankProjection`: rows channels-last, centred, SVD, keep ``rank``."""
    moments = RowMoments()
    moments.update(to_rows(act))
    return LowRankProjection(*moments.basis(rank))


def low_rank_rep(network: str, layer: str, moments: RowMoments, rank: int) -> Rep:
    """The rank-``rank`` approximation of a layer (the full layer when rank >= channels)."""
    c = moments.scatter.shape[0]
    if rank >= c:
        return Rep(network, layer)
    mean, basis = moments.basis(rank)
    return Rep(network, layer, rank, mean, basis)
