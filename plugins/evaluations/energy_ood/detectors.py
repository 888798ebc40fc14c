"""The detector networks of ``energy_ood``: classifiers whose input is a stitchable layer's
activation instead of an image (paper Section 4, "a dedicated OOD detector for each
layer").

- `ConvDetector` for conv activations (N, C, H, W): a CIFAR-style ResNet (3x3 stem conv
  taking the layer's C channels, stages of `stitchbench.BasicBlock`, global average
  pooling, linear head). ``upsample_to`` resizes the input bilinearly to a square size
  first (the authors upsample every layer to 32x32 and use a full ResNet-18: width 64,
  4 stages x 2 blocks).
- `TokenDetector` for token activations (N, T, D): a stack of ViT blocks with no patch
  embedding, no position embedding and no new class token; the head (final LayerNorm +
  linear) reads the incoming token 0. When the detector's width differs from D, a linear
  projection maps the tokens to it first.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import stitchbench
from stitchbench import BasicBlock, conv3x3

from .params import EnergyOODParams

#: Bump when a change outside the code that `detector_code_version` hashes would change
#: what a trained detector is.
DETECTOR_VERSION = 1


class ConvDetector(nn.Module):
    """ResNet-style classifier of conv activations: (N, C, H, W) -> logits (N, num_classes).

    Stem: 3x3 conv (C -> w) + BN + ReLU; ``stages`` stages of ``blocks`` `BasicBlock`s with
    widths w, 2w, 4w, 8w and strides 1, 2, 2, 2; global average pooling; linear head.
    ``width=64, stages=4, blocks=2`` is ResNet-18. ``upsample_to`` (optional) first resizes
    the input bilinearly to (upsample_to, upsample_to) when its spatial size differs.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        width: int = 64,
        stages: int = 4,
        blocks: int = 2,
        upsample_to: int | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= stages <= 4:
            raise ValueError(f"a ResNet-style detector has 1 to 4 stages, got {stages}")
        if width < 1 or blocks < 1 or in_channels < 1 or num_classes < 1:
            raise ValueError("width, blocks, in_channels and num_classes must be >= 1")
        self.upsample_to = upsample_to
        self.stem = nn.Sequential(conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        channels = width
        for stage, stride in enumerate((1, 2, 2, 2)[:stages]):
            out = width * 2**stage
            for k in range(blocks):
                layers.append(BasicBlock(channels, out, stride if k == 0 else 1))
                channels = out
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample_to is not None and tuple(x.shape[-2:]) != (self.upsample_to, self.upsample_to):
            x = F.interpolate(x, size=(self.upsample_to, self.upsample_to), mode="bilinear", align_corners=False)
        h = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class TokenDetector(nn.Module):
    """ViT-style classifier of token activations: (N, T, D) -> logits (N, num_classes).

    Optional linear projection D -> width (only when ``width`` differs from D), ``depth``
    timm ViT blocks (pre-norm attention + MLP, qkv bias), a final LayerNorm and a linear
    head on token 0 (the incoming class token). No patch embedding, position embedding or
    new class token: the activations already carry them.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        width: int | None = None,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        width = int(width or in_dim)
        if width % num_heads:
            raise ValueError(f"detector width {width} is not divisible by num_heads {num_heads}")
        if depth < 1:
            raise ValueError(f"a ViT-style detector needs depth >= 1, got {depth}")
        self.proj: nn.Module = nn.Identity() if width == in_dim else nn.Linear(in_dim, width)
        self.blocks = nn.Sequential(
            *[Block(width, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.blocks(self.proj(x)))
        return self.head(h[:, 0])


def build_detector(
    shape: tuple[int, ...], num_classes: int, resnet: dict[str, Any], vit: dict[str, Any]
) -> nn.Module:
    """The detector for activations of per-example ``shape``: (C, H, W) -> `ConvDetector`
    with ``resnet`` settings, (T, D) -> `TokenDetector` with ``vit`` settings."""
    if len(shape) == 3:
        return ConvDetector(int(shape[0]), num_classes, **resnet)
    if len(shape) == 2:
        return TokenDetector(int(shape[1]), num_classes, **vit)
    raise ValueError(f"no detector for activations of shape {shape}: expected (C, H, W) or (T, D)")


def new_detector(p: EnergyOODParams, shape: tuple[int, ...], num_classes: int, seed: int, device: Any) -> nn.Module:
    """A freshly initialised detector for activations of ``shape`` (seeded), on ``device``."""
    torch.manual_seed(seed)
    return build_detector(shape, num_classes, p.resnet.model_dump(), p.vit.model_dump()).to(device)


def detector_code_version(shape: tuple[int, ...]) -> str:
    """The identity of the code that defines and trains the detector of activations of
    ``shape``: this package's networks, training and energy, the shared ResNet blocks and,
    for token activations, timm's ViT block. Part of every detector's key, so a change to
    any of them trains the detectors again instead of reusing old ones."""
    from . import metrics, training

    parts: list[Any] = [DETECTOR_VERSION, inspect.getmodule(BasicBlock), inspect.getmodule(build_detector),
                        training, metrics]
    if len(shape) == 2:
        from timm.models.vision_transformer import Block

        parts.append(Block)
    return stitchbench.code_version(*parts)
