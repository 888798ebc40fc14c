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

from stitchbench.network import StitchableNetwork

#: Names of the stitchable layers, in order (those of torchvision's and the paper's code).
LAYER_NAMES = [f"layer{stage}.{k}" for stage in range(1, 5) for k in range(2)]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class StridedPointwiseConv(nn.Conv2d):
    """1x1 convolution with a stride, computed as subsampling then a stride-1 1x1 conv.

    The same function and parameters as ``nn.Conv2d(kernel_size=1, stride=s)``. Why: on
    CPU, oneDNN's weight gradient of a strided 1x1 convolution (torch 2.14) is not
    deterministic, and with one thread it corrupted the heap; this form gives
    bit-identical training across processes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, stride=1, bias=False)
        self.step = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step != 1:
            x = x[:, :, :: self.step, :: self.step]
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", subsample={self.step}"


class BasicBlock(nn.Module):
    """The two-conv residual block of ResNet-18: (N, C_in, H, W) -> (N, C_out, H/s, W/s).

    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is a strided 1x1
    conv + BN when the shape changes, else the identity. The output is taken after the
    final ReLU, which is what the stitching experiments call the block's representation.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                StridedPointwiseConv(in_channels, out_channels, stride),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


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
