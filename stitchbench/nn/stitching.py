"""Stitching mechanics: the stitching layer, the stitched network, and the problem a
matcher solves.

The stitched network is g>j ∘ T ∘ f<=i (paper section 2.1). Both halves are frozen and
stay in eval mode (BatchNorm uses its running statistics) whatever mode the stitched
network is put in; only T is ever trained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import LoadedDataset, iterate_batches
from .network import StitchableNetwork

if TYPE_CHECKING:
    from .activations import ActivationCache


class StitchingLayer(nn.Module):
    """T: the affine stitching transformation between two activation shapes.

    Conv activations (C1, H1, W1) -> (C2, H2, W2): bilinear resize of the source to
    (H2, W2) when the spatial sizes differ, then a 1x1 convolution with bias (the same
    affine map of channels at every position). Token activations (T, D1) -> (T, D2): the
    same affine map applied to every token. ``weight`` is (C2, C1) / (D2, D1).

    ``source_transform`` (optional) is applied to the source before anything else, e.g. a
    fixed low-rank projection; it is not trained. ``fit_info`` is what the matcher that
    fitted the layer reports about the fit (JSON-able values, e.g. DM's residual or TLM's
    loss per epoch); the core keeps it with the matrix (``matrix/fit_info.json``).
    """

    def __init__(self, source_shape: Sequence[int], target_shape: Sequence[int]):
        super().__init__()
        self.source_shape = tuple(int(s) for s in source_shape)
        self.target_shape = tuple(int(s) for s in target_shape)
        self.source_transform: nn.Module | None = None
        self.fit_info: dict[str, Any] = {}
        if len(self.source_shape) == 3 and len(self.target_shape) == 3:
            self.kind = "conv"
            c1, h1, w1 = self.source_shape
            c2, h2, w2 = self.target_shape
            self.resize_to = None if (h1, w1) == (h2, w2) else (h2, w2)
            self.affine: nn.Module = nn.Conv2d(c1, c2, kernel_size=1, bias=True)
        elif len(self.source_shape) == 2 and len(self.target_shape) == 2:
            self.kind = "tokens"
            if self.source_shape[0] != self.target_shape[0]:
                raise ValueError(
                    f"token stitching needs equal token counts, got {self.source_shape} -> {self.target_shape}"
                )
            self.resize_to = None
            self.affine = nn.Linear(self.source_shape[1], self.target_shape[1], bias=True)
        else:
            raise ValueError(
                f"cannot stitch activations of shape {self.source_shape} to {self.target_shape}: both must be "
                "(C, H, W) conv maps or both (T, D) token sequences"
            )

    @property
    def in_features(self) -> int:
        return self.source_shape[0] if self.kind == "conv" else self.source_shape[1]

    @property
    def out_features(self) -> int:
        return self.target_shape[0] if self.kind == "conv" else self.target_shape[1]

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the affine map: the source after its transform and the resize."""
        if self.source_transform is not None:
            x = self.source_transform(x)
        if self.resize_to is not None:
            x = F.interpolate(x, size=self.resize_to, mode="bilinear", align_corners=False)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.affine(self.prepare(x))

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) matrix of the affine map."""
        w = self.affine.weight
        return w.reshape(w.shape[0], w.shape[1])

    @property
    def bias(self) -> torch.Tensor:
        return self.affine.bias

    @torch.no_grad()
    def set_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> StitchingLayer:
        """Set the map to ``x -> weight @ x + bias`` (weight (out, in), bias (out,))."""
        weight = torch.as_tensor(weight)
        bias = torch.as_tensor(bias)
        if tuple(weight.shape) != (self.out_features, self.in_features) or tuple(bias.shape) != (self.out_features,):
            raise ValueError(
                f"weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not fit a "
                f"{self.in_features}->{self.out_features} stitching layer"
            )
        self.affine.weight.copy_(weight.reshape(self.affine.weight.shape).to(self.affine.weight))
        self.affine.bias.copy_(bias.to(self.affine.bias))
        return self


def to_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N·H·W, C) channels-last rows; (N, T, D) -> (N·T, D); (N, D) unchanged."""
    if x.ndim == 4:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    if x.ndim == 3:
        return x.reshape(-1, x.shape[2])
    if x.ndim == 2:
        return x
    raise ValueError(f"expected (N, C, H, W), (N, T, D) or (N, D) activations, got shape {tuple(x.shape)}")


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Within the block the modules' parameters need no gradient; afterwards each flag is
    restored to exactly what it was."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


class StitchedNetwork(nn.Module):
    """g>j ∘ T ∘ f<=i. ``train()`` switches only T; both halves always stay in eval mode."""

    def __init__(
        self,
        source: StitchableNetwork,
        source_layer: str,
        stitch: StitchingLayer,
        target: StitchableNetwork,
        target_layer: str,
    ):
        super().__init__()
        self.source = source
        self.target = target
        self.stitch = stitch
        self.source_layer = source_layer
        self.target_layer = target_layer
        self.train(False)

    def train(self, mode: bool = True) -> StitchedNetwork:
        self.training = mode
        self.stitch.train(mode)
        self.source.eval()
        self.target.eval()
        return self

    def source_representation(self, x: torch.Tensor) -> torch.Tensor:
        return self.source.front(x, self.source_layer)

    def forward_from_source(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from an already computed source representation f<=i(x)."""
        return self.target.back(self.stitch(h), self.target_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from_source(self.source_representation(x))


@dataclass
class StitchingProblem:
    """Everything a matcher needs for one (source layer, target layer) cell.

    ``activations(net, layer, split, n)`` returns cached activations (float32, on
    ``device``) of the first ``n`` examples of a split, where split ``"train_sample"`` is
    the training split in a fixed random order (seeded by ``seed``; no augmentation), so
    that every cell of a run sees the same K images. ``train_batches`` iterates the training
    split (optionally augmented) for matchers that train.
    """

    source: StitchableNetwork
    source_layer: str
    target: StitchableNetwork
    target_layer: str
    data: LoadedDataset
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    cache: ActivationCache | None = None  # shared by the cells of a run

    @property
    def source_shape(self) -> tuple[int, ...]:
        return self._shape(self.source, self.source_layer)

    @property
    def target_shape(self) -> tuple[int, ...]:
        return self._shape(self.target, self.target_layer)

    def _shape(self, net: StitchableNetwork, layer: str) -> tuple[int, ...]:
        return net.layer_shapes(self.data.image_shape)[layer]

    def new_layer(self) -> StitchingLayer:
        return StitchingLayer(self.source_shape, self.target_shape).to(self.device)

    def stitched(self, layer: StitchingLayer) -> StitchedNetwork:
        return StitchedNetwork(self.source, self.source_layer, layer, self.target, self.target_layer)

    def sample_images(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` training images in the problem's fixed random order (no augmentation)."""
        return sample_training_images(self.data, n, self.seed)

    def activations(self, net: StitchableNetwork, layer: str, split: str, n: int | None = None) -> torch.Tensor:
        if self.cache is not None:
            return self.cache.get(net, layer, split, n, self.data, self.seed, self.device)
        if split == "train_sample":
            x, _ = self.sample_images(n or len(self.data.train))
        else:
            x = torch.cat([b for b, _ in iterate_batches(getattr(self.data, split), 256, limit=n)])
        net.eval()
        with torch.no_grad():
            return net.front(x.to(self.device), layer)

    def train_batches(
        self, batch_size: int, *, augment: bool = True, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = generator or torch.Generator().manual_seed(self.seed)
        for x, y in iterate_batches(self.data.train, batch_size, shuffle=True, generator=g):
            if augment and self.data.augment is not None:
                x = self.data.augment(x, g)
            yield x.to(self.device), y.to(self.device)


def sample_training_images(data: LoadedDataset, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training examples drawn without replacement in a random order fixed by ``seed``."""
    total = len(data.train)
    if n > total:
        raise ValueError(f"asked for {n} training images but the training split has {total}")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
    if hasattr(data.train, "images"):
        return data.train.images[order], data.train.labels[order]
    items = [data.train[int(i)] for i in order]
    return torch.stack([x for x, _ in items]).float(), torch.as_tensor([int(y) for _, y in items])
