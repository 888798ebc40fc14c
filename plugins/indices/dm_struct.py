"""DM(struct): direct matching as a structural distance (paper Section 2.3)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import stitchbench
from stitchbench import IndexContext, Params, SimilarityIndex


def _as_tensor(x: Any):
    import numpy as np
    import torch

    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    else:
        t = torch.from_numpy(np.ascontiguousarray(x))
    # (n, p) feature vectors are 1x1 maps: T is then an affine map of the p features
    return (t[:, :, None, None] if t.ndim == 2 else t).double()


def normalised_error(T: Any, X: Any, Y: Any, batch_size: int = 1024) -> float:
    """‖T(X) − Y‖²_F / ‖Y‖²_F, summed over all examples (in batches, float64)."""
    import torch

    T = T.double()
    num = den = 0.0
    with torch.no_grad():
        for s in range(0, X.shape[0], batch_size):
            y = Y[s : s + batch_size]
            num += float(((T(X[s : s + batch_size]) - y) ** 2).sum())
            den += float((y**2).sum())
    if den == 0.0:
        raise ValueError("DM(struct): the target activations are all zero; the normalised error is undefined")
    return num / den


class DMStruct(SimilarityIndex):
    """DM(struct): normalised error of the DM approximation of the target, ‖T(f(x)) − g(x)‖²_F / ‖g(x)‖²_F.

    T is the direct-matching stitching layer (plugin ``dm``: least squares with a bias,
    bilinear resize for conv maps of different sizes). In a run, T is fitted on ``k``
    training images drawn in the run's fixed order (the same images DM uses) and the error is
    measured on the first ``indices.n_examples`` test images, as one ratio of sums over all
    of them (the authors' code averages per-batch ratios; with equal batches the two differ
    only by the batches' weighting). ``compute(A, B)`` on arrays fits and measures on the
    same rows (an in-sample error). A distance: 0 means the target is exactly an affine
    image of the source; 1 is what T = 0 would give; lower is more similar.
    """

    name = "dm_struct"
    higher_is_more_similar = False
    needs_train_activations = True
    symmetric = False  # T maps the source onto the target

    class Params(Params):
        k: int = 100  # training images T is fitted on (as DM's K)

    def compute(self, A: Any, B: Any, params: Any = None) -> float:
        X, Y = _as_tensor(A), _as_tensor(B)
        if X.shape[0] != Y.shape[0]:
            raise ValueError(f"DM(struct) needs the same examples on both sides: shapes {tuple(X.shape)} and {tuple(Y.shape)}")
        T = stitchbench.get_plugin("dm").fit_activations(X, Y)
        return normalised_error(T, X, Y)

    def matrix(self, sources: Sequence[Any], targets: Sequence[Any], context: IndexContext):
        import numpy as np

        dm = stitchbench.get_plugin("dm")
        k = context.params.k if context.params is not None else 100
        if context.train_sample is None:
            raise ValueError("DM(struct) needs training activations (the core passes them in a run)")
        train_src = context.train_sample("source", k)
        train_tgt = train_src if context.same_network else context.train_sample("target", k)
        test_src = [_as_tensor(a) for a in sources]
        test_tgt = test_src if targets is sources else [_as_tensor(b) for b in targets]
        out = np.empty((len(sources), len(targets)))
        for i in range(len(sources)):
            for j in range(len(targets)):
                T = dm.fit_activations(_as_tensor(train_src[i]), _as_tensor(train_tgt[j]))
                out[i, j] = normalised_error(T, test_src[i], test_tgt[j])
        return out


@stitchbench.hookimpl
def register_similarity_indices(register):
    register(DMStruct())
