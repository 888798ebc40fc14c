"""Linear probes: the probing accuracy F(rep) of Ding et al.'s tests (the authors' code,
szegedai/stitching-ood: one linear layer on pooled features, Adam).

A probe is one linear layer on a representation reduced to a vector per image: conv
activations (N, C, H, W) are global-average-pooled to (N, C); token activations (N, T, D)
give their class token, token 0, (N, D). It is trained with Adam (cross-entropy) and F is
its accuracy on the test split.

Probes are trained on features computed once (one forward pass over each split), not by
a forward pass of the network per probe epoch; so no augmentation is applied on this path
(the authors' code probed augmented training images). A rank-r approximation of the
representation, x -> m + (x − m)VVᵀ at every position or token, is affine, so it commutes
with global average pooling and with picking token 0: the probe of a low-rank
representation sees the pooled features passed through the same projection.

All the probes an evaluation needs are trained together, as one batched model with
independent parameters (`train_probes`): on a CPU the cost of a probe is the per-step
overhead, not the arithmetic, so this makes hundreds of probes cost about one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .params import ProbeParams
from .threads import one_cpu_thread


@dataclass
class ProbeGroup:
    """Probes on one input: pooled features ``train_x`` (N, C) and ``test_x`` (M, C);
    ``transforms[k]`` maps a batch (B, C) to probe k's input (B, C) (None: the features
    themselves); ``seeds[k]`` seeds probe k's initialisation."""

    train_x: Any
    test_x: Any
    transforms: list[Callable[[Any], Any] | None]
    seeds: list[int]


def train_probes(groups: Sequence[ProbeGroup], train_y: Any, test_y: Any, params: ProbeParams, num_classes: int,
                 *, order_seed: int = 0, device: Any = "cpu") -> list[list[float]]:
    """Test accuracy of every probe of every group, trained as one batched model.

    Inputs of different widths are zero-padded to the widest: a padded input column is
    always 0, so its weights get no gradient and change nothing, and each probe follows
    exactly the updates it would get alone (Adam is elementwise, the summed loss
    separates). Every probe sees the same mini-batches (order seeded by ``order_seed``);
    its parameters are initialised as ``nn.Linear``'s, from its own seed, so its result
    does not depend on which other probes it is trained with.
    """
    import torch
    import torch.nn.functional as F

    groups = [g for g in groups if g.transforms]
    if not groups:
        return []
    device = torch.device(device)
    train_y = torch.as_tensor(train_y).long().to(device)
    test_y = torch.as_tensor(test_y).long().to(device)
    feats = []
    for g in groups:
        tr = torch.as_tensor(g.train_x).float().to(device)
        te = torch.as_tensor(g.test_x).float().to(device)
        if tr.ndim != 2 or te.ndim != 2 or tr.shape[1] != te.shape[1]:
            raise ValueError(f"probe features must be (N, C) and (M, C), got {tuple(tr.shape)}, {tuple(te.shape)}")
        if len(g.seeds) != len(g.transforms):
            raise ValueError("one seed per probe is needed")
        feats.append((tr, te))
    n, m = train_y.shape[0], test_y.shape[0]
    width = max(tr.shape[1] for tr, _ in feats)
    n_probes = sum(len(g.transforms) for g in groups)

    def inputs(rows: Any, split: int) -> torch.Tensor:  # (R, B, width)
        out = []
        for g, f in zip(groups, feats):
            x = f[split][rows]
            part = torch.stack([x if t is None else t(x) for t in g.transforms])
            out.append(F.pad(part, (0, width - x.shape[1])))
        return torch.cat(out)

    weight = torch.zeros(n_probes, width, num_classes)
    bias = torch.zeros(n_probes, 1, num_classes)
    k = 0
    for g, (tr, _) in zip(groups, feats):
        c = tr.shape[1]
        for seed in g.seeds:
            gen = torch.Generator().manual_seed(int(seed))
            bound = 1.0 / c**0.5
            weight[k, :c] = (torch.rand(c, num_classes, generator=gen) * 2 - 1) * bound
            bias[k, 0] = (torch.rand(num_classes, generator=gen) * 2 - 1) * bound
            k += 1
    weight = weight.to(device).requires_grad_(True)
    bias = bias.to(device).requires_grad_(True)
    order_gen = torch.Generator().manual_seed(int(order_seed))
    with one_cpu_thread(device):
        _fit(params, weight, bias, n, order_gen, inputs, train_y, n_probes, num_classes, device)
        correct = torch.zeros(n_probes, dtype=torch.long, device=device)
        with torch.no_grad():
            for start in range(0, m, 1024):
                rows = torch.arange(start, min(m, start + 1024), device=device)
                pred = torch.baddbmm(bias, inputs(rows, 1), weight).argmax(-1)
                correct += (pred == test_y[rows]).sum(1)
    accs = [c / max(m, 1) for c in correct.tolist()]
    out, k = [], 0
    for g in groups:
        out.append(accs[k : k + len(g.transforms)])
        k += len(g.transforms)
    return out


def probe_task(groups: Sequence[ProbeGroup], train_y: Any, test_y: Any, params: ProbeParams, num_classes: int,
               order_seed: int, device: str) -> list[list[float]]:
    """`train_probes` as a task of the run's executor (positional arguments only)."""
    return train_probes(groups, train_y, test_y, params, num_classes, order_seed=order_seed, device=device)


def _fit(params: ProbeParams, weight: Any, bias: Any, n: int, order_gen: Any, inputs: Any,
         train_y: Any, n_probes: int, num_classes: int, device: Any) -> None:
    import torch
    import torch.nn.functional as F

    opt = _Adam([weight, bias], params.weight_decay)
    for epoch in range(params.epochs):
        drop = params.lr_drop_epoch is not None and epoch >= params.lr_drop_epoch
        opt.lr = params.lr * (params.lr_drop_factor if drop else 1.0)
        order = torch.randperm(n, generator=order_gen).to(device)
        for start in range(0, n, params.batch_size):
            idx = order[start : start + params.batch_size]
            with torch.no_grad():
                xb = inputs(idx, 0)
            logits = torch.baddbmm(bias, xb, weight)  # (R, B, K)
            # the sum over probes of each probe's mean loss: the gradients separate
            loss = F.cross_entropy(logits.reshape(-1, num_classes), train_y[idx].repeat(n_probes),
                                   reduction="sum") / len(idx)
            weight.grad = bias.grad = None
            loss.backward()
            opt.step()


class _Adam:
    """Adam (Kingma & Ba; torch.optim.Adam's update with its defaults, L2 weight decay added
    to the gradient), written out: constructing torch.optim.Adam imports torch._dynamo,
    which costs seconds in a process that has not trained anything."""

    def __init__(self, params: list[Any], weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        import torch

        self.params = params
        self.weight_decay = weight_decay
        self.b1, self.b2 = betas
        self.eps = eps
        self.lr = 1e-3
        self.t = 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def step(self) -> None:
        import torch

        self.t += 1
        c1 = 1 - self.b1**self.t
        c2 = 1 - self.b2**self.t
        with torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v):
                g = p.grad if not self.weight_decay else p.grad + self.weight_decay * p
                m.mul_(self.b1).add_(g, alpha=1 - self.b1)
                v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
                p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-self.lr / c1)


def probe_accuracies(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    transforms: Sequence[Callable[[Any], Any] | None],
    params: ProbeParams,
    num_classes: int,
    *,
    seed: int = 0,
    device: Any = "cpu",
) -> list[float]:
    """Test accuracies of one linear probe per transform of the pooled features (one
    `ProbeGroup`; probe k initialised from ``seed + k``, mini-batches from ``seed``)."""
    if not transforms:
        return []
    group = ProbeGroup(train_x, test_x, list(transforms), [seed + k for k in range(len(transforms))])
    return train_probes([group], train_y, test_y, params, num_classes, order_seed=seed, device=device)[0]
