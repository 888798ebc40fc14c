"""ResNet-18 with the CIFAR stem, as a `StitchableNetwork` (torch model code of the
``resnet18`` plugin).

Shapes for a (N, C, 32, 32) input and width ``w``: stem -> (N, w, 32, 32); the eight
stitchable blocks ``layer1.0 .. layer4.1`` -> (N, w, 32, 32) x2, (N, 2w, 16, 16) x2,
(N, 4w, 8, 8) x2, (N, 8w, 4, 4) x2; head -> (N, num_classes). Other input sizes work too
(the head pools globally); each stride-2 stage halves the spatial size (rounding up).
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


class PoolLinearHead(nn.Module):
    """Global average pooling + flatten + linear: (N, C, H, W) -> (N, num_classes).

    At 32x32 inputs the last stage is 4x4, so this equals the original ``avg_pool2d(x, 4)``.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class CifarResNet18(StitchableNetwork):
    """ResNet-18 for small images: CIFAR stem, 4 stages x 2 `BasicBlock` (strides 1, 2, 2, 2)
    of widths w, 2w, 4w, 8w, global average pooling and a linear classifier.

    Input (N, in_channels, H, W) -> logits (N, num_classes). The eight blocks are the
    stitchable layers (``LAYER_NAMES``).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        if width < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"width, num_classes and in_channels must be >= 1 (got {width}, {num_classes}, {in_channels})"
            )
        self.layer_names = list(LAYER_NAMES)
        self.stem = CifarStem(in_channels, width)
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
