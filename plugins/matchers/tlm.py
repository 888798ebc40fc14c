"""The ``tlm`` matcher: task loss matching (paper section 2.1, eq. 1).

T starts from the direct-matching solution (the ``dm`` params nested under ``dm``) and is
trained with cross-entropy of the stitched network g>j ∘ T ∘ f<=i on the (augmented)
training split. Only T's parameters change: both networks are frozen
(`stitchbench.stitching.frozen`) and stay in eval mode, so BatchNorm uses, and keeps, its
running statistics. The source half runs without gradients; see docs/matchers.md for when
its activations are cached across epochs.

Torch is imported inside the methods: ``stitchbench plugins list`` imports this module.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

from pydantic import Field

import stitchbench
from stitchbench import Cost, DatasetInfo, Matcher, Params

from .dm import DirectMatching, eval_mode

if TYPE_CHECKING:
    import torch

    from stitchbench.stitching import StitchingLayer, StitchingProblem

log = logging.getLogger(__name__)


class TaskLossMatching(Matcher):
    """Task loss matching: the DM stitcher trained with cross-entropy through the frozen receiver."""

    name = "tlm"

    class Params(Params):
        dm: DirectMatching.Params = Field(
            default_factory=DirectMatching.Params, description="params of the direct-matching initialisation"
        )
        epochs: int = Field(30, ge=0)
        batch_size: int = Field(256, ge=1)
        lr: float = Field(1e-3, gt=0, description="Adam learning rate")
        weight_decay: float = Field(1e-5, ge=0, description="Adam weight decay (L2 added to the gradient)")
        augment: bool = Field(True, description="train on the data set's augmentation, when it has one")
        cache_source: bool = Field(
            True,
            description="compute the source activations of the training split once and reuse them every "
            "epoch; only when no augmentation is applied (augmented images differ every epoch)",
        )
        cache_limit_mb: float = Field(2048, ge=0, description="largest source-activation cache, in MiB")

    def estimate_cost(self, params: Any, info: DatasetInfo) -> Cost:
        """``epochs`` passes over the training split (front half forward, back half
        forward + backward) after a DM initialisation, and one stitched test pass."""
        p = self.Params.model_validate(params or {}) if not isinstance(params, self.Params) else params
        k = info.n_train if p.dm.k == "all" else min(int(p.dm.k), info.n_train)
        return Cost(tlm_images=p.epochs * info.n_train, forward_images=k + info.n_test)

    def fit(self, problem: StitchingProblem, params: Any = None) -> StitchingLayer:
        """The DM stitcher for this cell, trained on the task loss; both networks are left
        exactly as they were (parameters, buffers, ``requires_grad`` flags, modes)."""
        params = self.Params.model_validate(params if params is not None else {})
        with eval_mode(problem.source, problem.target):
            return self._fit(problem, params)

    def _fit(self, problem: StitchingProblem, params: Params) -> StitchingLayer:
        import torch
        import torch.nn.functional as F

        from stitchbench.errors import DivergenceError
        from stitchbench.stitching import frozen

        layer = DirectMatching().fit(problem, params.dm)
        dm_info = dict(layer.fit_info)
        source, target = problem.source, problem.target
        where = f"{problem.source_layer} -> {problem.target_layer}"
        augmenting = params.augment and problem.data.augment is not None
        n_train = len(problem.data.train)
        cache_bytes = 4 * n_train * math.prod(problem.source_shape)
        use_cache = params.cache_source and not augmenting and cache_bytes <= params.cache_limit_mb * 2**20

        stitched = problem.stitched(layer)  # puts both networks in eval mode
        trainable = list(layer.parameters())
        optimiser = torch.optim.Adam(trainable, lr=params.lr, weight_decay=params.weight_decay)
        # One generator for the whole training: every epoch gets a new order (and new
        # augmentations); `train_batches` would restart from the seed if given none.
        generator = torch.Generator().manual_seed(problem.seed)
        losses: list[float] = []
        seconds: list[float] = []
        accuracies: list[float] = []
        try:
            with frozen(source, target):
                for p in trainable:
                    p.requires_grad_(True)
                stitched.train()  # T only; both halves stay in eval mode
                started = time.perf_counter()
                cached = _source_cache(problem, params.batch_size) if use_cache and params.epochs else None
                cache_seconds = time.perf_counter() - started
                epochs = _progress(range(params.epochs), f"tlm {where}")
                for epoch in epochs:
                    started = time.perf_counter()
                    if cached is not None:
                        batches = _cached_batches(*cached, params.batch_size, generator)
                    else:
                        batches = _source_batches(problem, params.batch_size, params.augment, generator)
                    total = torch.zeros((), dtype=torch.float64, device=problem.device)
                    correct = torch.zeros((), dtype=torch.int64, device=problem.device)
                    count = 0
                    for h, y in batches:
                        logits = stitched.forward_from_source(h)
                        loss = F.cross_entropy(logits, y)
                        optimiser.zero_grad(set_to_none=True)
                        loss.backward()
                        optimiser.step()
                        total += loss.detach().double() * y.shape[0]
                        correct += (logits.detach().argmax(1) == y).sum()
                        count += y.shape[0]
                    # One synchronisation per epoch; a non-finite step makes the sum non-finite.
                    mean_loss = float(total) / max(count, 1)
                    if not math.isfinite(mean_loss):
                        raise DivergenceError(
                            f"tlm diverged: non-finite training loss in epoch {epoch + 1}/{params.epochs} "
                            f"stitching {type(source).__name__} {problem.source_layer} -> "
                            f"{type(target).__name__} {problem.target_layer} (lr={params.lr:g}); "
                            "try a smaller lr"
                        )
                    accuracy = float(correct) / max(count, 1)
                    losses.append(mean_loss)
                    accuracies.append(accuracy)
                    seconds.append(time.perf_counter() - started)
                    epochs.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{accuracy:.3f}")
                    log.debug(
                        "tlm %s epoch %d/%d: loss %.5f, accuracy %.4f",
                        where,
                        epoch + 1,
                        params.epochs,
                        mean_loss,
                        accuracy,
                    )
                    if problem.progress is not None:
                        problem.progress(
                            f"tlm {where} epoch {epoch + 1}/{params.epochs} loss {mean_loss:.4f}"
                        )
        finally:
            optimiser.zero_grad(set_to_none=True)
            layer.train(False)

        layer.fit_info = {
            "matcher": "tlm",
            "dm": dm_info,
            "epochs": params.epochs,
            "loss": losses[-1] if losses else None,
            "loss_per_epoch": losses,
            "accuracy_per_epoch": accuracies,
            "seconds_per_epoch": seconds,
            "augment": augmenting,
            "source_cached": bool(use_cache and params.epochs),
            "cache_seconds": cache_seconds if use_cache and params.epochs else 0.0,
        }
        log.info(
            "tlm %s: %d epochs, training loss %s, DM residual %.6g",
            where,
            params.epochs,
            f"{losses[-1]:.5f}" if losses else "n/a",
            dm_info["residual"],
        )
        return layer


def _source_batches(problem: StitchingProblem, batch_size: int, augment: bool, generator: torch.Generator):
    """(f<=i(x), y) for one epoch of (optionally augmented) training batches; no gradients."""
    import torch

    for x, y in problem.train_batches(batch_size, augment=augment, generator=generator):
        with torch.no_grad():
            h = problem.source.front(x, problem.source_layer)
        yield h, y


def _source_cache(problem: StitchingProblem, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source activations and labels of the whole (unaugmented) training split, in split order."""
    import torch

    from stitchbench.data import iterate_batches

    hs, ys = [], []
    with torch.no_grad():
        for x, y in iterate_batches(problem.data.train, batch_size):
            hs.append(problem.source.front(x.to(problem.device), problem.source_layer))
            ys.append(y.to(problem.device))
    return torch.cat(hs), torch.cat(ys)


def _cached_batches(h: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Shuffled batches of the cache, drawn as `iterate_batches` draws them from a split in
    memory (so the epochs match the uncached ones batch for batch)."""
    import torch

    order = torch.randperm(h.shape[0], generator=generator).to(h.device)
    for start in range(0, h.shape[0], batch_size):
        idx = order[start : start + batch_size]
        yield h[idx], y[idx]


def _progress(it, desc: str):
    from stitchbench.progress import progress_bar

    return progress_bar(iterable=it, desc=desc, unit="epoch")


@stitchbench.hookimpl
def register_matchers(register):
    register(TaskLossMatching())
