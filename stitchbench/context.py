"""What evaluations see of a run: networks, matrices and data, through the core."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class MatrixRecord:
    """One similarity matrix: ``values[i, j]`` compares source layer ``layers[i]`` with
    target layer ``layers[j]``.

    ``measure`` is the name results are reported under (a matcher's measure name, e.g.
    ``dm_func`` or ``tlm``, or an index name); ``functional`` is True for matchers
    (relative accuracy); ``scope`` is ``intra`` (source network = target network) or
    ``inter``."""

    measure: str
    plugin: str
    functional: bool
    higher_is_more_similar: bool
    source: str
    target: str
    scope: str
    layers: list[str]
    values: np.ndarray
    run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: For stitching matrices: a callable (i, j) -> state dict of that cell's stitcher.
    stitcher_state: Any = None


@dataclass
class RunContext:
    """Handed to ``Evaluation.run``.

    ``networks`` maps model names to trained `StitchableNetwork` objects (eval mode);
    ``network_accuracy`` their test accuracies; ``matrices`` every similarity matrix of the
    run; ``data`` the `LoadedDataset`; ``layers`` the stitched layer names; ``config`` the
    resolved `RunConfig`; ``device`` the torch device; ``workspace`` the workspace path.
    ``activations(model_name, split, n)`` returns cached per-layer activations.
    ``get_plugin(name)`` looks up another plugin of this run's plugin set.
    ``network_keys`` maps model names to the networks' job keys (what derived jobs, e.g.
    an evaluation's detectors, put in their own keys).
    """

    config: Any
    data: Any
    networks: dict[str, Any]
    network_accuracy: dict[str, float]
    layers: list[str]
    matrices: list[MatrixRecord]
    device: Any
    workspace: Path
    cache: Any = None
    plugins: Any = None
    run_id: str | None = None
    network_keys: dict[str, str] = field(default_factory=dict)

    def measures(self) -> list[str]:
        seen: list[str] = []
        for m in self.matrices:
            if m.measure not in seen:
                seen.append(m.measure)
        return seen

    def matrices_of(self, measure: str, scope: str | None = None) -> list[MatrixRecord]:
        return [m for m in self.matrices if m.measure == measure and (scope is None or m.scope == scope)]

    def activations(self, model_name: str, split: str = "test", n: int | None = None) -> dict[str, Any]:
        net = self.networks[model_name]
        return self.cache.all_layers(net, split, n, self.data, self.config.seed)

    def get_plugin(self, name: str) -> Any:
        return self.plugins.get(name)

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-example activation shape of every stitchable layer."""
        net = next(iter(self.networks.values()))
        return net.layer_shapes(tuple(self.data.image_shape))

    def stitching_layer(self, record: MatrixRecord, i: int, j: int) -> Any:
        """The fitted stitching layer of cell (i, j) of a stitching matrix, on ``device``,
        in eval mode: T for source layer ``record.layers[i]`` -> target ``record.layers[j]``."""
        from .lowrank import LowRankProjection
        from .stitching import StitchingLayer

        if record.stitcher_state is None:
            raise ValueError(f"matrix {record.measure} ({record.scope}) has no stitchers (it is not a stitching matrix)")
        shapes = self.layer_shapes()
        state = record.stitcher_state(i, j)
        layer = StitchingLayer(shapes[record.layers[i]], shapes[record.layers[j]])
        if "source_transform.basis" in state:
            layer.source_transform = LowRankProjection(state["source_transform.mean"], state["source_transform.basis"])
        layer.load_state_dict(state)
        return layer.to(self.device).eval()

    def stitched_network(self, record: MatrixRecord, i: int, j: int) -> Any:
        """g>j ∘ T ∘ f<=i for cell (i, j), both halves frozen in eval mode."""
        from .stitching import StitchedNetwork

        return StitchedNetwork(
            self.networks[record.source], record.layers[i], self.stitching_layer(record, i, j),
            self.networks[record.target], record.layers[j],
        )
