"""The ``dm`` matcher: direct matching (paper section 2.1, eq. 2-3).

T is the affine map (1x1 convolution after the resize, or per-token linear map) that best
reproduces the target layer's activations from the source layer's, in least squares over
K training images, every spatial position or token one equation. Solved in float64 by
`._lstsq` (streaming; memory independent of K), or, with ``cutoff: authors``, as the
authors' code solves it (float32 ``torch.linalg.pinv`` with its default tolerance, on the
same rows); see docs/matchers.md.

Torch is imported inside the methods: ``stitchbench plugins list`` imports this module.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

import stitchbench
from stitchbench import Cost, DatasetInfo, Matcher, Params

if TYPE_CHECKING:
    import torch

    from stitchbench import StitchingLayer, StitchingProblem

    from ._lstsq import LeastSquaresFit

log = logging.getLogger(__name__)


class DirectMatching(Matcher):
    """Direct matching: minimum-norm least-squares affine map from source to target activations
    (float64; or the authors' float32 pinv with ``cutoff: authors``)."""

    name = "dm"
    measure_name = "dm_func"  # relative accuracy through a DM stitcher (dm_struct is the structural side)

    class Params(Params):
        k: Annotated[int, Field(ge=1)] | Literal["all"] = Field(
            100,
            description="training images in the sample (first K of the run's fixed random order, no "
            "augmentation); every position or token is one equation. 'all' = the whole training split",
        )
        batch_size: int = Field(
            256, ge=1, description="images per batch when computing or feeding activations"
        )
        rank: int | None = Field(
            None,
            ge=1,
            description="low-rank approximation of the source (before solving, and at evaluation through "
            "a fixed projection); null or >= channels = none",
        )
        target_rank: int | None = Field(
            None, ge=1, description="low-rank approximation of the target before solving; null = none"
        )
        solver: Literal["qr", "gram"] = Field(
            "qr",
            description="qr: streaming QR of [1, X, Y] (as accurate as pinv); gram: centred normal "
            "equations (faster, squares the condition number)",
        )
        rcond: float | None = Field(
            None,
            gt=0,
            lt=1,
            description="relative cut-off on singular values; null = eps*max(rows, cols) (qr) or "
            "sqrt(eps*max(rows, cols)) (gram), float32 eps*max(rows, cols) (cutoff: authors)",
        )
        cutoff: Literal["exact", "authors"] = Field(
            "exact",
            description="exact: the float64 solve of `solver`, keeping essentially every singular value; "
            "authors: the authors' solve (szegedai/stitching-ood ps_inv): float32 torch.linalg.pinv of "
            "the same rows [X, 1] with torch's default tolerance (singular values <= float32 "
            "eps*max(rows, cols)*s_max dropped); keeps every row in memory, `solver` is not used",
        )
        cache_limit_mb: float = Field(
            1024,
            ge=0,
            description="take the run's cached activations when the K images' source and target "
            "activations fit in this many MiB; stream over images otherwise (and always for k='all')",
        )

    # -- the matcher interface ----------------------------------------------------------
    def estimate_cost(self, params: Any, info: DatasetInfo) -> Cost:
        """A forward pass of both networks over the k fitting images, one stitched pass
        over the test split; the least-squares solve is small next to them."""
        p = self.Params.model_validate(params or {}) if not isinstance(params, self.Params) else params
        k = info.n_train if p.k == "all" else min(int(p.k), info.n_train)
        return Cost(forward_images=k + info.n_test)

    def fit(self, problem: StitchingProblem, params: Any = None) -> StitchingLayer:
        """T for (problem.source, source_layer) -> (problem.target, target_layer).

        Source rows are the input of the affine map (after the bilinear resize,
        `StitchingLayer.prepare`); target rows are the target layer's outputs in the
        unstitched target network; both networks in eval mode, no gradients.
        """
        import torch

        params = self.Params.model_validate(params if params is not None else {})
        layer = problem.new_layer()
        acc = self._accumulator(params, layer, problem.device)
        n_train = len(problem.data.train)
        k = n_train if params.k == "all" else params.k
        per_image = 4 * (math.prod(problem.source_shape) + math.prod(problem.target_shape))
        stream = params.k == "all" or k * per_image > params.cache_limit_mb * 2**20

        source, target = problem.source, problem.target
        with eval_mode(source, target), torch.no_grad():
            if not stream:
                X = problem.activations(source, problem.source_layer, "train_sample", k)
                Y = problem.activations(target, problem.target_layer, "train_sample", k)
                _feed(acc, layer, X, Y, params.batch_size)
            else:
                if params.k == "all":
                    from stitchbench import iterate_batches

                    # A sum over every training image does not depend on the order.
                    batches = (x for x, _ in iterate_batches(problem.data.train, params.batch_size))
                else:
                    images, _ = problem.sample_images(k)
                    batches = (images[i : i + params.batch_size] for i in range(0, k, params.batch_size))
                for x in _progress(batches, math.ceil(k / params.batch_size), "dm: streaming activations"):
                    x = x.to(problem.device)
                    if source is target:
                        acts = source.activations(x, [problem.source_layer, problem.target_layer])
                        xs, yt = acts[problem.source_layer], acts[problem.target_layer]
                    else:
                        xs = source.front(x, problem.source_layer)
                        yt = target.front(x, problem.target_layer)
                    _feed(acc, layer, xs, yt, params.batch_size)

        fit = acc.solve(params.rcond, params.rank, params.target_rank)
        _install(layer, fit, params, k=k)
        log.info(
            "dm %s -> %s: K=%d images, %d rows, rank %d, normalised residual %.6g",
            problem.source_layer,
            problem.target_layer,
            k,
            fit.n_rows,
            fit.rank,
            fit.residual,
        )
        return layer

    def fit_activations(self, X: Any, Y: Any, params: Any = None) -> StitchingLayer:
        """T with T(X) ≈ Y, from activations already at hand.

        ``X`` (N, C1, H1, W1) and ``Y`` (N, C2, H2, W2), or (N, T, D1) and (N, T, D2); torch
        tensors or numpy arrays. All N examples are used (``k`` is ignored); ``rank``,
        ``target_rank``, ``solver``, ``rcond`` and ``cutoff`` apply. Returns a `StitchingLayer` on X's
        device, in X's dtype when that is float32 or float64 (float32 otherwise), with
        ``fit_info`` (residual etc.).
        """
        import torch

        from stitchbench import StitchingLayer

        params = self.Params.model_validate(params if params is not None else {})
        X = torch.as_tensor(X)
        Y = torch.as_tensor(Y)
        if X.shape[0] != Y.shape[0]:
            raise ValueError(f"X has {X.shape[0]} examples but Y has {Y.shape[0]}")
        if X.shape[0] == 0:
            raise ValueError("X and Y hold no examples")
        layer = StitchingLayer(X.shape[1:], Y.shape[1:]).to(X.device)
        acc = self._accumulator(params, layer, X.device)
        _feed(acc, layer, X, Y.to(X.device), params.batch_size)
        fit = acc.solve(params.rcond, params.rank, params.target_rank)
        _install(layer, fit, params, k=X.shape[0])
        if X.dtype == torch.float64:
            layer.double()
        log.debug(
            "dm.fit_activations: %d rows, rank %d, normalised residual %.6g",
            fit.n_rows,
            fit.rank,
            fit.residual,
        )
        return layer

    @staticmethod
    def _accumulator(params: Params, layer: StitchingLayer, device: Any):
        from ._lstsq import make_accumulator

        return make_accumulator(
            params.solver,
            layer.in_features,
            layer.out_features,
            device,
            target_rank=params.target_rank,
            cutoff=params.cutoff,
        )


@contextlib.contextmanager
def eval_mode(*nets: torch.nn.Module) -> Iterator[None]:
    """Eval mode within the block; afterwards each network's mode is what it was (the same
    network may be given twice)."""
    modes = [(net, net.training) for net in nets]
    try:
        for net in nets:
            net.eval()
        yield
    finally:
        for net, mode in reversed(modes):
            net.train(mode)


def _feed(acc, layer: StitchingLayer, X: torch.Tensor, Y: torch.Tensor, batch_size: int) -> None:
    """Add the equations of X, Y (examples in chunks of ``batch_size``) to ``acc``, in float64
    (an ``authors`` accumulator stores them as float32).

    The resize runs in float64 too; X is the raw source activation, so the rows are
    exactly the input of the affine map.
    """
    import torch

    from stitchbench import to_rows

    for start in range(0, X.shape[0], batch_size):
        x = X[start : start + batch_size].to(torch.float64)
        y = Y[start : start + batch_size].to(torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError("dm: the source activations contain NaN or inf")
        if not torch.isfinite(y).all():
            raise ValueError("dm: the target activations contain NaN or inf")
        acc.update(to_rows(layer.prepare(x)), to_rows(y))


def _install(layer: StitchingLayer, fit: LeastSquaresFit, params: Params, *, k: int) -> None:
    """Set the solved map (and the fixed low-rank projection, if any) on ``layer``."""
    layer.set_affine(fit.weight, fit.bias)
    if fit.projection is not None:
        from stitchbench import LowRankProjection

        mean, basis = fit.projection
        layer.source_transform = LowRankProjection(mean, basis).to(layer.affine.weight.device)
    layer.fit_info = {
        "matcher": "dm",
        "residual": fit.residual,
        "residual_uncentred": fit.residual_uncentred,
        "rank": fit.rank,
        "rows": fit.n_rows,
        "k": int(k),
        "solver": "pinv_float32" if params.cutoff == "authors" else params.solver,
        "cutoff": params.cutoff,
        "rcond": fit.cutoff,
        "source_rank": None if fit.projection is None else int(fit.projection[1].shape[1]),
        "target_rank": params.target_rank,
    }


def _progress(it, total: int, desc: str):
    from stitchbench import progress_bar

    return progress_bar(iterable=it, total=total, desc=desc, unit="batch")


@stitchbench.hookimpl
def register_matchers(register):
    register(DirectMatching())
