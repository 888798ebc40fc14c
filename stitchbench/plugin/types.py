"""Base classes of the things plugins register, one per kind.

This module imports neither torch nor numpy: ``stitchbench plugins list`` imports every
plugin module, and those modules subclass these at import time. Heavy imports belong
inside methods.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import numpy as np

    from ..nn.data import LoadedDataset
    from ..nn.network import StitchableNetwork
    from ..nn.stitching import StitchingLayer, StitchingProblem
    from ..run.context import RunContext

KINDS = ("dataset", "architecture", "matcher", "similarity_index", "evaluation")


class Params(BaseModel):
    """Base for a plugin's parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Plugin:
    """Common part of every registered object.

    ``name`` is unique across all kinds. ``description`` defaults to the first line of the
    class docstring. ``Params`` is a pydantic model of the plugin's parameters (the
    ``params`` given in the run config are validated against it).
    """

    kind: ClassVar[str] = ""
    name: str = ""
    description: str = ""
    Params: ClassVar[type[Params]] = Params
    #: The params ``stitchbench plugins check`` (and `stitchbench.testing.check_plugin`)
    #: use: small settings that exercise the code in seconds (e.g. one epoch).
    check_params: ClassVar[dict[str, Any]] = {}

    def describe(self) -> str:
        if self.description:
            return self.description
        doc = (type(self).__doc__ or "").strip()
        return doc.splitlines()[0].strip() if doc else ""

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name!r}>"


@dataclass(frozen=True)
class DatasetInfo:
    """What a data set is, known without reading it: classes, (C, H, W) of one image and
    the sizes of its splits. ``--dry-run`` plans and estimates from it."""

    num_classes: int
    image_shape: tuple[int, int, int]
    n_train: int
    n_test: int


@dataclass
class Cost:
    """Compute of some jobs, in image passes through a network of the run's architecture:
    ``train_images`` forward + backward passes, ``tlm_images`` a TLM stitcher's training
    passes (front half forward, back half forward + backward), ``forward_images`` forward
    passes. ``jobs`` counts the jobs it covers and ``what`` names them (``--dry-run``
    turns passes into GPU-hours with the architecture's measured or assumed throughput)."""

    train_images: float = 0.0
    forward_images: float = 0.0
    tlm_images: float = 0.0
    jobs: int = 1
    what: str = ""


@dataclass
class PlanSummary:
    """What ``estimate_cost`` of an evaluation sees of a planned run: ``info`` of the data
    set, the number of networks, the stitched layers and their per-example shapes, the
    number of stitching matrices per matcher (``stitch_matrices``) and of distinct target
    networks per matcher (``stitch_targets``), the number of index matrices, and the
    resolved config."""

    info: DatasetInfo
    networks: int
    layers: list[str]
    layer_shapes: dict[str, tuple[int, ...]]
    stitch_matrices: dict[str, int]
    stitch_targets: dict[str, int]
    index_matrices: int
    config: Any = None


class DatasetPlugin(Plugin):
    """A labelled image data set (or an auxiliary out-of-distribution set)."""

    kind = "dataset"
    #: True for auxiliary OOD sets (labels carry no meaning there).
    auxiliary: ClassVar[bool] = False
    #: True when the data must be found under ``--data-dir``.
    needs_data_dir: ClassVar[bool] = False
    #: True when ``load(..., download=True)`` can fetch a missing data set.
    downloadable: ClassVar[bool] = False

    def load(self, params: Any, data_dir: Path | None, download: bool = False) -> LoadedDataset:
        raise NotImplementedError

    def info(self, params: Any) -> DatasetInfo | None:
        """Classes, image shape and split sizes without loading anything (used by
        ``stitchbench run --dry-run`` to plan and estimate a run whose data is not at
        hand); None when they cannot be known before loading."""
        return None


class ArchitecturePlugin(Plugin):
    """Builds classifiers that can be split at their stitchable layers."""

    kind = "architecture"

    def build(self, params: Any, num_classes: int, image_shape: tuple[int, int, int]) -> StitchableNetwork:
        raise NotImplementedError

    def tag(self, params: Any) -> str:
        """A short name for these settings, used in model names (e.g. ``resnet18-w16``)."""
        return self.name


class Matcher(Plugin):
    """Finds a stitching transformation T for (source layer, target layer)."""

    kind = "matcher"
    #: The name its functional similarity (relative accuracy) is reported under; defaults
    #: to the matcher's name (``dm`` sets ``dm_func`` to keep it apart from ``dm_struct``).
    measure_name: ClassVar[str | None] = None

    def measure(self) -> str:
        return self.measure_name or self.name

    def fit(self, problem: StitchingProblem, params: Any) -> StitchingLayer:
        raise NotImplementedError

    def fit_many(self, problems: Sequence[StitchingProblem], params: Any) -> list[StitchingLayer]:
        """The stitchers of several cells of one matrix row: the problems share the source
        network, the source layer, the data, the seed and the device (the target layer
        differs). Must return, in order, what ``fit`` returns for each. This default fits
        them one by one; a matcher that can share work between the cells overrides it
        (``tlm`` computes the source half once per batch for all of them). The core calls
        it only when a matcher overrides it, so a plain matcher keeps per-cell resuming."""
        return [self.fit(problem, params) for problem in problems]

    def estimate_cost(self, params: Any, info: DatasetInfo) -> Cost | None:
        """The compute of fitting and evaluating *one* stitcher on data described by
        ``info`` (for ``--dry-run``); None: not estimated."""
        return None


class SimilarityIndex(Plugin):
    """A number for two activation matrices whose rows are the same examples."""

    kind = "similarity_index"
    higher_is_more_similar: ClassVar[bool] = True
    #: True when the index needs training-split activations too (e.g. a fitted map).
    needs_train_activations: ClassVar[bool] = False

    #: False for an index whose value changes when A and B swap (``plugins check`` then
    #: skips the symmetry check).
    symmetric: ClassVar[bool] = True

    def compute(self, A: Any, B: Any, params: Any = None) -> float:
        """The index of A (n, ...) and B (n, ...), rows the same examples, as a float.
        ``params``: this index's validated `Params` (None: the defaults). The core passes
        the run's params; an index whose ``compute`` takes no ``params`` still works."""
        raise NotImplementedError

    def matrix(self, sources: Sequence[Any], targets: Sequence[Any], context: IndexContext) -> np.ndarray:
        """Fill the (len(sources), len(targets)) matrix of values.

        The default calls ``compute`` for every pair, with ``context.params``; indices that
        can reuse per-layer statistics override it.
        """
        import inspect

        import numpy as np

        params = getattr(context, "params", None)
        takes = "params" in inspect.signature(self.compute).parameters
        out = np.empty((len(sources), len(targets)))
        for i, a in enumerate(sources):
            for j, b in enumerate(targets):
                out[i, j] = self.compute(a, b, params=params) if takes and params is not None else self.compute(a, b)
        return out


@dataclass
class IndexContext:
    """What an index's ``matrix`` may use besides the test activations.

    ``params`` are the index's validated params. ``train_sample(side, n)`` (set when the
    index has ``needs_train_activations``) returns the per-layer activations, in the same
    layer order, of ``n`` training images drawn in the run's fixed random order, for
    ``side`` "source" or "target". ``same_network`` is True for intra-network matrices.
    ``shared`` is a scratch mapping that lives for the whole run and is shared by every
    ``matrix`` call of this index: the core passes the same activation objects for the same
    (network, layer) throughout a run, so per-layer statistics kept there (keyed by object
    identity) are computed once per run, not once per matrix.
    """

    params: Any = None
    train_sample: Callable[[str, int], Sequence[Any]] | None = None
    same_network: bool = False
    shared: dict[Any, Any] = field(default_factory=dict)


class Evaluation(Plugin):
    """Consumes what a run produced and yields metrics, tables and figures."""

    kind = "evaluation"
    #: Evaluations that only summarise the similarity matrices run whenever any
    #: matrix is produced (so ``--plugin tlm`` still reports TLM's layer identification).
    summarises_matrices: ClassVar[bool] = False
    #: Names of other plugins (indices, matchers) this evaluation needs in the run.
    requires: ClassVar[tuple[str, ...]] = ()

    def run(self, context: RunContext, params: Any) -> EvaluationResult:
        raise NotImplementedError

    def estimate_cost(self, params: Any, plan: PlanSummary) -> list[Cost] | None:
        """The compute this evaluation adds to the planned run, one `Cost` per kind of
        job (for ``--dry-run``); [] when negligible, None when not estimated."""
        return None


@dataclass
class EvaluationResult:
    """What an evaluation returns.

    ``metrics`` go on the parent run (stable names, e.g. ``layer_id.intra.lcka``);
    ``tables`` are JSON-able objects logged as ``<name>.json``; ``figures`` are matplotlib
    figures logged as ``<name>.png``; ``report`` is this evaluation's section of
    ``stitchbench report`` (``report_key`` names it in the JSON) and ``report_text`` its
    human-readable form.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    report_key: str | None = None
    report: Any = None
    report_text: str = ""


BASE_CLASSES: dict[str, type[Plugin]] = {
    "dataset": DatasetPlugin,
    "architecture": ArchitecturePlugin,
    "matcher": Matcher,
    "similarity_index": SimilarityIndex,
    "evaluation": Evaluation,
}
HOOK_OF_KIND = {
    "dataset": "register_datasets",
    "architecture": "register_architectures",
    "matcher": "register_matchers",
    "similarity_index": "register_similarity_indices",
    "evaluation": "register_evaluations",
}
