# docs/examples/ridge_matcher.py
"""The ``ridge`` matcher: direct matching with an L2 penalty (ridge regression).

T(x) = W x + b minimises  sum_r ||W x_r + b - y_r||^2 / R + lam ||W||_F^2  over the R rows
of K training images (one row per image and spatial position, or per token): x_r is the
source layer's activation resized to the target's spatial size (`StitchingLayer.prepare`),
y_r the target layer's. lam = alpha * the mean variance of the source channels, so alpha
does not depend on the activations' scale. Solved in float64 from the normal equations.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

import stitchbench


class Ridge(stitchbench.Matcher):
    """Ridge-regularised least-squares stitching: direct matching with an L2 penalty on W."""

    name = "ridge"

    class Params(stitchbench.Params):
        k: int = Field(100, ge=1, description="training images the map is fitted on")
        alpha: float = Field(1e-3, gt=0, description="penalty, relative to the mean source variance")

    check_params: ClassVar[dict[str, Any]] = {"k": 20}

    def fit(self, problem: stitchbench.StitchingProblem, params: Params) -> stitchbench.StitchingLayer:
        import torch

        layer = problem.new_layer()  # the affine map for the two shapes, on problem.device
        k = min(params.k, len(problem.data.train))
        with torch.no_grad():
            # the same k training images (the run's fixed random order) through both networks
            src = problem.activations(problem.source, problem.source_layer, "train_sample", k)
            tgt = problem.activations(problem.target, problem.target_layer, "train_sample", k)
            X = stitchbench.to_rows(layer.prepare(src)).double()  # (R, in)
            Y = stitchbench.to_rows(tgt).double()  # (R, out), rows in the same order
            mx, my = X.mean(0), Y.mean(0)
            Xc, Yc = X - mx, Y - my
            cov = Xc.T @ Xc / len(X)  # (in, in)
            scale = float(cov.trace()) / len(cov)
            if scale == 0:
                raise ValueError(f"source layer {problem.source_layer} is constant on the {k} images")
            lam = params.alpha * scale
            eye = torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
            W = torch.linalg.solve(cov + lam * eye, Xc.T @ Yc / len(X)).T  # (out, in)
            b = my - W @ mx
            total = float((Yc**2).sum())
            residual = float(((Xc @ W.T - Yc) ** 2).sum()) / total if total else 0.0
        layer.set_affine(W.float(), b.float())
        # JSON-able facts about the fit, kept with the matrix as matrix/fit_info.json
        layer.fit_info = {"k": k, "rows": len(X), "lambda": lam, "relative_residual": residual}
        return layer

    def estimate_cost(self, params: Params, info: stitchbench.DatasetInfo) -> stitchbench.Cost:
        """For `--dry-run`: both networks over the k images, the stitched one over the test split."""
        return stitchbench.Cost(forward_images=min(params.k, info.n_train) + info.n_test)


@stitchbench.hookimpl
def register_matchers(register):
    register(Ridge())
