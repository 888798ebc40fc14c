"""ResNet-18 with the CIFAR or the ImageNet stem, as a `StitchableNetwork` (torch model
code of the ``resnet18`` plugin).

CIFAR stem (the authors' ``general_utils/models/resnet/resnet.py``): 3x3 stride-1 conv +
BN + ReLU, no max-pool. Shapes for a (N, C, 32, 32) input and width ``w``: stem ->
(N, w, 32, 32); the eight stitchable blocks ``layer1.0 .. layer4.1`` -> (N, w, 32, 32) x2,
(N, 2w, 16, 16) x2, (N, 4w, 8, 8) x2, (N, 8w, 4, 4) x2; head -> (N, num_classes).

ImageNet stem (torchvision's ``resnet18``): 7x7 stride-2 conv (padding 3, no bias) + BN +
ReLU + 3x3 stride-2 max-pool (padding 1), a factor 4 smaller: at 224x224 the stem gives
(N, w, 56, 56) and the blocks (w, 56, 56) x2, (2w, 28, 28) x2, (4w, 14, 14) x2,
(8w, 7, 7) x2.

Other input sizes work too (the head pools globally); each stride-2 step halves the
spatial size (rounding up).
"""

from __future__ import annotations

import torch
from torch import nn

from stitchbench import BasicBlock, StitchableNetwork, conv3x3

#: Names of the stitchable layers, in order (those of torchvision's and the paper's code).
LAYER_NAMES = [f"layer{stage}.{k}" for stage in range(1, 5) for k in range(2)]


class CifarStem(nn.Sequential):
    """3x3 stride-1 conv + BN + ReLU, no max-pool: (N, C, H, W) -> (N, w, H, W)."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__(conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True))


class ImageNetStem(nn.Sequential):
    """torchvision's ResNet stem: 7x7 stride-2 conv (padding 3, no bias) + BN + ReLU + 3x3
    stride-2 max-pool (padding 1): (N, C, H, W) -> (N, w, ceil(ceil(H/2)/2), ...)."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )


#: The stems by the ``stem`` parameter's value.
STEMS = {"cifar": CifarStem, "imagenet": ImageNetStem}


class PoolLinearHead(nn.Module):
    """Global average pooling + flatten + linear: (N, C, H, W) -> (N, num_classes).

    At 32x32 inputs the last stage is 4x4, so this equals the original ``avg_pool2d(x, 4)``.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ResNet18Net(StitchableNetwork):
    """ResNet-18: a stem (``"cifar"`` or ``"imagenet"``, see `STEMS`), 4 stages x 2
    `BasicBlock` (strides 1, 2, 2, 2) of widths w, 2w, 4w, 8w, global average pooling and a
    linear classifier.

    Input (N, in_channels, H, W) -> logits (N, num_classes). The eight blocks are the
    stitchable layers (``LAYER_NAMES``). The stem's state-dict keys are ``stem.0`` (conv)
    and ``stem.1`` (BN) for both stems.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64, stem: str = "cifar") -> None:
        super().__init__()
        if width < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"width, num_classes and in_channels must be >= 1 (got {width}, {num_classes}, {in_channels})"
            )
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; use one of {', '.join(STEMS)}")
        self.layer_names = list(LAYER_NAMES)
        self.stem_kind = stem
        self.stem = STEMS[stem](in_channels, width)
        blocks: list[nn.Module] = []
        channels = width
        for stage, stride in enumerate((1, 2, 2, 2)):
            out_channels = width * 2**stage
            blocks.append(BasicBlock(channels, out_channels, stride))
            blocks.append(BasicBlock(out_channels, out_channels, 1))
            channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.head = PoolLinearHead(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's ResNet init: Kaiming-normal convs (fan_out, ReLU), BN at identity;
        # the linear layer keeps torch's default init.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


#: The former name (the class built only the CIFAR stem then).
CifarResNet18 = ResNet18Net
