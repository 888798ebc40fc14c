"""What the bundled pairwise indices (lcka, pwcca, opd) share: parameters, input handling,
``compute`` / ``matrix`` / streaming on top of per-layer statistics computed once."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

import stitchbench
from stitchbench import Params

from ._arrange import Arranged, arranged_batches, pair_layouts
from ._linalg import (
    DEFAULT_BLOCK_ELEMENTS,
    CrossMoments,
    LayerStatistics,
    StatsCache,
    check_same_examples,
    prefetch_products,
)


class IndexParams(Params):
    """Parameters every bundled pairwise index has."""

    #: "reference": the paper's code (LCKA flattens; PWCCA/OPD per position when the two
    #: shapes match, else pooled). "pooled" / "flatten" / "positions": one layout for every
    #: pair ("positions" needs as many positions or tokens per example on both sides).
    arrangement: Literal["reference", "pooled", "flatten", "positions"] = "reference"
    #: float64 elements per streamed block (memory of one block: 8 bytes each).
    block_elements: int = Field(DEFAULT_BLOCK_ELEMENTS, ge=1024)


class PairwiseIndex(stitchbench.SimilarityIndex):
    """A similarity index of two activation arrays whose rows are the same examples.

    Subclasses set ``family`` ("cka" or "cca", for the reference arrangement) and implement
    ``_pair(sa, sb, params)`` on two `LayerStatistics` and ``from_moments(acc, params)`` on a
    `CrossMoments` of the two arranged matrices (products (0,0), (1,1), (0,1)).

    ``Index(**params)`` makes an instance with other parameters; the registered one has the
    defaults. ``compute`` uses the instance's parameters, ``matrix`` those in its context.
    """

    family: ClassVar[str] = ""
    Params: ClassVar[type[IndexParams]] = IndexParams

    def __init__(self, params: IndexParams | dict | None = None, **kwargs: Any) -> None:
        if params is not None and kwargs:
            raise TypeError("give either params or keyword arguments, not both")
        self.params = self._resolve(params if params is not None else kwargs)

    def _resolve(self, params: Any) -> IndexParams:
        if params is None:
            return getattr(self, "params", None) or self.Params()
        if isinstance(params, self.Params):
            return params
        if isinstance(params, Params):
            params = params.model_dump()
        return self.Params.model_validate(params)

    # -- one pair -------------------------------------------------------------------
    def compute(self, A: Any, B: Any, params: IndexParams | dict | None = None) -> float:
        """The index of A (n, ...) and B (n, ...), numpy or torch, as a Python float, with
        ``params`` (default: the instance's)."""
        p = self._resolve(params)
        cache = StatsCache(p.block_elements)
        return float(self._pair_of(cache, A, B, ("A", "B"), p))

    def _stats_pair(self, cache: StatsCache, A: Any, B: Any, labels: Sequence[str],
                    p: IndexParams) -> tuple[LayerStatistics, LayerStatistics]:
        a = cache.array(A, labels[0])
        b = cache.array(B, labels[1])
        check_same_examples(a.shape, b.shape, labels)
        la, lb = pair_layouts(a.shape, b.shape, p.arrangement, self.family)
        sa = cache.stats(A, la, lambda: Arranged(a, la, labels[0]))
        sb = cache.stats(B, lb, lambda: Arranged(b, lb, labels[1]))
        return sa, sb

    def _pair_of(self, cache: StatsCache, A: Any, B: Any, labels: Sequence[str], p: IndexParams) -> float:
        sa, sb = self._stats_pair(cache, A, B, labels, p)
        return self._pair(sa, sb, p)

    def _pair(self, sa: LayerStatistics, sb: LayerStatistics, p: Any) -> float:
        raise NotImplementedError

    # -- all pairs ------------------------------------------------------------------
    def matrix(self, sources: Sequence[Any], targets: Sequence[Any], context: Any = None) -> np.ndarray:
        """(len(sources), len(targets)) values; each layer's statistics (centring, Gram or
        covariance matrix, whitening) are computed once and reused for every pair, also
        when ``sources is targets`` or an array occurs in both lists."""
        p = self._resolve(getattr(context, "params", None))
        shared = getattr(context, "shared", None)
        if shared is not None:
            # one cache for the whole run: each layer's statistics once, whatever the matrices
            cache = shared.setdefault(("stats", p.block_elements), StatsCache(p.block_elements))
        else:
            cache = StatsCache(p.block_elements)
        same = targets is sources
        pairs = {}
        for i, a in enumerate(sources):
            for j, b in enumerate(targets):
                labels = (f"layer[{i}]", f"layer[{j}]") if same else (f"source[{i}]", f"target[{j}]")
                pairs[i, j] = self._stats_pair(cache, a, b, labels, p)
        self._prefetch(list(pairs.values()), p)
        out = np.empty((len(sources), len(targets)))
        for (i, j), (sa, sb) in pairs.items():
            out[i, j] = self._pair(sa, sb, p)
        return out

    def _prefetch(self, pairs: list[tuple[LayerStatistics, LayerStatistics]], p: Any) -> None:
        """Compute what the pairs need from row blocks in shared passes (see
        `prefetch_products`); ``_streamed(sa, sb, p)`` says what each pair needs."""
        cross, cov, cols = [], [], []
        for sa, sb in pairs:
            need_cross, need_cov = self._streamed(sa, sb, p)
            if need_cross:
                cross.append((sa, sb))
                cols += [sa, sb]
            if need_cov:
                cov += [sa, sb]
        prefetch_products(cross, cov, cols)

    def _streamed(self, sa: LayerStatistics, sb: LayerStatistics, p: Any) -> tuple[bool, bool]:
        """(needs the cross-product AᶜᵀBᶜ, needs both covariances) of a pair."""
        return False, False

    # -- streaming ------------------------------------------------------------------
    def compute_streaming(self, batches: Iterable[tuple[Any, Any]], params: IndexParams | dict | None = None) -> float:
        """The index from a stream of ``(A_batch, B_batch)`` example batches (numpy or torch,
        same per-example shapes in every batch), in the feature form: memory holds the
        p x p cross-products and one batch, whatever the number of examples. Equal to
        ``compute`` on the concatenated batches."""
        p = self._resolve(params)
        acc = CrossMoments(2, "all", ("A", "B"))
        for a, b in arranged_batches(batches, p.arrangement, self.family):
            acc.update(a, b)
        return float(self.from_moments(acc, p))

    def from_moments(self, acc: CrossMoments, params: Any = None) -> float:
        """The index from accumulated moments of the two arranged matrices."""
        raise NotImplementedError
