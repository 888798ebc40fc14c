"""Training and evaluating base networks (seeded, deterministic on CPU)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DivergenceError
from ..progress import progress_bar
from .data import LoadedDataset, iterate_batches

log = logging.getLogger(__name__)


class TrainingSettings(Protocol):
    """How a network is trained (the run config's ``networks.training`` is one)."""

    epochs: int
    batch_size: int
    optimizer: str  # "adam" | "sgd"
    lr: float
    weight_decay: float
    momentum: float
    lr_step_epochs: int | None
    lr_gamma: float
    augment: bool


def make_optimizer(params, cfg: TrainingSettings) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_classifier(
    net: nn.Module,
    data: LoadedDataset,
    cfg: TrainingSettings,
    *,
    seed: int,
    device: torch.device,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    desc: str = "train",
) -> list[dict[str, float]]:
    """Train ``net`` in place with cross-entropy; returns one metrics dict per epoch
    (``loss``, ``train_accuracy``, ``test_accuracy``). Raises DivergenceError on a
    non-finite loss."""
    g = torch.Generator().manual_seed(seed)
    opt = make_optimizer(net.parameters(), cfg)
    sched = (
        torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step_epochs, gamma=cfg.lr_gamma)
        if cfg.lr_step_epochs
        else None
    )
    history = []
    n_batches = math.ceil(len(data.train) / cfg.batch_size)
    with progress_bar(total=cfg.epochs * n_batches, desc=desc, unit="batch") as bar:
        for epoch in range(cfg.epochs):
            net.train()
            total, correct, loss_sum = 0, 0, 0.0
            for x, y in iterate_batches(data.train, cfg.batch_size, shuffle=True, generator=g):
                if cfg.augment and data.augment is not None:
                    x = data.augment(x, g)
                x, y = x.to(device), y.to(device)
                logits = net(x)
                loss = F.cross_entropy(logits, y)
                if not torch.isfinite(loss):
                    raise DivergenceError(
                        f"{desc}: the training loss became {loss.item()} in epoch {epoch + 1}; lower the "
                        "learning rate (networks.training.lr) or check the data"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                total += len(y)
                bar.update(1)
            if sched is not None:
                sched.step()
            metrics = {
                "loss": loss_sum / max(total, 1),
                "train_accuracy": correct / max(total, 1),
                "test_accuracy": accuracy(net, data, device=device),
            }
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", test_acc=f"{metrics['test_accuracy']:.3f}")
            history.append(metrics)
            if on_epoch is not None:
                on_epoch(epoch, metrics)
    net.eval()
    return history


@torch.no_grad()
def accuracy(net: nn.Module, data: LoadedDataset, *, device: torch.device, batch_size: int = 256) -> float:
    """Top-1 accuracy on the test split (eval mode)."""
    was = net.training
    net.eval()
    correct = total = 0
    for x, y in iterate_batches(data.test, batch_size):
        correct += (net(x.to(device)).argmax(1).cpu() == y).sum().item()
        total += len(y)
    net.train(was)
    return correct / max(total, 1)
