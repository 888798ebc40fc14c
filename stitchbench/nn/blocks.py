"""Building blocks that more than one plugin uses (timm's ``layers``, in small): the
residual block of ResNet-18 and its convolutions, public as `stitchbench.BasicBlock` and
`stitchbench.conv3x3`. A plugin whose results depend on them puts their code in its job
keys (`stitchbench.code_version` of this module), so a change here is never answered with
results computed by the old blocks."""

from __future__ import annotations

import torch
from torch import nn


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
