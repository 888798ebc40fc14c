"""Data sets as the core sees them, and fast batching.

A dataset plugin's ``load`` returns a `LoadedDataset`. Splits are torch datasets of
``(image, label)`` with images as float tensors (C, H, W), already normalised the way the
data set needs. When a split is a `TensorSplit` (the whole split in memory), batches are
sliced directly instead of going through a DataLoader, which matters on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset


class TensorSplit(Dataset):
    """A split held in memory: ``images`` (N, C, H, W) float32 and ``labels`` (N,) int64."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images = images.float().contiguous()
        self.labels = labels.long().contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


@dataclass
class LoadedDataset:
    """What a dataset plugin provides.

    ``image_shape`` is (C, H, W) of one normalised image; ``augment`` (optional) maps a
    training batch (B, C, H, W) to an augmented batch and is applied only when training
    networks, stitchers and probes, never for activations used by DM or the indices.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    train: Dataset
    test: Dataset
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    description: str = ""


def iterate_batches(
    split: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    limit: int | None = None,
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)`` batches; the first ``limit`` examples only, if given
    (taken before shuffling, so a limit always means the same examples)."""
    n = len(split) if limit is None else min(limit, len(split))
    if isinstance(split, TensorSplit):
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield split.images[idx], split.labels[idx]
        return
    subset = split if n == len(split) else torch.utils.data.Subset(split, range(n))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers)
    for images, labels in loader:
        yield images.float(), torch.as_tensor(labels).long()


def random_crop_flip(padding: int = 4, flip: bool = True) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """Batch augmentation: random crop after zero padding, and optional horizontal flip
    (the CIFAR recipe of the reference code: crop 32 with padding 4, flip)."""

    def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        if padding:
            padded = torch.nn.functional.pad(x, (padding,) * 4)
            dx = torch.randint(0, 2 * padding + 1, (b,), generator=g)
            dy = torch.randint(0, 2 * padding + 1, (b,), generator=g)
            rows = (dy[:, None] + torch.arange(h)[None, :])  # (B, H)
            cols = (dx[:, None] + torch.arange(w)[None, :])  # (B, W)
            bi = torch.arange(b)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        if flip:
            mask = torch.rand(b, generator=g) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        return x.contiguous()

    return augment
