"""The ``vit_tiny`` architecture plugin: timm's VisionTransformer (ViT-Ti by default).

The torch model code lives in `._vit` and is imported inside `build`, so listing plugins
does not import torch or timm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import AliasChoices, Field, model_validator

import stitchbench
from stitchbench import ArchitecturePlugin, Params

if TYPE_CHECKING:
    from ._vit import TimmViT


class ViTTiny(ArchitecturePlugin):
    """Vision Transformer (timm; ViT-Ti: patch 4, width 192, 12 blocks, 3 heads); the blocks are stitchable."""

    name = "vit_tiny"

    class Params(Params):
        #: Side of the (square) input image; None: the data set's image size.
        image_size: int | None = Field(None, ge=1, description="input image side; default: the data's")
        patch_size: int = Field(4, ge=1, description="side of a square patch")
        #: Embedding dimension D (timm's ``embed_dim``; either key is accepted).
        width: int = Field(
            192,
            ge=1,
            validation_alias=AliasChoices("width", "embed_dim"),
            description="embedding dimension (timm's embed_dim)",
        )
        depth: int = Field(12, ge=1, description="number of transformer blocks (= stitchable layers)")
        num_heads: int = Field(3, ge=1, description="attention heads; must divide width")
        mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden size / width")

        @model_validator(mode="after")
        def _check(self) -> ViTTiny.Params:
            if self.width % self.num_heads:
                raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
            if self.image_size is not None and self.image_size % self.patch_size:
                raise ValueError(
                    f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
                )
            return self

    def build(self, params: Params, num_classes: int, image_shape: tuple[int, int, int]) -> TimmViT:
        """A freshly initialised ViT for images of ``image_shape`` = (C, H, W) (no pretrained
        weights, no download). Every layer ``blocks.i`` outputs (T, D) tokens per example,
        T = 1 + (H/p)(W/p) with the class token first: (65, 192) at 32x32, patch 4."""
        from ._vit import TimmViT

        params = self.Params.model_validate(params if params is not None else {})
        channels, height, width = (int(s) for s in image_shape)
        if params.image_size is not None and (params.image_size, params.image_size) != (height, width):
            raise ValueError(
                f"vit_tiny: image_size {params.image_size} does not match the data's images "
                f"({height}x{width}); leave image_size unset to take it from the data"
            )
        if height % params.patch_size or width % params.patch_size:
            raise ValueError(
                f"vit_tiny: image size {height}x{width} is not divisible by patch_size {params.patch_size}"
            )
        return TimmViT.build(
            num_classes=num_classes,
            in_channels=channels,
            image_size=(height, width),
            patch_size=params.patch_size,
            embed_dim=params.width,
            depth=params.depth,
            num_heads=params.num_heads,
            mlp_ratio=params.mlp_ratio,
        )

    def tag(self, params: Params) -> str:
        """E.g. ``vit_tiny-p4-w192-d12-h3``; ``-i<size>`` when image_size is set and
        ``-m<ratio>`` when mlp_ratio is not 4."""
        p = self.Params.model_validate(params if params is not None else {})
        tag = f"vit_tiny-p{p.patch_size}-w{p.width}-d{p.depth}-h{p.num_heads}"
        if p.image_size is not None:
            tag += f"-i{p.image_size}"
        if p.mlp_ratio != 4.0:
            tag += f"-m{p.mlp_ratio:g}"
        return tag


@stitchbench.hookimpl
def register_architectures(register):
    register(ViTTiny())
