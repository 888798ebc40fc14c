"""Float64 statistics of activation matrices, shared by the bundled similarity indices.

Everything here accumulates in float64 whatever the input dtype, and reads its input in
blocks: blocks of rows (examples) for the feature form (p x p cross-products), blocks of
columns for the Gram form (n x n). Memory is therefore bounded by one block plus the
statistic itself, never by a float64 copy of a whole activation array.

Centring. A streaming accumulator never forms ``AᵀA − n·μμᵀ`` from uncentred sums: that
difference cancels catastrophically when a column's mean is large against its spread
(relative error about ε·(|μ|/σ)², i.e. every digit lost at |μ|/σ = 10⁸). `CrossMoments`
uses the pairwise update of Chan, Golub & LeVeque (1983) instead: each block is centred on
its own mean (an exact two-pass within the block) and merged into the running total by a
rank-one correction in the difference of the two means. Its error does not grow with
|μ|/σ (see ``tests/test_indices.py::test_streaming_centring_is_stable``). A column block
(Gram form) holds every example, so it is centred exactly on its own column means.

Sources. The statistics read from a *source*: an object with ``n_examples``,
``rows_per_example``, ``cols``, ``label`` and the methods ``block(i0, i1)`` (float64 rows of
examples ``i0:i1``, finite-checked) and ``column_block(j0, j1)`` (float64 columns ``j0:j1``
of every row). `stitchbench_plugins.indices._arrange.Arranged` is the one the indices use;
`ExplicitRows` wraps an in-memory float64 matrix.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

EPS = float(np.finfo(np.float64).eps)
#: Default size of one streamed block, in float64 elements (32 MiB).
DEFAULT_BLOCK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------- validation


def as_array(x: Any, label: str) -> np.ndarray:
    """``x`` as a numpy array of real numbers, dtype unchanged (no float64 copy yet).

    Torch tensors are detached and moved to the CPU (bfloat16, which numpy lacks, becomes
    float32). Raises ValueError for complex, object or string data.
    """
    if hasattr(x, "detach"):
        t = x.detach().cpu()
        if str(getattr(t, "dtype", "")) == "torch.bfloat16":
            t = t.float()
        x = t
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{label}: expected real-valued activations, got dtype {arr.dtype}")
    return arr


def to_float64(block: Any, label: str) -> np.ndarray:
    """A float64 array of ``block`` (no copy when it already is one; never write into it),
    or ValueError when it holds NaN or inf."""
    out = np.asarray(block, dtype=np.float64)
    if not np.isfinite(out).all():
        raise ValueError(f"{label} contains NaN or inf; similarity indices need finite activations")
    return out


def check_same_examples(shape_a: Sequence[int], shape_b: Sequence[int], labels: Sequence[str] = ("A", "B")) -> None:
    """ValueError naming both shapes when the two inputs have different numbers of rows."""
    if len(shape_a) == 0 or len(shape_b) == 0:
        raise ValueError(f"{labels[0]} has shape {tuple(shape_a)} and {labels[1]} has shape {tuple(shape_b)}: "
                         "expected arrays whose first axis indexes the examples")
    if shape_a[0] != shape_b[0]:
        raise ValueError(
            f"{labels[0]} has shape {tuple(shape_a)} and {labels[1]} has shape {tuple(shape_b)}: their rows "
            f"must be the same examples, but there are {shape_a[0]} and {shape_b[0]}"
        )
    if shape_a[0] < 2:
        raise ValueError(f"{labels[0]} has shape {tuple(shape_a)}: at least 2 examples are needed")


# --------------------------------------------------------------------------- streaming


class CrossMoments:
    """Streaming float64 means, column ranges and centred cross-products of ``k`` matrices
    whose rows are the same observations.

    ``update(X_0, ..., X_{k-1})`` takes one block of rows of each (any real dtype, numpy or
    torch; rows aligned). After any number of blocks, for the ``N`` rows seen so far:

    * ``mean(i)``: (p_i,) column means of X_i;
    * ``colsq(i)``: (p_i,) centred sums of squares, Σ_rows (x − μ)² per column;
    * ``constant(i)``: (p_i,) True where a column's minimum equals its maximum (exact);
    * ``comoment(i, j)``: (p_i, p_j) = X_iᶜᵀ X_jᶜ, the centred cross-product (not divided
      by N), for the pairs named in ``products``.

    ``products`` is ``"all"`` (every i <= j), ``"cross"`` (every i < j), ``"none"`` or a list
    of pairs. ``columns=False`` skips ``colsq`` / ``constant`` (a pass that only needs the
    products). Memory: the p_i x p_j products plus one block; independent of N.
    """

    def __init__(self, k: int = 2, products: str | Iterable[tuple[int, int]] = "all",
                 labels: Sequence[str] | None = None, columns: bool = True) -> None:
        if k < 1:
            raise ValueError("CrossMoments needs k >= 1")
        self.k = k
        self.labels = list(labels) if labels is not None else [f"X{i}" for i in range(k)]
        if products == "all":
            pairs = [(i, j) for i in range(k) for j in range(i, k)]
        elif products == "cross":
            pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        elif products == "none":
            pairs = []
        else:
            pairs = [tuple(sorted(p)) for p in products]  # type: ignore[misc]
        self.products: list[tuple[int, int]] = pairs
        self.columns = columns
        self.n = 0
        self._cols: list[int] | None = None
        self._mean: list[np.ndarray] = []
        self._colsq: list[np.ndarray] = []
        self._min: list[np.ndarray] = []
        self._max: list[np.ndarray] = []
        self._co: dict[tuple[int, int], np.ndarray] = {}

    def update(self, *blocks: Any) -> CrossMoments:
        if len(blocks) != self.k:
            raise ValueError(f"CrossMoments.update expects {self.k} blocks, got {len(blocks)}")
        xs = []
        for i, b in enumerate(blocks):
            if hasattr(b, "detach"):
                b = as_array(b, self.labels[i])
            x = to_float64(b, self.labels[i])
            if x.ndim != 2:
                raise ValueError(f"{self.labels[i]}: expected a 2-D block (rows x columns), got shape {x.shape}")
            xs.append(x)
        m = xs[0].shape[0]
        for i, x in enumerate(xs):
            if x.shape[0] != m:
                raise ValueError(
                    f"blocks of {self.labels[0]} {xs[0].shape} and {self.labels[i]} {x.shape} have different "
                    "numbers of rows; their rows must be the same observations"
                )
        cols = [x.shape[1] for x in xs]
        if self._cols is None:
            self._cols = cols
        elif cols != self._cols:
            raise ValueError(f"block columns {cols} differ from the earlier blocks' {self._cols}")
        if m == 0:
            return self
        bmean = [x.mean(axis=0) for x in xs]
        xc = [x - mu for x, mu in zip(xs, bmean)]
        cols_on = self.columns
        bsq = [np.einsum("ij,ij->j", c, c) for c in xc] if cols_on else []
        if self.n == 0:
            self._mean = bmean
            if cols_on:
                self._colsq = bsq
                self._min = [x.min(axis=0) for x in xs]
                self._max = [x.max(axis=0) for x in xs]
            for i, j in self.products:
                self._co[(i, j)] = xc[i].T @ xc[j]
            self.n = m
            return self
        n0, n1 = self.n, self.n + m
        f = n0 * m / n1
        delta = [bm - mu for bm, mu in zip(bmean, self._mean)]
        for i, j in self.products:
            c = self._co[(i, j)]
            c += xc[i].T @ xc[j]
            c += f * np.outer(delta[i], delta[j])
        for i in range(self.k):
            self._mean[i] = self._mean[i] + delta[i] * (m / n1)
            if cols_on:
                self._colsq[i] = self._colsq[i] + bsq[i] + f * delta[i] ** 2
                np.minimum(self._min[i], xs[i].min(axis=0), out=self._min[i])
                np.maximum(self._max[i], xs[i].max(axis=0), out=self._max[i])
        self.n = n1
        return self

    def _need_data(self) -> None:
        if self.n == 0:
            raise ValueError("no rows were accumulated")

    def mean(self, i: int = 0) -> np.ndarray:
        self._need_data()
        return self._mean[i]

    def _need_columns(self) -> None:
        self._need_data()
        if not self.columns:
            raise ValueError("column statistics were not tracked (columns=False)")

    def colsq(self, i: int = 0) -> np.ndarray:
        self._need_columns()
        return self._colsq[i]

    def constant(self, i: int = 0) -> np.ndarray:
        self._need_columns()
        return self._min[i] == self._max[i]

    def comoment(self, i: int, j: int) -> np.ndarray:
        """X_iᶜᵀ X_jᶜ, shape (p_i, p_j)."""
        self._need_data()
        if (i, j) in self._co:
            return self._co[(i, j)]
        if (j, i) in self._co:
            return self._co[(j, i)].T
        raise KeyError(f"the product ({i}, {j}) was not accumulated (products={self.products})")


# --------------------------------------------------------------------------- sources


class Source(Protocol):
    n_examples: int
    rows_per_example: int
    cols: int
    label: str

    def block(self, i0: int, i1: int) -> np.ndarray: ...

    def column_block(self, j0: int, j1: int) -> np.ndarray: ...


class ExplicitRows:
    """A float64 matrix held in memory, as a source (``rows_per_example`` rows per example)."""

    def __init__(self, matrix: np.ndarray, rows_per_example: int, label: str) -> None:
        self.matrix = np.asarray(matrix, dtype=np.float64)
        self.rows_per_example = rows_per_example
        self.n_examples = self.matrix.shape[0] // rows_per_example
        self.cols = self.matrix.shape[1]
        self.label = label

    def block(self, i0: int, i1: int) -> np.ndarray:
        r = self.rows_per_example
        return self.matrix[i0 * r:i1 * r]

    def column_block(self, j0: int, j1: int) -> np.ndarray:
        return self.matrix[:, j0:j1]


def example_ranges(n_examples: int, elements_per_example: int, block_elements: int) -> Iterator[tuple[int, int]]:
    """Consecutive ``(i0, i1)`` ranges of examples, each of about ``block_elements``."""
    step = max(1, block_elements // max(1, elements_per_example))
    for i0 in range(0, n_examples, step):
        yield i0, min(n_examples, i0 + step)


def stream_sources(sources: Sequence[Source], products: str | Iterable[tuple[int, int]],
                   block_elements: int, columns: bool = True) -> CrossMoments:
    """Accumulate `CrossMoments` over aligned row blocks of several sources (each block of
    each source is read and converted once, whatever the number of products)."""
    n = sources[0].n_examples
    rpe = sources[0].rows_per_example
    for s in sources[1:]:
        if s.n_examples != n or s.rows_per_example != rpe:
            raise ValueError(f"{sources[0].label} and {s.label} do not have aligned rows")
    width = rpe * sum(s.cols for s in sources)
    acc = CrossMoments(len(sources), products, [s.label for s in sources], columns)
    for i0, i1 in example_ranges(n, width, block_elements):
        acc.update(*(s.block(i0, i1) for s in sources))
    return acc


# --------------------------------------------------------------------------- per layer


@dataclass
class ColumnStats:
    """Column means, centred sums of squares and the exact constant-column mask."""

    mean: np.ndarray
    colsq: np.ndarray
    constant: np.ndarray

    @property
    def sq_norm(self) -> float:
        """‖X − 1μᵀ‖²_F."""
        return float(self.colsq.sum())


class LayerStatistics:
    """The statistics of one arranged activation matrix, each computed at most once.

    ``column_stats()`` (one O(rows·p) pass), ``covariance()`` (p x p centred cross-product,
    feature form, streamed over examples), ``gram()`` (n x n centred Gram matrix, Gram form,
    streamed over columns) and ``factor()`` (F with F Fᵀ = the centred Gram, from its
    eigendecomposition). ``memo`` holds index-specific results derived from these (e.g. a
    PWCCA whitening), so that a matrix of many pairs computes them once per layer.
    """

    def __init__(self, source: Source, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> None:
        self.source = source
        self.block_elements = block_elements
        self.memo: dict[Any, Any] = {}
        self._cols: ColumnStats | None = None
        self._cov: np.ndarray | None = None
        self._gram: np.ndarray | None = None
        self._factor: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return self.source.n_examples * self.source.rows_per_example

    @property
    def cols(self) -> int:
        return self.source.cols

    @property
    def label(self) -> str:
        return self.source.label

    def column_stats(self) -> ColumnStats:
        if self._cols is None:
            acc = stream_sources([self.source], "none", self.block_elements)
            self._cols = ColumnStats(acc.mean(0), acc.colsq(0), acc.constant(0))
        return self._cols

    def covariance(self) -> np.ndarray:
        """Xᶜᵀ Xᶜ, (p, p), float64 (the centred cross-product, not divided by n)."""
        if self._cov is None:
            acc = stream_sources([self.source], "all", self.block_elements)
            self._cov = acc.comoment(0, 0)
            if self._cols is None:
                self._cols = ColumnStats(acc.mean(0), acc.colsq(0), acc.constant(0))
        return self._cov

    def gram(self) -> np.ndarray:
        """Xᶜ Xᶜᵀ, (rows, rows), float64: the Gram matrix of the column-centred rows."""
        if self._gram is None:
            rows, p = self.rows, self.cols
            gram = np.zeros((rows, rows))
            mean, colsq, const = np.empty(p), np.empty(p), np.empty(p, dtype=bool)
            step = max(1, self.block_elements // max(1, rows))
            for j0 in range(0, p, step):
                j1 = min(p, j0 + step)
                x = self.source.column_block(j0, j1)
                mu = x.mean(axis=0)
                xc = x - mu
                gram += xc @ xc.T
                mean[j0:j1] = mu
                colsq[j0:j1] = np.einsum("ij,ij->j", xc, xc)
                const[j0:j1] = x.min(axis=0) == x.max(axis=0)
            self._gram = gram
            if self._cols is None:
                self._cols = ColumnStats(mean, colsq, const)
        return self._gram

    def factor(self) -> np.ndarray:
        """F (rows x r) with F Fᵀ = ``gram()``: U·Λ^½ over the eigenvalues above
        rows·ε·λ_max (the rest are rounding noise of a PSD matrix, not signal)."""
        if self._factor is None:
            lam, vec = np.linalg.eigh(self.gram())
            top = lam[-1] if lam.size else 0.0
            keep = lam > top * self.rows * EPS
            self._factor = vec[:, keep] * np.sqrt(lam[keep])
        return self._factor

    def require_not_constant(self, index: str) -> None:
        """ValueError when every column is constant (zero norm after centring)."""
        if self.column_stats().constant.all():
            raise ValueError(
                f"{index}: {self.label} is constant across examples (every column has zero variance), "
                "so it has zero norm after centring and the index is undefined"
            )


def centred_cross(a: LayerStatistics, b: LayerStatistics) -> np.ndarray:
    """Aᶜᵀ Bᶜ, (p_a, p_b), float64: prefetched by `prefetch_products`, or streamed over
    aligned row blocks of both sources now."""
    if a is b:
        return a.covariance()
    if ("cross", id(b)) in a.memo:
        return a.memo[("cross", id(b))]
    if ("cross", id(a)) in b.memo:
        return b.memo[("cross", id(a))].T
    return stream_sources([a.source, b.source], "cross", a.block_elements, columns=False).comoment(0, 1)


def prefetch_products(cross: Iterable[tuple[LayerStatistics, LayerStatistics]],
                      covariance: Iterable[LayerStatistics] = (),
                      columns: Iterable[LayerStatistics] = ()) -> None:
    """Compute, in one streaming pass per row alignment, the cross-products of the pairs in
    ``cross``, the covariance of the layers in ``covariance`` and the column statistics of
    those in ``columns`` (all three kept on the `LayerStatistics`): so an all-pairs matrix
    reads and converts each layer's activations once, not once per pair. Statistics
    already computed are not recomputed."""
    members: dict[int, LayerStatistics] = {}
    want_cov: set[int] = set()
    want_cols: set[int] = set()
    pairs: set[tuple[int, int]] = set()
    for s in covariance:
        if s._cov is None:
            members[id(s)] = s
            want_cov.add(id(s))
    for s in columns:
        if s._cols is None:
            members[id(s)] = s
            want_cols.add(id(s))
    for a, b in cross:
        if a is b:
            if a._cov is None:
                members[id(a)] = a
                want_cov.add(id(a))
        elif ("cross", id(b)) not in a.memo and ("cross", id(a)) not in b.memo:
            members[id(a)], members[id(b)] = a, b
            pairs.add((id(a), id(b)))
    groups: dict[tuple[int, int], list[LayerStatistics]] = {}
    for s in members.values():
        groups.setdefault((s.source.n_examples, s.source.rows_per_example), []).append(s)
    for group in groups.values():
        pos = {id(s): i for i, s in enumerate(group)}
        products = {(pos[k], pos[k]) for k in want_cov if k in pos}
        products |= {tuple(sorted((pos[a], pos[b]))) for a, b in pairs if a in pos and b in pos}
        if not products and not any(id(s) in want_cols for s in group):
            continue
        acc = stream_sources([s.source for s in group], sorted(products), group[0].block_elements)
        for s in group:
            i = pos[id(s)]
            if s._cols is None:
                s._cols = ColumnStats(acc.mean(i), acc.colsq(i), acc.constant(i))
            if id(s) in want_cov:
                s._cov = acc.comoment(i, i)
        for a, b in pairs:
            if a in pos and b in pos:
                members[a].memo[("cross", b)] = acc.comoment(pos[a], pos[b])


def nuclear_norm(m: np.ndarray) -> float:
    """Σ singular values (float64)."""
    if m.size == 0:
        return 0.0
    return float(np.linalg.svd(m, compute_uv=False).sum())


def prefer_gram(rows: int, cols_a: int, cols_b: int, form: str) -> bool:
    """Whether a pair is computed in Gram form: ``form`` "gram"/"feature" forces it; "auto"
    uses the Gram form exactly when a side has more columns than there are rows (then the
    n x n Gram matrix is smaller than the p x p cross-product and cheaper to form)."""
    if form == "gram":
        return True
    if form == "feature":
        return False
    return max(cols_a, cols_b) > rows


class StatsCache:
    """Per-layer statistics for one ``compute`` or ``matrix`` call, keyed by the identity of
    the caller's activation object and the arrangement, so a layer that occurs several times
    (``sources is targets``, or the same array in both lists) is processed once."""

    def __init__(self, block_elements: int) -> None:
        self.block_elements = block_elements
        self._arrays: dict[int, tuple[Any, np.ndarray]] = {}
        self._stats: dict[tuple[int, str], LayerStatistics] = {}

    def array(self, x: Any, label: str) -> np.ndarray:
        key = id(x)
        if key not in self._arrays:
            # keep x referenced so that its id stays unique while the cache lives
            self._arrays[key] = (x, as_array(x, label))
        return self._arrays[key][1]

    def stats(self, x: Any, layout: str, make_source: Any) -> LayerStatistics:
        key = (id(x), layout)
        if key not in self._stats:
            self._stats[key] = LayerStatistics(make_source(), self.block_elements)
        return self._stats[key]
