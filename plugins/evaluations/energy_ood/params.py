"""Parameters of ``energy_ood`` (defaults: the authors' detectors and training, see
docs/ood.md)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

import stitchbench
from stitchbench import Params


class AuxiliaryParams(Params):
    """The auxiliary OOD set: any registered dataset plugin, usually an ``auxiliary`` one."""

    name: str = Field("noise", description="dataset plugin of the auxiliary OOD images")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="its params; a set with an `image_shape` param gets the in-distribution set's shape unless given",
    )

    @model_validator(mode="after")
    def _known_set(self) -> AuxiliaryParams:
        try:
            obj = stitchbench.get_plugin(self.name, "dataset")
        except stitchbench.StitchbenchError as e:
            raise ValueError(f"auxiliary set {self.name!r}: {e}") from None
        try:
            obj.Params.model_validate(self.params or {})
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()
            )
            raise ValueError(f"invalid params for the auxiliary set {self.name!r}: {problems}") from None
        return self


class PretrainParams(Params):
    """Cross-entropy pre-training on the layer's activations with the images' labels."""

    epochs: int = Field(100, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    augment: bool = Field(
        True,
        description="apply the dataset's training augmentation (if it has one); the activations are then "
        "computed batch by batch through the frozen network",
    )


class FinetuneParams(Params):
    """Energy-margin fine-tuning (Liu et al. 2020) with auxiliary OOD activations.

    ``recipe`` picks the optimisation: ``liu`` (Liu et al.'s: the optimizer fields below,
    cosine schedule, an epoch is a pass over the ID set) or ``authors`` (the authors'
    ``exec_train_representation_classifier.py``: Adam with pre-training's lr and weight
    decay, MultiStepLR x0.1 at iteration ``epochs // 2`` stepped per iteration, batches of
    half ``batch_size`` ID + half auxiliary, an epoch of ``min(#ID, #aux)`` examples of each
    in disjoint subsets, unaugmented ID and flipped/cropped auxiliary images); see docs/ood.md.
    """

    recipe: Literal["liu", "authors"] = Field(
        "liu",
        description="liu: Liu et al.'s SGD + cosine schedule; authors: the authors' Adam + per-iteration "
        "MultiStepLR, half/half batches, epoch of min(#ID, #aux) (ignores optimizer, lr, momentum, "
        "weight_decay, aux_batch_size)",
    )
    epochs: int = Field(20, ge=0)
    m_in: float = Field(-25.0, description="margin: in-distribution energies are pushed below it")
    m_out: float = Field(-7.0, description="margin: auxiliary OOD energies are pushed above it")
    weight: float = Field(0.1, ge=0, description="weight of the energy-margin term")
    batch_size: int | None = Field(
        None, ge=1,
        description="ID batch size (null: pretrain.batch_size); recipe authors: the combined batch, half ID, half auxiliary",
    )
    aux_batch_size: int | None = Field(None, ge=1, description="auxiliary batch size (null: the ID batch size)")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="Liu et al.: SGD, Nesterov momentum 0.9")
    lr: float = Field(1e-3, gt=0, description="initial learning rate (cosine schedule to 0); recipe liu only")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only")
    weight_decay: float = Field(5e-4, ge=0)
    freeze_batchnorm: bool = Field(
        False,
        description="keep BatchNorm statistics from pre-training (Liu et al. update them on the mixed ID/OOD batches)",
    )


class ResNetDetectorParams(Params):
    """Detector of conv activations: width 64, 4 stages x 2 blocks, 32x32 input is ResNet-18 as the authors use."""

    width: int = Field(64, ge=1, description="channels of the first stage (stages: w, 2w, 4w, 8w)")
    stages: int = Field(4, ge=1, le=4)
    blocks: int = Field(2, ge=1, description="residual blocks per stage")
    upsample_to: int | None = Field(32, ge=1, description="bilinear resize of the input to this size (null: as it comes)")


class ViTDetectorParams(Params):
    """Detector of token activations: ViT blocks reading token 0 (the authors: 12 ViT-Ti blocks)."""

    width: int | None = Field(None, ge=1, description="token width (null: the layer's; else a linear projection first)")
    depth: int = Field(12, ge=1)
    num_heads: int = Field(3, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)


class EnergyOODParams(Params):
    auxiliary: AuxiliaryParams = Field(default_factory=AuxiliaryParams)
    pretrain: PretrainParams = Field(default_factory=PretrainParams)
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)
    resnet: ResNetDetectorParams = Field(default_factory=ResNetDetectorParams)
    vit: ViTDetectorParams = Field(default_factory=ViTDetectorParams)
    temperature: float = Field(1.0, gt=0, description="T of the energy -T logsumexp(logits / T) used for scoring")
    n_examples: int | None = Field(None, ge=2, description="score the first n test images (null: the whole test split)")
    figure_layer: int | str = Field(0, description="target layer of the Fig. 1c plot (index into the run's layers, or a name)")
    figure_scope: Literal["intra", "inter"] = "intra"
    min_sanity_auroc: float = Field(
        0.9, ge=0, le=1, description="warn when a detector separates ID from held-out auxiliary data worse than this"
    )
    high_accuracy_threshold: float = Field(
        0.9, description="relative accuracy from which an off-diagonal cell counts as a high-accuracy stitch "
        "(the conditional statistic `ood.high_accuracy`)",
    )
    ood_auroc: float = Field(
        0.9, ge=0, le=1,
        description="a cell whose AUROC exceeds this counts as out of distribution (`fraction_ood`)",
    )
    eval_batch_size: int = Field(256, ge=1)
    memory_limit_mb: int = Field(
        2048, ge=0, description="hold a split's activations (all layers) in memory up to this size, else stream them"
    )
    heatmaps: bool = Field(True, description="also log one AUROC heat map per stitching matrix")
