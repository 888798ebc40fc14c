"""What the probes and the low-rank approximations are computed from: one forward pass
over each split per network, all layers at once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stitchbench import RunContext, iterate_batches, to_rows

from .representations import RowMoments


def pooled(act: Any) -> Any:
    """The probe's input: (N, C, H, W) -> global average pool (N, C); (N, T, D) -> token 0
    (the class token) (N, D); (N, D) unchanged."""
    if act.ndim == 4:
        return act.mean(dim=(2, 3))
    if act.ndim == 3:
        return act[:, 0]
    if act.ndim == 2:
        return act
    raise ValueError(f"cannot probe activations of shape {tuple(act.shape)}")


@dataclass
class NetworkFeatures:
    """Pooled probe features (N, C) per layer and split, labels, and per-layer row moments
    of the training activations; all float32 on the CPU except the moments."""

    pooled: dict[str, dict[str, Any]]
    labels: dict[str, Any]
    moments: dict[str, RowMoments]


def network_features(context: RunContext, model_name: str, moment_layers: Sequence[str] = (),
                     batch_size: int = 256) -> NetworkFeatures:
    """One forward pass over each split (no augmentation, fixed order): every layer's pooled
    features, and the row moments of the training activations of ``moment_layers``. Kept
    for the run (``context.shared``), so both tests share it (moments of further layers
    asked for later cost one more pass over the training split)."""
    import torch

    net = context.networks[model_name]
    key = ("ding.features", model_name)
    out = context.shared.get(key)
    missing = [layer for layer in moment_layers if out is None or layer not in out.moments]
    if out is not None and not missing:
        return out
    splits = ("train",) if out is not None else ("train", "test")
    if out is None:
        out = NetworkFeatures({"train": {}, "test": {}}, {}, {})
    new = {layer: RowMoments() for layer in missing}
    device = next(net.parameters()).device
    net.eval()
    with torch.no_grad():
        for split in splits:
            chunks: dict[str, list[Any]] = {name: [] for name in net.layer_names}
            labels = []
            for x, y in iterate_batches(getattr(context.data, split), batch_size):
                acts = net.activations(x.to(device))
                for name, act in acts.items():
                    chunks[name].append(pooled(act).float().cpu())
                    if split == "train" and name in new:
                        new[name].update(to_rows(act))
                labels.append(y)
            out.pooled[split] = {name: torch.cat(c) for name, c in chunks.items()}
            out.labels[split] = torch.cat(labels)
    out.moments.update(new)
    context.shared[key] = out
    return out
