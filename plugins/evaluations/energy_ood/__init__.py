"""Energy-based OOD analysis of stitched representations (paper Section 4, Fig. 1b/1c,
Fig. 2); see docs/ood.md.

For every target (network, layer) of the run's stitching matrices, a dedicated detector
network is trained on that layer's activations (Liu et al. 2020: cross-entropy
pre-training with the images' labels, then fine-tuning with an energy-margin loss against
the activations of an auxiliary OOD set), registered in the MLflow model registry and
reused by key. Each detector then scores, for every cell (i, j) of every stitching matrix,
how well its energies separate the target activations g<=j(x) (in distribution, the
positive class) from the stitched activations T(f<=i(x)) of the same test images: AUROC
0.5 means the stitched representation is in distribution, 1.0 that it is fully separable.
The paper's finding is read off the high-accuracy stitches: per matcher and scope, the mean
AUROC and the fraction of AUROCs above `ood_auroc` over the off-diagonal cells whose
relative accuracy reaches `high_accuracy_threshold`, and the correlation of relative
accuracy with AUROC (`ood.high_accuracy.<matcher>.<scope>`).

The package: `params` (the parameters), `detectors` (the detector networks), `training`
(training one detector, as a task), `metrics` (energies, AUROC/AUPR/FPR@95), `analysis`
(one run of the evaluation), `figures` and `report`. Only `params` is imported with the
plugin (no torch: listing plugins imports this module).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import stitchbench
from stitchbench import Cost, Evaluation, EvaluationResult, PlanSummary

from .params import EnergyOODParams

if TYPE_CHECKING:
    from stitchbench import RunContext


class EnergyOOD(Evaluation):
    """Section 4 / Fig. 2: AUROC of an energy-based OOD detector per target layer, for every stitching cell."""

    name = "energy_ood"
    summarises_matrices = False
    Params = EnergyOODParams
    #: tiny detectors for `stitchbench plugins check` (seconds, not the paper's hours)
    check_params: ClassVar[dict[str, Any]] = {
        "auxiliary": {"params": {"n_train": 64, "n_test": 48}},
        "pretrain": {"epochs": 1}, "finetune": {"epochs": 1},
        "resnet": {"width": 4, "stages": 1, "blocks": 1, "upsample_to": None}, "vit": {"depth": 1, "num_heads": 1},
    }

    def estimate_cost(self, params: Any, plan: PlanSummary) -> list[Cost]:
        """Detectors counted as networks of the run's architecture (the paper's detectors
        are ResNet-18s on activations upsampled to 32x32): pre-training epochs over the
        training split, fine-tuning epochs over it with as many auxiliary images, the
        activations recomputed per epoch when augmented; then one detector pass per test
        image and stitching cell."""
        p = params if isinstance(params, EnergyOODParams) else EnergyOODParams.model_validate(params or {})
        n, layers = plan.info.n_train, len(plan.layers)
        detectors = max(plan.stitch_targets.values(), default=0) * layers
        if not detectors:
            return []
        epochs = p.pretrain.epochs + p.finetune.epochs
        per_detector = Cost(
            train_images=(p.pretrain.epochs + 2 * p.finetune.epochs) * n,
            forward_images=(epochs if p.pretrain.augment else 1) * n + p.finetune.epochs * n,
        )
        cells = sum(plan.stitch_matrices.values()) * layers**2
        return [
            Cost(train_images=detectors * per_detector.train_images,
                 forward_images=detectors * per_detector.forward_images, jobs=detectors,
                 what="OOD detectors (pre-train + fine-tune)"),
            Cost(forward_images=cells * plan.info.n_test, jobs=cells, what="OOD scores of stitched activations"),
        ]

    def run(self, context: RunContext, params: Any) -> EvaluationResult:
        p = params if isinstance(params, EnergyOODParams) else EnergyOODParams.model_validate(params or {})
        records = [m for m in context.matrices if m.functional and m.stitcher_state is not None]
        if not records:
            text = (
                "Energy-based OOD analysis (Section 4): this run has no stitching matrices, so there is "
                "nothing to analyse; add a matcher (e.g. --plugin dm --plugin tlm)."
            )
            return EvaluationResult(report_key="ood", report=None, report_text=text)
        from .analysis import Analysis

        return Analysis(context, p, records).run()


@stitchbench.hookimpl
def register_evaluations(register):
    register(EnergyOOD())
