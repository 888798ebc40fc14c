"""The ``resnet18`` architecture plugin: ResNet-18 with the CIFAR stem.

The torch model code lives in `._resnet` and is imported inside `build`, so listing
plugins does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

import stitchbench
from stitchbench import ArchitecturePlugin, Params

if TYPE_CHECKING:
    from ._resnet import CifarResNet18


class ResNet18(ArchitecturePlugin):
    """ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool); 8 stitchable residual blocks."""

    name = "resnet18"

    class Params(Params):
        #: Channels of the first stage; the stages have w, 2w, 4w, 8w (the paper: 64).
        width: int = Field(64, ge=1, description="channels of the first stage; stages are w, 2w, 4w, 8w")

    def build(self, params: Params, num_classes: int, image_shape: tuple[int, int, int]) -> CifarResNet18:
        """A freshly initialised network for images of ``image_shape`` = (C, H, W).

        Layers ``layer1.0 .. layer4.1``; at 32x32 their outputs are (w, 32, 32) x2,
        (2w, 16, 16) x2, (4w, 8, 8) x2, (8w, 4, 4) x2.
        """
        from ._resnet import CifarResNet18

        params = self.Params.model_validate(params if params is not None else {})
        return CifarResNet18(num_classes=num_classes, in_channels=int(image_shape[0]), width=params.width)

    def tag(self, params: Params) -> str:
        params = self.Params.model_validate(params if params is not None else {})
        return f"resnet18-w{params.width}"


@stitchbench.hookimpl
def register_architectures(register):
    register(ResNet18())
