"""DM(struct): direct matching as a structural distance (paper Section 2.3)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, PositiveInt

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


#: Examples per block of the pooled sums (memory only: the value does not depend on it
#: beyond rounding).
POOLED_BLOCK = 1024
#: The authors' evaluation batch: ``exec_stitch.py`` measures DM(struct) on the test loader
#: of its ``--batch-size`` (default 256, unshuffled, the last partial batch kept).
AUTHORS_BATCH_SIZE = 256


def normalised_error(T: Any, X: Any, Y: Any, reduction: str = "pooled", batch_size: int = AUTHORS_BATCH_SIZE) -> float:
    """The normalised error of T(X) against Y (float64).

    ``pooled``: ‖T(X) − Y‖²_F / ‖Y‖²_F, one ratio of sums over all examples.
    ``per_batch``: the mean over consecutive batches of ``batch_size`` examples (the last
    one partial when the count is not a multiple) of each batch's ratio
    ‖T(X_b) − Y_b‖²_F / ‖Y_b‖²_F, every batch weighted equally, as the authors' code does.
    """
    import torch

    if reduction not in ("pooled", "per_batch"):
        raise ValueError(f"DM(struct): reduction must be 'pooled' or 'per_batch', got {reduction!r}")
    if batch_size < 1:
        raise ValueError(f"DM(struct): batch_size must be >= 1, got {batch_size}")
    T = T.double()
    step = POOLED_BLOCK if reduction == "pooled" else batch_size
    nums, dens = [], []
    with torch.no_grad():
        for s in range(0, X.shape[0], step):
            y = Y[s : s + step]
            nums.append(float(((T(X[s : s + step]) - y) ** 2).sum()))
            dens.append(float((y**2).sum()))
    if reduction == "pooled":
        num = den = 0.0
        for a, b in zip(nums, dens):
            num += a
            den += b
        if den == 0.0:
            raise ValueError("DM(struct): the target activations are all zero; the normalised error is undefined")
        return num / den
    if any(d == 0.0 for d in dens):
        b = dens.index(0.0)
        raise ValueError(f"DM(struct): the target activations of test batch {b} (examples {b * step}..) are all zero; "
                         "its normalised error is undefined")
    return sum(a / b for a, b in zip(nums, dens)) / len(nums)


class DMStruct(SimilarityIndex):
    """DM(struct): normalised error of the DM approximation of the target, ‖T(f(x)) − g(x)‖²_F / ‖g(x)‖²_F.

    T is the direct-matching stitching layer (plugin ``dm``: least squares with a bias,
    bilinear resize for conv maps of different sizes). In a run, T is fitted on ``k``
    training images drawn in the run's fixed order (the same images DM uses) and the error is
    measured on the first ``indices.n_examples`` test images. ``reduction="pooled"`` (the
    default) takes one ratio of sums over all of them; ``reduction="per_batch"`` is the
    authors' code (``stitched_repr_diff`` in ``exec_stitch.py``): the unweighted mean of
    per-batch ratios over consecutive batches of ``batch_size`` test images, the last one
    partial. ``compute(A, B)`` on arrays fits and measures on the same rows (an in-sample
    error), with the same reduction. A distance: 0 means the target is exactly an affine
    image of the source; 1 is what T = 0 would give; lower is more similar.
    """

    name = "dm_struct"
    higher_is_more_similar = False
    needs_train_activations = True
    symmetric = False  # T maps the source onto the target

    class Params(Params):
        k: int = 100  # training images T is fitted on (as DM's K)
        reduction: Literal["pooled", "per_batch"] = Field(
            "pooled", description="pooled: one ratio of sums over the test examples; "
            "per_batch: the mean of per-batch ratios (the authors' code)")
        batch_size: PositiveInt = Field(
            AUTHORS_BATCH_SIZE, description="test examples per batch of reduction=per_batch "
            "(the authors': 256, the last batch partial); no effect on pooled")
        cutoff: Literal["exact", "authors"] = Field(
            "exact", description="how T is solved: the dm plugin's cutoff (authors: float32 pinv with torch's "
            "default tolerance, as the authors' DM(struct) fits its stitcher)")

    def _dm_params(self, p: Any) -> Any:
        dm = stitchbench.get_plugin("dm")
        return dm.Params.model_validate({"cutoff": p.cutoff})

    def _params(self, params: Any) -> Any:
        if params is None:
            return self.Params()
        if isinstance(params, self.Params):
            return params
        return self.Params.model_validate(params.model_dump() if isinstance(params, Params) else params)

    def compute(self, A: Any, B: Any, params: Any = None) -> float:
        p = self._params(params)
        X, Y = _as_tensor(A), _as_tensor(B)
        if X.shape[0] != Y.shape[0]:
            raise ValueError(f"DM(struct) needs the same examples on both sides: shapes {tuple(X.shape)} and {tuple(Y.shape)}")
        T = stitchbench.get_plugin("dm").fit_activations(X, Y, self._dm_params(p))
        return normalised_error(T, X, Y, p.reduction, p.batch_size)

    def matrix(self, sources: Sequence[Any], targets: Sequence[Any], context: IndexContext):
        import numpy as np

        dm = stitchbench.get_plugin("dm")
        p = self._params(context.params)
        if context.train_sample is None:
            raise ValueError("DM(struct) needs training activations (the core passes them in a run)")
        train_src = context.train_sample("source", p.k)
        train_tgt = train_src if context.same_network else context.train_sample("target", p.k)
        test_src = [_as_tensor(a) for a in sources]
        test_tgt = test_src if targets is sources else [_as_tensor(b) for b in targets]
        dm_params = self._dm_params(p)
        out = np.empty((len(sources), len(targets)))
        for i in range(len(sources)):
            for j in range(len(targets)):
                T = dm.fit_activations(_as_tensor(train_src[i]), _as_tensor(train_tgt[j]), dm_params)
                out[i, j] = normalised_error(T, test_src[i], test_tgt[j], p.reduction, p.batch_size)
        return out


@stitchbench.hookimpl
def register_similarity_indices(register):
    register(DMStruct())
