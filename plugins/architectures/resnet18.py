"""The ``resnet18`` architecture plugin: ResNet-18 with the CIFAR stem (the default) or
torchvision's ImageNet stem (``stem: imagenet``).

The torch model code lives in `._resnet` and is imported inside `build`, so listing
plugins does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

import stitchbench
from stitchbench import ArchitecturePlugin, Params

if TYPE_CHECKING:
    from ._resnet import ResNet18Net


class ResNet18(ArchitecturePlugin):
    """ResNet-18 with 8 stitchable residual blocks; CIFAR stem (3x3 conv) or ImageNet stem (7x7/2 + max-pool).

    ``stem: cifar`` (default): 3x3 stride-1 conv, no max-pool. ``stem: imagenet``:
    torchvision's 7x7 stride-2 conv and 3x3 stride-2 max-pool.
    """

    name = "resnet18"

    class Params(Params):
        #: Channels of the first stage; the stages have w, 2w, 4w, 8w (the paper: 64).
        width: int = Field(64, ge=1, description="channels of the first stage; stages are w, 2w, 4w, 8w")
        stem: Literal["cifar", "imagenet"] = Field(
            "cifar",
            description="cifar: 3x3 stride-1 conv + BN + ReLU, no max-pool (the authors' CIFAR/SVHN "
            "networks); imagenet: torchvision's 7x7 stride-2 conv + BN + ReLU + 3x3 stride-2 max-pool "
            "(the paper's ImageNet ResNet-18; 224x224 -> 56x56 after the stem)",
        )

    def build(self, params: Params, num_classes: int, image_shape: tuple[int, int, int]) -> ResNet18Net:
        """A freshly initialised network for images of ``image_shape`` = (C, H, W).

        Layers ``layer1.0 .. layer4.1``; with the CIFAR stem at 32x32 their outputs are
        (w, 32, 32) x2, (2w, 16, 16) x2, (4w, 8, 8) x2, (8w, 4, 4) x2; with the ImageNet stem
        at 224x224, (w, 56, 56) x2, (2w, 28, 28) x2, (4w, 14, 14) x2, (8w, 7, 7) x2.
        """
        from ._resnet import ResNet18Net

        params = self.Params.model_validate(params if params is not None else {})
        return ResNet18Net(
            num_classes=num_classes, in_channels=int(image_shape[0]), width=params.width, stem=params.stem
        )

    def tag(self, params: Params) -> str:
        """``resnet18-w<width>`` for the CIFAR stem (the names of existing networks),
        ``resnet18-w<width>-in`` for the ImageNet stem."""
        params = self.Params.model_validate(params if params is not None else {})
        return f"resnet18-w{params.width}" + ("-in" if params.stem == "imagenet" else "")


@stitchbench.hookimpl
def register_architectures(register):
    register(ResNet18())
