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

    Tasks: an evaluation's independent pieces of work (a detector, a batch of probes) go
    to the run's executor with ``submit(fn, *args, label=...)`` and come back as futures
    (``as_completed`` yields them as they finish); on Ray they are Ray tasks. ``fn`` is a
    module-level function of plain-data arguments; it must not touch MLflow (log what it
    returns here, in the driver). Large read-only inputs go once through ``share`` (the
    run's data set: ``data_input()``; a network: ``network_input(name)``, which a task
    receives as a `stitchbench.NetworkInput`).
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
    architecture: Any = None  # the run's PluginUse of its architecture
    executor: Any = None  # where tasks run (None: here, one at a time)
    data_key: str = "data"

    # -- tasks ---------------------------------------------------------------------------
    def _executor(self) -> Any:
        if self.executor is None:
            from .executors import LocalExecutor

            self.executor = LocalExecutor()
        return self.executor

    @property
    def tasks_in_process(self) -> bool:
        """True when tasks run in this process (the local executor)."""
        return bool(self._executor().in_process)

    def submit(self, fn: Any, *args: Any, label: str, cpus: float | None = None, gpus: float | None = None) -> Any:
        """Run ``fn(*args)`` as a task of the run's executor (see the class docstring); a
        future whose ``result()`` is the return value. ``cpus`` / ``gpus``: its resource
        request (default: the executor's per-task request)."""
        from .executors import Resources

        resources = None
        if cpus is not None or gpus is not None:
            base = getattr(self._executor(), "resources", None) or Resources()
            resources = Resources(cpus if cpus is not None else base.cpus, gpus if gpus is not None else base.gpus)
        return self._executor().submit(fn, *args, label=label, resources=resources)

    def as_completed(self, futures: Any) -> Any:
        """Each of ``futures`` once, as it finishes (with the local executor: in order)."""
        return self._executor().as_completed(futures)

    def share(self, key: str, value: Any) -> Any:
        """A handle to pass to tasks instead of ``value`` (stored once); ``key`` names it."""
        return self._executor().share(key, value)

    def data_input(self) -> Any:
        """The run's data set, as a task argument."""
        return self.share(self.data_key, self.data)

    def network_input(self, model_name: str) -> Any:
        """Network ``model_name`` as a task argument: the task receives a
        `stitchbench.NetworkInput` (its weights travel only to other processes)."""
        from .worker import NetworkInput, NetworkResult

        net = self.networks[model_name]
        key = self.network_keys.get(model_name) or f"network:{model_name}:{id(net)}"
        in_process = self.tasks_in_process
        if in_process:
            from . import worker

            worker.state().add(key, net)  # the task finds it here, weights and all
        elif self.architecture is None:
            raise ValueError("RunContext.architecture is needed to send a network to another process")
        state = None if in_process else {k: v.detach().cpu() for k, v in net.state_dict().items()}
        # The seed only initialises a network that its weights then overwrite.
        result = NetworkResult(key, model_name, 0, float(self.network_accuracy.get(model_name, float("nan"))), state)
        return self.share(f"{key}/input", NetworkInput(self.architecture, result))

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
