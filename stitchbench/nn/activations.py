"""Activation extraction: every stitchable layer of a network from one forward pass, cached.

The cache is keyed by (network, split, n) and holds all layers of that extraction, so the
many cells of a stitching or index matrix share one pass per network. Splits: ``test`` and
``train`` (the first n examples, unshuffled) and ``train_sample`` (the first n of the
training split in a fixed random order given by a seed, without augmentation).
"""

from __future__ import annotations

from typing import Any

import torch

from .data import LoadedDataset, iterate_batches
from .network import StitchableNetwork
from .stitching import sample_training_images


@torch.no_grad()
def extract_activations(
    net: StitchableNetwork,
    images: torch.Tensor | None = None,
    *,
    data: LoadedDataset | None = None,
    split: str = "test",
    n: int | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """All layers' activations (float32, on CPU) of ``images`` or of the first ``n``
    examples of ``data``'s ``split``; one forward pass per batch."""
    net.eval()
    device = torch.device(device)
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in net.layer_names}
    if images is not None:
        batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    else:
        assert data is not None
        batches = (x for x, _ in iterate_batches(getattr(data, split), batch_size, limit=n))
    for x in batches:
        for name, a in net.activations(x.to(device)).items():
            chunks[name].append(a.float().cpu())
    return {name: torch.cat(parts) for name, parts in chunks.items() if parts}


class ActivationCache:
    """Activations of (network, split, n), all layers at once, kept in memory.

    Networks are identified by ``id``; the cache lives for one run."""

    def __init__(self, max_bytes: int = 4 << 30):
        self.max_bytes = max_bytes
        self._store: dict[tuple[Any, ...], dict[str, torch.Tensor]] = {}
        self._numpy: dict[tuple[Any, ...], dict[str, Any]] = {}

    def all_layers(
        self, net: StitchableNetwork, split: str, n: int | None, data: LoadedDataset, seed: int = 0
    ) -> dict[str, torch.Tensor]:
        key = (id(net), split, n, seed if split == "train_sample" else None)
        hit = self._store.get(key)
        if hit is not None:
            return hit
        device = next(net.parameters()).device
        if split == "train_sample":
            x, _ = sample_training_images(data, n or len(data.train), seed)
            acts = extract_activations(net, x, device=device)
        else:
            acts = extract_activations(net, data=data, split=split, n=n, device=device)
        size = sum(a.numel() * a.element_size() for a in acts.values())
        if size + self.nbytes() <= self.max_bytes:
            self._store[key] = acts
        return acts

    def get(
        self,
        net: StitchableNetwork,
        layer: str,
        split: str,
        n: int | None,
        data: LoadedDataset,
        seed: int,
        device: torch.device,
    ) -> torch.Tensor:
        return self.all_layers(net, split, n, data, seed)[layer].to(device)

    def numpy_layers(
        self, net: StitchableNetwork, split: str, n: int | None, data: LoadedDataset, seed: int, layers: list[str]
    ) -> list[Any]:
        """The layers' activations as numpy arrays, the same objects on every call (so
        indices can key per-layer statistics by identity for the whole run)."""
        key = ("numpy", id(net), split, n, seed if split == "train_sample" else None)
        views = self._numpy.get(key)
        if views is None:
            views = {name: a.numpy() for name, a in self.all_layers(net, split, n, data, seed).items()}
            self._numpy[key] = views
        return [views[name] for name in layers]

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for acts in self._store.values() for a in acts.values())

    def clear(self) -> None:
        self._store.clear()
        self._numpy.clear()
