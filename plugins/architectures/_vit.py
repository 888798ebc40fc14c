"""A timm `VisionTransformer` as a `StitchableNetwork` (torch model code of the
``vit_tiny`` plugin).

The timm model is taken apart into ``stem`` (patch embedding, class token, position
embedding: what timm's ``forward_features`` does before the blocks), ``blocks`` (timm's
transformer blocks, the stitchable layers ``blocks.0 .. blocks.{depth-1}``) and ``head``
(final norm, class-token pooling, classifier: the rest of ``forward_features`` and
``forward_head``). Each timm submodule is registered exactly once, under the network, so
the state dict has one key per tensor (``stem.*``, ``blocks.*``, ``head.*``).

Shapes for images (N, C, H, W), patch p, width D: stem and every block -> (N, T, D) with
T = 1 + (H/p)(W/p) tokens (the class token first); head -> (N, num_classes).
"""

from __future__ import annotations

import torch
from torch import nn

from stitchbench import StitchableNetwork


class TokenStem(nn.Module):
    """Images (N, C, H, W) -> tokens (N, 1 + H/p * W/p, D): timm's ``patch_embed``,
    ``_pos_embed`` (class token concatenated, then the learned position embedding added),
    ``patch_drop`` and ``norm_pre``, in the order of timm 1.0's ``forward_features``."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed
        self.pos_drop = vit.pos_drop
        self.patch_drop = vit.patch_drop
        self.norm_pre = vit.norm_pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (N, P, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        x = self.patch_drop(x)
        return self.norm_pre(x)


class ClassTokenHead(nn.Module):
    """Tokens (N, T, D) -> logits (N, num_classes): final norm, the class token,
    ``fc_norm``, head dropout and the linear classifier (timm's ``norm`` + ``forward_head``
    with ``global_pool='token'``)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.norm = vit.norm
        self.fc_norm = vit.fc_norm
        self.head_drop = vit.head_drop
        self.fc = vit.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)[:, 0]
        return self.fc(self.head_drop(self.fc_norm(x)))


class TimmViT(StitchableNetwork):
    """A timm VisionTransformer split at its blocks.

    Build it with `TimmViT.build(...)` or wrap an existing model with
    `TimmViT.from_timm(vit)`; either way ``net(x) == vit(x)`` and
    ``net.back(net.front(x, i), i) == vit(x)`` for every block i. Input (N, C, H, W) with
    H, W the model's image size; every stitchable layer is (N, 1 + H/p * W/p, D).
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        _check_supported(vit)
        self.image_size: tuple[int, int] = tuple(vit.patch_embed.img_size)
        self.patch_size: tuple[int, int] = tuple(vit.patch_embed.patch_size)
        self.embed_dim: int = int(vit.embed_dim)
        self.num_tokens: int = 1 + int(vit.patch_embed.num_patches)
        self.stem = TokenStem(vit)
        self.blocks = nn.ModuleList(list(vit.blocks))
        self.head = ClassTokenHead(vit)
        self.layer_names = [f"blocks.{i}" for i in range(len(self.blocks))]

    @classmethod
    def from_timm(cls, vit: nn.Module) -> TimmViT:
        """Wrap ``vit`` (its modules are shared, not copied)."""
        return cls(vit)

    @classmethod
    def build(
        cls,
        *,
        num_classes: int,
        in_channels: int,
        image_size: tuple[int, int],
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
    ) -> TimmViT:
        """A freshly initialised ViT (timm's default init; no pretrained weights, no
        download) with a class token, a learned position embedding and token pooling."""
        if image_size[0] % patch_size or image_size[1] % patch_size:
            raise ValueError(
                f"image size {image_size[0]}x{image_size[1]} is not divisible by patch size {patch_size}"
            )
        if embed_dim % num_heads:
            raise ValueError(f"width {embed_dim} is not divisible by num_heads {num_heads}")
        from timm.models.vision_transformer import VisionTransformer

        vit = VisionTransformer(
            img_size=image_size,
            patch_size=patch_size,
            in_chans=in_channels,
            num_classes=num_classes,
            global_pool="token",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            class_token=True,
            pos_embed="learn",
        )
        return cls(vit)


def _check_supported(vit: nn.Module) -> None:
    """The stem and head above reproduce timm's forward for this configuration only."""
    problems = []
    if getattr(vit, "cls_token", None) is None:
        problems.append("a class token is required")
    if getattr(vit, "reg_token", None) is not None:
        problems.append("register tokens are not supported")
    if getattr(vit, "pos_embed", None) is None:
        problems.append("a learned position embedding is required")
    if getattr(vit, "no_embed_class", False):
        problems.append("no_embed_class is not supported")
    if getattr(vit, "dynamic_img_size", False):
        problems.append("dynamic_img_size is not supported")
    if getattr(vit, "global_pool", None) != "token" or getattr(vit, "attn_pool", None) is not None:
        problems.append("only global_pool='token' is supported")
    if problems:
        raise ValueError("unsupported timm VisionTransformer: " + "; ".join(problems))
