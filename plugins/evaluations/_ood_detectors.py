"""Energy-based OOD detectors over one layer's activations (torch code of ``energy_ood``).

A detector is a classifier whose input is a stitchable layer's activation instead of an
image (paper Section 4, "a dedicated OOD detector for each layer"):

- `ConvDetector` for conv activations (N, C, H, W): a CIFAR-style ResNet (3x3 stem conv
  taking the layer's C channels, stages of `BasicBlock`s, global average pooling, linear
  head). ``upsample_to`` resizes the input bilinearly to a square size first (the authors
  upsample every layer to 32x32 and use a full ResNet-18: width 64, 4 stages x 2 blocks).
- `TokenDetector` for token activations (N, T, D): a stack of ViT blocks with no patch
  embedding, no position embedding and no new class token; the head (final LayerNorm +
  linear) reads the incoming token 0. When the detector's width differs from D, a linear
  projection maps the tokens to it first.

Training (Liu et al. 2020): `pretrain` with cross-entropy on the layer's activations of
the training images (their labels), then `finetune` with cross-entropy plus the
energy-margin loss ``weight * (mean(relu(E_in - m_in)^2) + mean(relu(m_out - E_out)^2))``
on batches of in-distribution and auxiliary OOD activations. `LayerBatches` provides a
layer's activations of a split, either sliced from activations held in memory or computed
batch by batch through the frozen network (needed when the training images are augmented,
or when a split's activations do not fit in memory).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stitchbench.data import TensorSplit, iterate_batches

from ..architectures._resnet import BasicBlock, conv3x3
from ._ood_metrics import energy

# -- detector networks ----------------------------------------------------------------------


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


# -- activations of one layer, batch by batch ------------------------------------------------


@dataclass
class LayerBatches:
    """One layer's activations of a split, with the split's labels.

    Either ``acts`` (N, ...) holds them in memory (CPU), or ``net`` computes them per batch
    from ``split``'s images with ``net.front(x, layer)`` under ``no_grad``; ``augment``
    (stream mode only) is applied to the image batches first. Batches come out on
    ``device``.
    """

    layer: str
    labels: torch.Tensor
    device: torch.device
    acts: torch.Tensor | None = None
    net: nn.Module | None = None
    split: Any = None
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        if self.acts is not None or isinstance(self.split, TensorSplit):
            order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                if self.acts is not None:
                    yield self.acts[idx].to(self.device), self.labels[idx].to(self.device)
                else:
                    yield self._forward(self.split.images[idx], generator), self.labels[idx].to(self.device)
            return
        for x, y in iterate_batches(self.split, batch_size, shuffle=shuffle, generator=generator):
            yield self._forward(x, generator), y.to(self.device)

    @torch.no_grad()
    def _forward(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.augment is not None:
            x = self.augment(x, generator if generator is not None else torch.Generator().manual_seed(0))
        return self.net.front(x.to(self.device), self.layer).float()


def split_labels(split: Any) -> torch.Tensor:
    """The labels (N,) of a split (read directly from a `TensorSplit`)."""
    if isinstance(split, TensorSplit):
        return split.labels
    return torch.cat([y for _, y in iterate_batches(split, 512)])


# -- training ----------------------------------------------------------------------------------


def _optimizer(params: Any, name: str, lr: float, weight_decay: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _check_finite(loss: torch.Tensor, what: str, epoch: int) -> None:
    if not torch.isfinite(loss):
        from stitchbench.errors import DivergenceError

        raise DivergenceError(
            f"{what}: the loss became {loss.item()} in epoch {epoch + 1}; lower the detector's learning rate"
        )


def pretrain(
    det: nn.Module,
    data: LayerBatches,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    generator: torch.Generator,
    optimizer: str = "adam",
    what: str = "detector pre-training",
    tick: Callable[[], None] | None = None,
) -> list[dict[str, float]]:
    """Cross-entropy training on (activation, image label) pairs; one dict per epoch
    (``pretrain_loss``, ``pretrain_accuracy`` on the training batches)."""
    opt = _optimizer(det.parameters(), optimizer, lr, weight_decay)
    history = []
    for epoch in range(epochs):
        det.train()
        loss_sum, correct, total = 0.0, 0, 0
        for a, y in data.batches(batch_size, shuffle=True, generator=generator):
            logits = det(a)
            loss = F.cross_entropy(logits, y)
            _check_finite(loss, what, epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            total += len(y)
            if tick is not None:
                tick()
        history.append({"pretrain_loss": loss_sum / max(total, 1), "pretrain_accuracy": correct / max(total, 1)})
    det.eval()
    return history


def energy_margin_loss(
    logits_in: torch.Tensor, logits_out: torch.Tensor, m_in: float, m_out: float, temperature: float = 1.0
) -> torch.Tensor:
    """Liu et al.'s regulariser: ``mean(relu(E_in - m_in)^2) + mean(relu(m_out - E_out)^2)``:
    pushes ID energies below ``m_in`` and OOD energies above ``m_out``."""
    e_in = energy(logits_in, temperature)
    e_out = energy(logits_out, temperature)
    return F.relu(e_in - m_in).pow(2).mean() + F.relu(m_out - e_out).pow(2).mean()


def _cycle(make: Callable[[], Iterator[Any]]) -> Iterator[Any]:
    while True:
        empty = True
        for item in make():
            empty = False
            yield item
        if empty:
            raise ValueError("the auxiliary OOD set is empty")


def finetune(
    det: nn.Module,
    data: LayerBatches,
    aux: LayerBatches,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    m_in: float,
    m_out: float,
    weight: float,
    generator: torch.Generator,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    aux_batch_size: int | None = None,
    freeze_batchnorm: bool = False,
    what: str = "detector fine-tuning",
    tick: Callable[[], None] | None = None,
) -> list[dict[str, float]]:
    """Liu et al.'s fine-tuning: every step takes a batch of ID activations (with labels)
    and a batch of auxiliary OOD activations, runs them through the detector together, and
    minimises ``CE(ID) + weight * energy_margin_loss``. The learning rate follows a cosine
    schedule over all steps (as in Liu et al.'s code). An epoch is one pass over the ID
    set; the auxiliary set is cycled. One dict per epoch (``finetune_loss``,
    ``finetune_energy_in``, ``finetune_energy_out``: mean energies of the last epoch's
    batches)."""
    opt = _optimizer(det.parameters(), optimizer, lr, weight_decay, momentum)
    steps = max(1, epochs * math.ceil(len(data) / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    aux_iter = _cycle(lambda: aux.batches(aux_batch_size or batch_size, shuffle=True, generator=generator))
    history = []
    for epoch in range(epochs):
        det.train()
        if freeze_batchnorm:
            for m in det.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        sums = {"loss": 0.0, "e_in": 0.0, "e_out": 0.0}
        total = 0
        for a, y in data.batches(batch_size, shuffle=True, generator=generator):
            a_out, _ = next(aux_iter)
            logits = det(torch.cat([a, a_out]))
            logits_in, logits_out = logits[: len(a)], logits[len(a) :]
            reg = energy_margin_loss(logits_in, logits_out, m_in, m_out)
            loss = F.cross_entropy(logits_in, y) + weight * reg
            _check_finite(loss, what, epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                sums["loss"] += loss.item() * len(a)
                sums["e_in"] += energy(logits_in).sum().item()
                sums["e_out"] += energy(logits_out).mean().item() * len(a)
            total += len(a)
            if tick is not None:
                tick()
        history.append({
            "finetune_loss": sums["loss"] / max(total, 1),
            "finetune_energy_in": sums["e_in"] / max(total, 1),
            "finetune_energy_out": sums["e_out"] / max(total, 1),
        })
    det.eval()
    return history


@torch.no_grad()
def detector_energies(
    det: nn.Module, batches: Iterator[tuple[torch.Tensor, Any]], temperature: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Energies (N,) float64 of every batch's activations, and the predicted classes (N,)."""
    det.eval()
    es, preds = [], []
    for a, _ in batches:
        logits = det(a)
        es.append(energy(logits.double(), temperature).cpu())
        preds.append(logits.argmax(1).cpu())
    if not es:
        return np.empty(0), np.empty(0, dtype=np.int64)
    return torch.cat(es).numpy(), torch.cat(preds).numpy()
