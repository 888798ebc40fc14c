# docs/examples/rbf_cka.py
"""The ``rbf_cka`` similarity index: CKA with a Gaussian (RBF) kernel (Kornblith et al., 2019).

For the n rows of A (one per example, activations flattened) K_ij = exp(-||a_i - a_j||^2 /
(2 s^2)), with the bandwidth s = ``sigma`` x the median distance between rows; L likewise
for B. With the centring H = I - 11^T / n, CKA = <HKH, HLH>_F / (||HKH||_F ||HLH||_F): in
[0, 1], 1 for representations equal up to rotation, translation and scale. The kernels are
n x n, so memory grows with the square of the examples (`indices.n_examples`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

import stitchbench


class RbfCka(stitchbench.SimilarityIndex):
    """CKA with an RBF kernel, bandwidth sigma x the median distance (1 = identical)."""

    name = "rbf_cka"
    higher_is_more_similar = True
    symmetric = True  # compute(A, B) == compute(B, A)

    class Params(stitchbench.Params):
        sigma: float = Field(0.8, gt=0, description="bandwidth, a multiple of the median distance between rows")

    def compute(self, A: Any, B: Any, params: Params | None = None) -> float:
        """A (n, ...), B (n, ...), rows the same examples; numpy or torch. None: the defaults."""
        sigma = (params or self.Params()).sigma
        return cka(centred_kernel(A, sigma), centred_kernel(B, sigma))

    def matrix(self, sources, targets, context: stitchbench.IndexContext) -> np.ndarray:
        """Every (source layer, target layer) pair, each layer's kernel computed once."""
        sigma = (context.params or self.Params()).sigma
        ks = [centred_kernel(a, sigma) for a in sources]
        kt = ks if targets is sources else [centred_kernel(b, sigma) for b in targets]
        return np.array([[cka(K, L) for L in kt] for K in ks])


def centred_kernel(A: Any, sigma: float) -> np.ndarray:
    """HKH (n, n) float64 for the rows of A."""
    if hasattr(A, "detach"):  # a torch tensor, possibly on a GPU
        A = A.detach().cpu().numpy()
    X = np.asarray(A, dtype=np.float64).reshape(len(A), -1)
    sq = (X * X).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * X @ X.T, 0.0)  # rounding can dip below 0
    median = float(np.median(np.sqrt(d2[np.triu_indices(len(X), 1)])))
    if median == 0:
        raise ValueError("the examples' activations are (mostly) identical: RBF CKA is undefined")
    K = np.exp(-d2 / (2 * (sigma * median) ** 2))
    return K - K.mean(0) - K.mean(1)[:, None] + K.mean()


def cka(K: np.ndarray, L: np.ndarray) -> float:
    if K.shape != L.shape:
        raise ValueError(f"{len(K)} and {len(L)} examples: the rows of A and B must be the same examples")
    return float((K * L).sum() / np.sqrt((K * K).sum() * (L * L).sum()))


@stitchbench.hookimpl
def register_similarity_indices(register):
    register(RbfCka())
