"""Arranging layer activations as 2-D matrices (rows = observations, columns = neurons).

Activations come as (n, p) matrices, conv feature maps (n, C, H, W) or token sequences
(n, T, D). An index needs a matrix; the *layouts* are:

* ``matrix``: a 2-D input, used as it is;
* ``flatten``: (n, C·H·W) or (n, T·D), one row per example (C-order flattening);
* ``positions``: (n·H·W, C) or (n·T, D), one row per spatial position or token of each
  example (rows ordered example-major);
* ``pooled``: (n, C) or (n, D), the mean over spatial positions or tokens (global average
  pooling; tokens: the cls token, if any, is averaged with the others).

The *arrangement* (an index parameter) picks the layouts of a pair:

* ``"reference"``: what the paper's code does (szegedai/stitching-ood, ``resize_for_cca2``
  in ``nn_stitching/utils/representational_similarity/__init__.py``). LCKA flattens. PWCCA and OPD
  use ``positions`` for conv pairs of equal shape (C, H, W) and for token pairs with equal
  token counts T, and ``pooled`` otherwise. So whether a pair is compared per position
  or pooled depends on the *pair*, not on the layer.
* ``"pooled"``: ``pooled`` for every conv or token input, whatever the other one is.
* ``"flatten"``: ``flatten`` for every conv or token input.
* ``"positions"``: ``positions`` for every conv or token input; the two must have as many
  positions (H·W) or tokens (T) per example, whatever their channels. The reference rule
  for a pair of equal shapes, also for a layer and its rank-r coordinates (the same layer
  with fewer columns, as Ding et al.'s sensitivity test compares them).

A 2-D input is always used as it is (it can be neither pooled nor split into positions);
a pair of a 3-D and a 4-D input is pooled under ``"reference"``.

The arranged matrix is never built in full: `Arranged` hands out float64 blocks of rows
(by example) or of columns, converted and checked for NaN/inf block by block.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Literal

import numpy as np

from ._linalg import as_array, check_same_examples, to_float64

Arrangement = Literal["reference", "pooled", "flatten", "positions"]
ARRANGEMENTS = ("reference", "pooled", "flatten", "positions")
#: How an index family reads ``"reference"``: LCKA flattens (Kornblith et al.'s code);
#: PWCCA and OPD follow Ding et al.'s per-position-or-pooled rule.
FAMILIES = ("cka", "cca")

_DESCRIPTION = {
    "matrix": "as given",
    "flatten": "flattened",
    "positions": "per position",
    "pooled": "pooled",
}


def _check_ndim(shape: tuple[int, ...], label: str) -> None:
    if len(shape) not in (2, 3, 4):
        raise ValueError(
            f"{label} has shape {shape}: expected (n, p), conv (n, C, H, W) or token (n, T, D) activations"
        )


def _positions(shape: tuple[int, ...]) -> int:
    """Rows per example in the ``positions`` layout: H·W of (n, C, H, W), T of (n, T, D)."""
    return shape[2] * shape[3] if len(shape) == 4 else shape[1]


def pair_layouts(shape_a: tuple[int, ...], shape_b: tuple[int, ...], arrangement: str,
                 family: str) -> tuple[str, str]:
    """The layouts of A and B under ``arrangement`` for an index of ``family``."""
    if arrangement not in ARRANGEMENTS:
        raise ValueError(f"unknown arrangement {arrangement!r}; expected one of {ARRANGEMENTS}")
    if family not in FAMILIES:
        raise ValueError(f"unknown index family {family!r}")
    _check_ndim(shape_a, "A")
    _check_ndim(shape_b, "B")

    def each(layout: str) -> tuple[str, str]:
        return tuple("matrix" if len(s) == 2 else layout for s in (shape_a, shape_b))  # type: ignore[return-value]

    if arrangement == "flatten" or (arrangement == "reference" and family == "cka"):
        return each("flatten")
    if arrangement == "pooled":
        return each("pooled")
    if arrangement == "positions":
        if len(shape_a) == 2 or len(shape_b) == 2 or _positions(shape_a) != _positions(shape_b):
            raise ValueError(
                f"arrangement 'positions' needs conv or token activations with as many positions (or tokens) "
                f"per example on both sides, got shapes {shape_a} and {shape_b}"
            )
        return "positions", "positions"
    # reference, PWCCA/OPD (Ding et al.; the paper's `resize_for_cca2`)
    if len(shape_a) == len(shape_b) == 4 and shape_a[1:] == shape_b[1:]:
        return "positions", "positions"
    if len(shape_a) == len(shape_b) == 3 and shape_a[1] == shape_b[1]:
        return "positions", "positions"
    return each("pooled")


class Arranged:
    """One activation array in one layout, read lazily in float64 blocks (a `Source`)."""

    def __init__(self, raw: np.ndarray, layout: str, name: str) -> None:
        self.raw = raw
        self.layout = layout
        shape = tuple(raw.shape)
        #: e.g. "A (1000, 64, 32, 32)": names the input in every error message
        self.label = label = f"{name} {shape}"
        self.n_examples = shape[0]
        if layout == "matrix":
            if raw.ndim != 2:
                raise ValueError(f"{label}: layout 'matrix' needs a 2-D array")
            self.rows_per_example, self.cols = 1, shape[1]
        elif layout == "flatten":
            self.rows_per_example, self.cols = 1, int(np.prod(shape[1:], dtype=np.int64))
        elif layout == "positions":
            if raw.ndim == 4:
                self.rows_per_example, self.cols = shape[2] * shape[3], shape[1]
            elif raw.ndim == 3:
                self.rows_per_example, self.cols = shape[1], shape[2]
            else:
                raise ValueError(f"{label}: layout 'positions' needs conv or token activations")
        elif layout == "pooled":
            if raw.ndim not in (3, 4):
                raise ValueError(f"{label}: layout 'pooled' needs conv or token activations")
            self.rows_per_example, self.cols = 1, shape[1] if raw.ndim == 4 else shape[2]
        else:
            raise ValueError(f"unknown layout {layout!r}")
        self._pooled: np.ndarray | None = None
        self._flat: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return self.n_examples * self.rows_per_example

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    def describe(self) -> str:
        """E.g. ``A (1000, 64, 32, 32) -> (1024000, 64) per position``."""
        return f"{self.label} -> {self.shape} {_DESCRIPTION[self.layout]}"

    def _flattened(self) -> np.ndarray:
        if self._flat is None:
            self._flat = self.raw.reshape(self.n_examples, -1)
        return self._flat

    def _pooled_matrix(self) -> np.ndarray:
        if self._pooled is None:
            axes = (2, 3) if self.raw.ndim == 4 else (1,)
            per_example = int(np.prod(self.raw.shape[1:], dtype=np.int64))
            out = np.empty((self.n_examples, self.cols))
            step = max(1, (1 << 22) // max(1, per_example))
            for i0 in range(0, self.n_examples, step):
                i1 = min(self.n_examples, i0 + step)
                chunk = to_float64(self.raw[i0:i1], self.label)
                out[i0:i1] = chunk.mean(axis=axes)
            self._pooled = out
        return self._pooled

    def block(self, i0: int, i1: int) -> np.ndarray:
        """Float64 rows of examples ``i0:i1`` (read-only: may be a view of a cache)."""
        if self.layout == "matrix":
            return to_float64(self.raw[i0:i1], self.label)
        if self.layout == "flatten":
            return to_float64(self._flattened()[i0:i1], self.label)
        if self.layout == "pooled":
            return self._pooled_matrix()[i0:i1]
        chunk = self.raw[i0:i1]
        if self.raw.ndim == 4:
            k, c, h, w = chunk.shape
            out = np.empty((k, h, w, c))
            out[...] = chunk.transpose(0, 2, 3, 1)
            return to_float64(out.reshape(k * h * w, c), self.label)
        k, t, d = chunk.shape
        return to_float64(chunk.reshape(k * t, d), self.label)

    def column_block(self, j0: int, j1: int) -> np.ndarray:
        """Float64 columns ``j0:j1`` of every row."""
        if self.layout == "matrix":
            return to_float64(self.raw[:, j0:j1], self.label)
        if self.layout == "flatten":
            return to_float64(self._flattened()[:, j0:j1], self.label)
        if self.layout == "pooled":
            return self._pooled_matrix()[:, j0:j1]
        if self.raw.ndim == 4:
            part = self.raw[:, j0:j1]
            n, c, h, w = part.shape
            out = np.empty((n, h, w, c))
            out[...] = part.transpose(0, 2, 3, 1)
            return to_float64(out.reshape(n * h * w, c), self.label)
        return to_float64(self.raw[:, :, j0:j1].reshape(-1, j1 - j0), self.label)

    def dense(self) -> np.ndarray:
        """The whole arranged matrix in float64 (for inspection and small inputs only)."""
        return self.block(0, self.n_examples)


def arrange_pair(A: Any, B: Any, arrangement: str, family: str,
                 labels: tuple[str, str] = ("A", "B")) -> tuple[Arranged, Arranged]:
    """Validate A and B (numpy or torch; same number of examples) and arrange them."""
    a = as_array(A, labels[0])
    b = as_array(B, labels[1])
    check_same_examples(a.shape, b.shape, labels)
    la, lb = pair_layouts(a.shape, b.shape, arrangement, family)
    return Arranged(a, la, labels[0]), Arranged(b, lb, labels[1])


def arrange(A: Any, B: Any, arrangement: str = "reference", family: str = "cca") -> tuple[np.ndarray, np.ndarray]:
    """The two arranged float64 matrices, in full (for inspection and tests)."""
    a, b = arrange_pair(A, B, arrangement, family)
    return a.dense(), b.dense()


def arranged_batches(batches: Iterable[tuple[Any, Any]], arrangement: str,
                     family: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Arrange each (A_batch, B_batch) of a stream of example batches into float64 row
    blocks. The layouts are decided by the first batch's shapes; later batches must have
    the same per-example shapes (every layout arranges each example on its own, so a
    stream of batches gives exactly the rows of the whole arranged matrix)."""
    first: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    layouts: tuple[str, str] | None = None
    for k, (A, B) in enumerate(batches):
        a = as_array(A, f"A batch {k}")
        b = as_array(B, f"B batch {k}")
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"A batch {k} has shape {a.shape} and B batch {k} has shape {b.shape}: "
                             "the rows must be the same examples")
        if first is None:
            first = (a.shape[1:], b.shape[1:])
            layouts = pair_layouts(a.shape, b.shape, arrangement, family)
        elif (a.shape[1:], b.shape[1:]) != first:
            raise ValueError(f"batch {k} has per-example shapes {a.shape[1:]} and {b.shape[1:]}, "
                             f"the first batch had {first[0]} and {first[1]}")
        assert layouts is not None
        if a.shape[0] == 0:
            continue
        yield (Arranged(a, layouts[0], f"A batch {k}").block(0, a.shape[0]),
               Arranged(b, layouts[1], f"B batch {k}").block(0, b.shape[0]))
