"""The interface every stitchable network provides, and a helper base class.

A network is an ordered stack: ``stem`` -> ``blocks[0]`` -> ... -> ``blocks[L-1]`` ->
``head``. The stitchable layers are the blocks' outputs, named by ``layer_names``.
``front(x, i)`` is f<=i(x) (the output of block i); ``back(h, j)`` is g>j(h) (blocks after
j, then the head), so ``back(front(x, i), i) == forward(x)`` for every i.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn


class StitchableNetwork(nn.Module):
    """Base of the networks that architecture plugins build.

    Subclasses set ``self.stem`` (input -> input of the first block), ``self.blocks``
    (an ``nn.ModuleList``), ``self.head`` (output of the last block -> logits) and
    ``self.layer_names`` (one name per block). Third-party architectures that do not fit
    this shape may override ``front``, ``back`` and ``activations`` instead.
    """

    layer_names: list[str]
    stem: nn.Module
    blocks: nn.ModuleList
    head: nn.Module

    # -- layer addressing ---------------------------------------------------------------
    def layer_index(self, layer: int | str) -> int:
        """Position of ``layer`` (a 0-based index or a name) among the stitchable layers."""
        n = len(self.layer_names)
        if isinstance(layer, str):
            if layer not in self.layer_names:
                raise ValueError(f"unknown layer {layer!r}; layers are {', '.join(self.layer_names)}")
            return self.layer_names.index(layer)
        if not 0 <= int(layer) < n:
            raise ValueError(f"layer {layer} is out of range: this network has {n} stitchable layers (0..{n - 1})")
        return int(layer)

    # -- the three views of the network -------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def front(self, x: torch.Tensor, layer: int | str) -> torch.Tensor:
        """f<=i(x): the output of stitchable layer ``layer``."""
        i = self.layer_index(layer)
        h = self.stem(x)
        for block in self.blocks[: i + 1]:
            h = block(h)
        return h

    def back(self, h: torch.Tensor, layer: int | str) -> torch.Tensor:
        """g>j(h): the rest of the network after stitchable layer ``layer``, up to the logits."""
        j = self.layer_index(layer)
        for block in self.blocks[j + 1 :]:
            h = block(h)
        return self.head(h)

    def activations(self, x: torch.Tensor, layers: Iterable[int | str] | None = None) -> dict[str, torch.Tensor]:
        """Every requested layer's output (all layers if None) from one forward pass,
        keyed by layer name. The pass stops after the last requested layer."""
        wanted = sorted({self.layer_index(l) for l in (range(len(self.layer_names)) if layers is None else layers)})
        out: dict[str, torch.Tensor] = {}
        if not wanted:
            return out
        h = self.stem(x)
        for k, block in enumerate(self.blocks[: wanted[-1] + 1]):
            h = block(h)
            if k in wanted:
                out[self.layer_names[k]] = h
        return out

    def layer_shapes(self, image_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
        """Shape of one example's activation at every layer, for an input of ``image_shape``."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            p = next(self.parameters())
            acts = self.activations(torch.zeros(1, *image_shape, device=p.device, dtype=p.dtype))
        self.train(was_training)
        return {k: tuple(v.shape[1:]) for k, v in acts.items()}
