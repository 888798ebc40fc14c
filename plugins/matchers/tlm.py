"""The ``tlm`` matcher: task loss matching (paper section 2.1, eq. 1).

T starts from the direct-matching solution (the ``dm`` params nested under ``dm``) and is
trained with cross-entropy of the stitched network g>j ∘ T ∘ f<=i on the (augmented)
training split. Only T's parameters change: both networks are frozen
(`stitchbench.stitching.frozen`) and stay in eval mode, so BatchNorm uses, and keeps, its
running statistics. The source half runs without gradients; see docs/matchers.md for when
its activations are cached across epochs. `fit_many` trains the cells of a matrix row (one
source layer) together, computing the source half once per batch for all of them.

Torch is imported inside the methods: ``stitchbench plugins list`` imports this module.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

import stitchbench
from stitchbench import Cost, DatasetInfo, Matcher, Params

from .dm import DirectMatching, eval_mode

if TYPE_CHECKING:
    import torch

    from stitchbench import StitchingLayer, StitchingProblem

log = logging.getLogger(__name__)


class TaskLossMatching(Matcher):
    """Task loss matching: the DM stitcher trained with cross-entropy through the frozen receiver."""

    name = "tlm"
    check_params: ClassVar[dict[str, Any]] = {"epochs": 1}  # `stitchbench plugins check`: one epoch

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
        precision: Literal["float32", "bfloat16", "float16"] = Field(
            "float32",
            description="dtype of the receiver's forward pass under torch.autocast (T and its Adam state stay "
            "float32; float16 adds loss scaling and needs CUDA); see docs/matchers.md for the tolerances",
        )
        channels_last: bool = Field(
            False, description="run the conv receiver and the source activations in channels-last memory format"
        )

    def estimate_cost(self, params: Any, info: DatasetInfo) -> Cost:
        """``epochs`` passes over the training split (front half forward, back half
        forward + backward) after a DM initialisation, and one stitched test pass."""
        p = self.Params.model_validate(params or {}) if not isinstance(params, self.Params) else params
        k = info.n_train if p.dm.k == "all" else min(int(p.dm.k), info.n_train)
        return Cost(tlm_images=p.epochs * info.n_train, forward_images=k + info.n_test)

    def fit(self, problem: StitchingProblem, params: Any = None) -> StitchingLayer:
        """The DM stitcher for this cell, trained on the task loss; both networks are left
        exactly as they were (parameters, buffers, ``requires_grad`` flags, modes)."""
        return self.fit_many([problem], params)[0]

    def fit_many(self, problems: Sequence[StitchingProblem], params: Any = None) -> list[StitchingLayer]:
        """What `fit` returns for each problem, with the cells that share a source (network,
        layer, data, seed, device) trained together: one pass over the data per epoch, the
        source half computed once per batch for all of them, then each stitcher's receiver
        forward and backward and its own Adam step. Each stitcher sees exactly the batches
        (and augmentations) it would see alone, so the results are those of `fit`."""
        params = self.Params.model_validate(params if params is not None else {})
        groups: dict[tuple[int, str, int, int, str], list[int]] = {}
        for n, p in enumerate(problems):
            key = (id(p.source), p.source_layer, id(p.data), p.seed, str(p.device))
            groups.setdefault(key, []).append(n)
        out: list[StitchingLayer | None] = [None] * len(problems)
        for members in groups.values():
            group = [problems[n] for n in members]
            # The same network may come more than once (the targets of a row are one network;
            # an intra-network row's source is that network too): each context below restores
            # it exactly as it was.
            nets = [group[0].source, *(p.target for p in group)]
            with eval_mode(*nets):
                for n, layer in zip(members, self._fit_group(group, nets, params)):
                    out[n] = layer
        return out  # type: ignore[return-value]

    def _fit_group(self, problems: list[StitchingProblem], nets: list[Any], params: Params) -> list[StitchingLayer]:
        import torch

        from stitchbench import frozen

        first = problems[0]
        if params.precision == "float16" and torch.device(first.device).type != "cuda":
            raise ValueError("tlm precision float16 needs a CUDA device; use bfloat16 or float32 on the CPU")
        augmenting = params.augment and first.data.augment is not None
        n_train = len(first.data.train)
        cache_bytes = 4 * n_train * math.prod(first.source_shape)
        use_cache = params.cache_source and not augmenting and cache_bytes <= params.cache_limit_mb * 2**20
        cells = [_Cell(p, DirectMatching().fit(p, params.dm), params) for p in problems]
        what = f"{first.source_layer} -> {', '.join(p.target_layer for p in problems)}"
        # One generator for the whole training: every epoch gets a new order (and new
        # augmentations); `train_batches` would restart from the seed if given none. All
        # the cells draw the same batches, as each would alone.
        generator = torch.Generator().manual_seed(first.seed)
        seconds: list[float] = []
        try:
            with frozen(*nets), _memory_format(nets, params.channels_last):
                for cell in cells:
                    cell.start()
                started = time.perf_counter()
                cached = _source_cache(first, params.batch_size) if use_cache and params.epochs else None
                cache_seconds = time.perf_counter() - started
                epochs = _progress(range(params.epochs), f"tlm {what}")
                for epoch in epochs:
                    started = time.perf_counter()
                    if cached is not None:
                        batches = _cached_batches(*cached, params.batch_size, generator)
                    else:
                        batches = _source_batches(first, params.batch_size, params.augment, generator)
                    for cell in cells:
                        cell.new_epoch()
                    for h, y in batches:
                        if params.channels_last and h.ndim == 4:
                            h = h.contiguous(memory_format=torch.channels_last)
                        for cell in cells:
                            cell.step(h, y)
                    for cell in cells:  # one synchronisation per cell and epoch
                        cell.end_epoch(epoch, params)
                    seconds.append(time.perf_counter() - started)
                    last = cells[-1]
                    epochs.set_postfix(loss=f"{last.losses[-1]:.4f}", acc=f"{last.accuracies[-1]:.3f}")
        finally:
            for cell in cells:
                cell.finish()

        for cell in cells:
            cell.layer.fit_info = {
                "matcher": "tlm",
                "dm": cell.dm_info,
                "epochs": params.epochs,
                "loss": cell.losses[-1] if cell.losses else None,
                "loss_per_epoch": cell.losses,
                "accuracy_per_epoch": cell.accuracies,
                "seconds_per_epoch": seconds,
                "trained_together": len(cells),
                "augment": augmenting,
                "precision": params.precision,
                "channels_last": params.channels_last,
                "source_cached": bool(use_cache and params.epochs),
                "cache_seconds": cache_seconds if use_cache and params.epochs else 0.0,
            }
            log.info(
                "tlm %s -> %s: %d epochs (%d stitchers together), training loss %s, DM residual %.6g",
                first.source_layer,
                cell.problem.target_layer,
                params.epochs,
                len(cells),
                f"{cell.losses[-1]:.5f}" if cell.losses else "n/a",
                cell.dm_info["residual"],
            )
        return [cell.layer for cell in cells]


class _Cell:
    """One stitcher being trained: its layer, stitched network, optimiser and running sums."""

    def __init__(self, problem: StitchingProblem, layer: StitchingLayer, params: TaskLossMatching.Params):
        import torch

        self.problem = problem
        self.layer = layer
        self.dm_info = dict(layer.fit_info)
        self.stitched = problem.stitched(layer)  # puts both networks in eval mode
        self.optimiser = torch.optim.Adam(list(layer.parameters()), lr=params.lr, weight_decay=params.weight_decay)
        self.device_type = torch.device(problem.device).type
        self.dtype = getattr(torch, params.precision)
        self.autocast = params.precision != "float32"
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
        self.scaler = torch.amp.GradScaler("cuda") if params.precision == "float16" else None
        self.losses: list[float] = []
        self.accuracies: list[float] = []

    def start(self) -> None:
        for p in self.layer.parameters():
            p.requires_grad_(True)
        self.stitched.train()  # T only; both halves stay in eval mode

    def new_epoch(self) -> None:
        import torch

        device = self.problem.device
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.count = 0

    def step(self, h: torch.Tensor, y: torch.Tensor) -> None:
        import torch
        import torch.nn.functional as F

        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.autocast):
            logits = self.stitched.forward_from_source(h)
        loss = F.cross_entropy(logits.float(), y)
        self.optimiser.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimiser.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimiser)
            self.scaler.update()
        self.total += loss.detach().double() * y.shape[0]
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.count += y.shape[0]

    def end_epoch(self, epoch: int, params: TaskLossMatching.Params) -> None:
        from stitchbench import DivergenceError

        mean_loss = float(self.total) / max(self.count, 1)  # a non-finite step makes the sum non-finite
        p = self.problem
        if not math.isfinite(mean_loss):
            raise DivergenceError(
                f"tlm diverged: non-finite training loss in epoch {epoch + 1}/{params.epochs} "
                f"stitching {type(p.source).__name__} {p.source_layer} -> "
                f"{type(p.target).__name__} {p.target_layer} (lr={params.lr:g}); try a smaller lr"
            )
        self.losses.append(mean_loss)
        self.accuracies.append(float(self.correct) / max(self.count, 1))
        log.debug(
            "tlm %s -> %s epoch %d/%d: loss %.5f, accuracy %.4f",
            p.source_layer,
            p.target_layer,
            epoch + 1,
            params.epochs,
            mean_loss,
            self.accuracies[-1],
        )

    def finish(self) -> None:
        self.optimiser.zero_grad(set_to_none=True)
        self.layer.train(False)


@contextlib.contextmanager
def _memory_format(nets: list[Any], channels_last: bool):
    """Within the block the networks' 4-d parameters and buffers are channels-last (when
    asked); afterwards contiguous again. Values are untouched, only the layout changes."""
    import torch

    if not channels_last:
        yield
        return
    try:
        for net in nets:
            net.to(memory_format=torch.channels_last)
        yield
    finally:
        for net in nets:
            net.to(memory_format=torch.contiguous_format)


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

    from stitchbench import iterate_batches

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
    from stitchbench import progress_bar

    return progress_bar(iterable=it, desc=desc, unit="epoch")


@stitchbench.hookimpl
def register_matchers(register):
    register(TaskLossMatching())
