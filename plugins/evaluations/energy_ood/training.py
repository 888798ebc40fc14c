"""Training a detector (Liu et al. 2020), as a task of the run's executor.

`pretrain` with cross-entropy on the layer's activations of the training images (their
labels), then `finetune` with cross-entropy plus the energy-margin loss
``weight * (mean(relu(E_in - m_in)^2) + mean(relu(m_out - E_out)^2))`` on batches of
in-distribution and auxiliary OOD activations, with Liu et al.'s optimisation
(``recipe: liu``) or the authors' (``recipe: authors``, `finetune_settings`). `LayerBatches` provides a layer's
activations of a split, either sliced from activations held in memory or computed batch
by batch through the frozen network (needed when the training images are augmented, or
when a split's activations do not fit in memory); `ActivationSource` picks which.
`train_detector_task` is the whole training of one detector: plain data in, a state dict
and the training curves out, nothing written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stitchbench import DivergenceError, TensorSplit, extract_activations, iterate_batches, random_crop_flip

from .detectors import new_detector
from .metrics import energy
from .params import EnergyOODParams

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
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
        order: torch.Tensor | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of the whole split, or of the examples ``order`` (indices, in this order)."""
        n = len(self)
        if order is not None and self.acts is None and not isinstance(self.split, TensorSplit):
            subset = torch.utils.data.Subset(self.split, order.tolist())
            for x, y in iterate_batches(subset, batch_size, shuffle=False):
                yield self._forward(x, generator), y.to(self.device)
            return
        if self.acts is not None or isinstance(self.split, TensorSplit):
            if order is None:
                order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
            for start in range(0, len(order), batch_size):
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


class DisjointSubsets:
    """Successive disjoint random subsets of ``n`` indices of a set of ``size`` examples: a
    random permutation is consumed ``n`` at a time and drawn anew once it is used up (so
    the last subset of a permutation is short when ``n`` does not divide ``size``), as the
    authors' ``MultiEpochDisjointSubsetSampler``
    (general_utils/train/samplers/multi_epoch_disjoint_subset_sampler.py) does."""

    def __init__(self, size: int, n: int, generator: torch.Generator):
        if not 0 < n <= size:
            raise ValueError(f"a subset of {n} of {size} examples")
        self.size, self.n, self.generator = size, n, generator
        self._permute()

    def _permute(self) -> None:
        self.perm, self.i = torch.randperm(self.size, generator=self.generator), 0

    def next(self) -> torch.Tensor:
        idx = self.perm[self.i * self.n : (self.i + 1) * self.n]
        self.i += 1
        if self.i * self.n >= self.size:
            self._permute()
        return idx


def _optimizer(params: Any, name: str, lr: float, weight_decay: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _check_finite(loss: torch.Tensor, what: str, epoch: int) -> None:
    if not torch.isfinite(loss):
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


def finetune_optimizer(
    params: Any,
    *,
    recipe: str,
    epochs: int,
    steps_per_epoch: int,
    lr: float,
    weight_decay: float,
    optimizer: str = "sgd",
    momentum: float = 0.9,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The fine-tuning optimizer and its schedule, stepped once per iteration.

    ``liu``: ``optimizer`` (SGD-Nesterov or Adam) with a cosine schedule from ``lr`` to 0
    over ``epochs * steps_per_epoch`` steps. ``authors`` (exec_train_representation_classifier.py):
    Adam(lr, weight_decay) and ``MultiStepLR(milestones=[epochs // 2], gamma=0.1)`` stepped
    per iteration, so the learning rate drops tenfold after iteration ``epochs // 2`` (not
    epoch) and stays there."""
    if recipe == "authors":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[epochs // 2], gamma=0.1)
    opt = _optimizer(params, optimizer, lr, weight_decay, momentum)
    steps = max(1, epochs * steps_per_epoch)
    return opt, torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )


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
    recipe: str = "liu",
    what: str = "detector fine-tuning",
) -> list[dict[str, float]]:
    """Liu et al.'s fine-tuning: every step takes a batch of ID activations (with labels)
    and a batch of auxiliary OOD activations, runs them through the detector together, and
    minimises ``CE(ID) + weight * energy_margin_loss``.

    ``recipe="liu"``: the learning rate follows a cosine schedule over all steps (as in Liu
    et al.'s code); an epoch is one pass over the ID set; the auxiliary set is cycled.
    ``recipe="authors"``: Adam with a per-iteration MultiStepLR (`finetune_optimizer`); an
    epoch takes the next disjoint random subset of ``min(len(data), len(aux))`` examples of
    each set (`DisjointSubsets`) and pairs their batches. One dict per epoch
    (``finetune_loss``, ``finetune_energy_in``, ``finetune_energy_out``: mean energies of
    the last epoch's batches)."""
    aux_bs = aux_batch_size or batch_size
    if recipe == "authors":
        n = min(len(data), len(aux))
        if n == 0:
            raise ValueError("the in-distribution or the auxiliary OOD set is empty")
        id_subsets, aux_subsets = DisjointSubsets(len(data), n, generator), DisjointSubsets(len(aux), n, generator)
        steps_per_epoch = min(math.ceil(n / batch_size), math.ceil(n / aux_bs))

        def epoch_batches() -> Iterator[Any]:
            return zip(data.batches(batch_size, order=id_subsets.next(), generator=generator),
                       aux.batches(aux_bs, order=aux_subsets.next(), generator=generator))
    else:
        steps_per_epoch = math.ceil(len(data) / batch_size)
        aux_iter = _cycle(lambda: aux.batches(aux_bs, shuffle=True, generator=generator))

        def epoch_batches() -> Iterator[Any]:
            for batch in data.batches(batch_size, shuffle=True, generator=generator):
                yield batch, next(aux_iter)
    opt, sched = finetune_optimizer(
        det.parameters(), recipe=recipe, epochs=epochs, steps_per_epoch=steps_per_epoch, lr=lr,
        weight_decay=weight_decay, optimizer=optimizer, momentum=momentum,
    )
    history = []
    for epoch in range(epochs):
        det.train()
        if freeze_batchnorm:
            for m in det.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        sums = {"loss": 0.0, "e_in": 0.0, "e_out": 0.0}
        total = 0
        for (a, y), (a_out, _) in epoch_batches():
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
        history.append({
            "finetune_loss": sums["loss"] / max(total, 1),
            "finetune_energy_in": sums["e_in"] / max(total, 1),
            "finetune_energy_out": sums["e_out"] / max(total, 1),
        })
    det.eval()
    return history


@dataclass
class DetectorTask:
    """One detector to train, as plain data (a task of the run's executor)."""

    network: str
    layer: str
    params: dict[str, Any]  # EnergyOODParams, dumped
    seed: int
    device: str
    num_classes: int
    shapes: dict[str, list[int]]


def finetune_settings(p: EnergyOODParams) -> dict[str, Any]:
    """The keyword arguments of `finetune` for ``p``'s recipe, plus ``id_augment`` and
    ``aux_augment``: whether the fine-tuning batches of the ID and of the auxiliary images
    are augmented.

    ``liu``: the ``finetune`` fields; ID batches augmented as in pre-training, auxiliary
    ones not. ``authors`` (exec_train_representation_classifier.py): Adam with pre-training's
    lr and weight decay (one ``-lr``/``-wd`` serves both phases), the batch (``-b``:
    ``finetune.batch_size`` or pre-training's) split in half ID, half auxiliary; the ID
    images unaugmented (their CIFAR-5M transform is ToTensor only), the auxiliary ones
    flipped and randomly cropped with padding 4 (general_utils/datasets/oe.py)."""
    f = p.finetune
    common = {"epochs": f.epochs, "m_in": f.m_in, "m_out": f.m_out, "weight": f.weight,
              "freeze_batchnorm": f.freeze_batchnorm, "recipe": f.recipe}
    batch = f.batch_size or p.pretrain.batch_size
    if f.recipe == "authors":
        half = max(1, batch // 2)
        return {**common, "batch_size": half, "aux_batch_size": half, "optimizer": "adam", "lr": p.pretrain.lr,
                "weight_decay": p.pretrain.weight_decay, "id_augment": False, "aux_augment": True}
    return {**common, "batch_size": batch, "aux_batch_size": f.aux_batch_size, "optimizer": f.optimizer,
            "lr": f.lr, "weight_decay": f.weight_decay, "momentum": f.momentum,
            "id_augment": p.pretrain.augment, "aux_augment": False}


def train_detector_task(task: DetectorTask, net_input: Any, data: Any, aux: Any) -> dict[str, Any]:
    """Pre-train and fine-tune the detector of ``task`` (anywhere: the driver or a Ray
    worker): its CPU state dict and the two phases' per-epoch metrics. Writes nothing."""
    p = EnergyOODParams.model_validate(task.params)
    device = torch.device(task.device)
    net = net_input.network(data, device)
    shapes = {k: tuple(v) for k, v in task.shapes.items()}
    det = new_detector(p, shapes[task.layer], task.num_classes, task.seed, device)
    sources = ActivationSource(p, shapes, device, net, data, lambda: aux,
                       lambda split, n: net_input.activations(data, split, n, device))
    train = sources.batches(task.layer, "train")
    aux_train = sources.batches(task.layer, "aux_train")
    g = torch.Generator().manual_seed(task.seed)
    what = f"OOD detector {task.network}-{task.layer}-energy-detector"
    h1 = pretrain(
        det, train, epochs=p.pretrain.epochs, batch_size=p.pretrain.batch_size, lr=p.pretrain.lr,
        weight_decay=p.pretrain.weight_decay, optimizer=p.pretrain.optimizer, generator=g,
        what=f"{what}: pre-training",
    )
    ft = finetune_settings(p)
    id_augment, aux_augment = ft.pop("id_augment"), ft.pop("aux_augment")
    ft_train = train if id_augment == p.pretrain.augment else sources.batches(task.layer, "train", augment=id_augment)
    if aux_augment:
        aux_train = sources.batches(task.layer, "aux_train", augment=True)
    h2 = finetune(det, ft_train, aux_train, generator=g, what=f"{what}: fine-tuning", **ft)
    return {"state": {k: v.detach().cpu() for k, v in det.state_dict().items()}, "pretrain": h1, "finetune": h2}


def fits_in_memory(shapes: dict[str, Any], n: int, limit_mb: float) -> bool:
    per_example = sum(math.prod(s) for s in shapes.values()) * 4
    return n * per_example <= limit_mb * (1 << 20)


class ActivationSource:
    """One network's layer activations for the detectors: of the ID set (``train`` /
    ``test``) or of the auxiliary set (``aux_train`` / ``aux_test``), from memory when the
    split's activations fit (``id_acts(split, n)`` gives the ID set's, shared with the
    run), else streamed through the network."""

    def __init__(self, p: EnergyOODParams, shapes: dict[str, Any], device: Any, net: Any, data: Any,
                 aux: Any, id_acts: Any):
        self.p, self.shapes, self.device, self.net, self.data = p, shapes, device, net, data
        self.aux = aux  # a callable: the auxiliary set is loaded only when needed
        self.id_acts = id_acts
        self._aux_acts: dict[str, dict[str, Any]] = {}

    def batches(self, layer: str, which: str, augment: bool | None = None) -> Any:
        """`LayerBatches` of ``which`` for ``layer``. ``augment``: null, the training images
        are augmented as ``pretrain.augment`` says, the others not; true, the ID set's
        augmentation (the auxiliary set's: random crop with padding 4 and horizontal flip,
        as the authors' oe.py); false, none."""
        if which.startswith("aux_"):
            data, split_name = self.aux(), which[4:]
        else:
            data, split_name = self.data, which
        split = getattr(data, split_name)
        n = len(split)
        if which == "test" and self.p.n_examples is not None:
            n = min(n, self.p.n_examples)
        labels = split_labels(split)[:n]
        if augment is None:
            augment = which == "train" and self.p.pretrain.augment
        if not augment:
            augment = None
        elif which.startswith("aux_"):
            augment = random_crop_flip(padding=4, flip=True)
        else:
            augment = data.augment
        if augment is None and fits_in_memory(self.shapes, n, self.p.memory_limit_mb):
            if which.startswith("aux_"):
                if which not in self._aux_acts:
                    self._aux_acts[which] = extract_activations(self.net, data=data, split=split_name,
                                                    device=next(self.net.parameters()).device)
                acts = self._aux_acts[which]
            else:
                acts = self.id_acts(which, None if which == "train" else self.p.n_examples)
            return LayerBatches(layer, labels, self.device, acts=acts[layer])
        if which == "test" and n < len(split):
            if isinstance(split, TensorSplit):
                split = TensorSplit(split.images[:n], split.labels[:n])
            else:
                split = torch.utils.data.Subset(split, range(n))
        return LayerBatches(layer, labels, self.device, net=self.net, split=split, augment=augment)
