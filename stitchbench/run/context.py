"""What evaluations see of a run (`RunContext`): networks, matrices, data and activations,
the run's executor for their tasks, the store for their finished jobs, and their own run
to log to; all through the core, never through MLflow or executor internals."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from ..execution.executors import Executor, Future
    from ..execution.worker_state import NetworkInput
    from ..nn.activations import ActivationCache
    from ..nn.data import LoadedDataset
    from ..nn.network import StitchableNetwork
    from ..nn.stitching import StitchedNetwork, StitchingLayer
    from ..plugin.manager import PluginSet
    from ..plugin.types import Params, Plugin
    from ..store.jobs import FinishedJob, JobRun
    from .config import RunConfig
    from .plan import PluginUse


@dataclass
class MatrixRecord:
    """One similarity matrix: ``values[i, j]`` compares source layer ``layers[i]`` with
    target layer ``layers[j]``.

    ``measure`` is the name results are reported under (a matcher's measure name, e.g.
    ``dm_func`` or ``tlm``, or an index name); ``plugin`` the matcher or index that made
    it; ``functional`` is True for matchers (relative accuracy); ``scope`` is ``intra``
    (source network = target network) or ``inter``; ``run_id`` the matrix job's run."""

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
    #: For stitching matrices: (i, j) -> the state dict of that cell's stitcher.
    stitcher_state: Callable[[int, int], dict[str, torch.Tensor]] | None = None


@dataclass
class RunContext:
    """Handed to ``Evaluation.run(context, params)``; see docs/plugins.md.

    What the run produced: ``networks`` (model name -> trained `StitchableNetwork`, eval
    mode), ``network_accuracy`` (their test accuracies), ``matrices`` (every
    `MatrixRecord`), ``layers`` (the stitched layer names), ``data`` (the
    `LoadedDataset`), ``config`` (the resolved `RunConfig`), ``device``, ``workspace``,
    ``run_id`` (the parent run). ``shared`` is a scratch mapping that lives for the whole
    run and is shared by every evaluation (e.g. features several evaluations need).

    The other attributes are the core's plumbing (the activation ``cache``, the
    ``plugins``, the ``executor``, ...); use the methods.
    """

    config: RunConfig
    data: LoadedDataset
    networks: dict[str, StitchableNetwork]
    network_accuracy: dict[str, float]
    layers: list[str]
    matrices: list[MatrixRecord]
    device: torch.device
    workspace: Path
    cache: ActivationCache | None = None
    plugins: PluginSet | None = None
    run_id: str | None = None
    network_keys: dict[str, str] = field(default_factory=dict)
    architecture: PluginUse | None = None
    executor: Executor | None = None
    data_key: str = "data"
    shared: dict[Any, Any] = field(default_factory=dict)
    #: The evaluation this context was handed to, and the run its outputs go to.
    plugin: str | None = None
    run: JobRun | None = None
    #: ``--no-reuse``: "all", kinds and plugin names whose finished jobs are not reused
    no_reuse: frozenset[str] = frozenset()

    def for_evaluation(self, name: str, run: JobRun | None) -> RunContext:
        """This context for evaluation ``name`` logging to ``run`` (the same networks,
        matrices, caches and ``shared`` scratch)."""
        return dataclasses.replace(self, plugin=name, run=run)

    # -- what the run produced -----------------------------------------------------------
    def measures(self) -> list[str]:
        """The measures of the run's matrices, in the order they were made."""
        return list(dict.fromkeys(m.measure for m in self.matrices))

    def matrices_of(self, measure: str, scope: str | None = None) -> list[MatrixRecord]:
        """The matrices of ``measure`` (of ``scope`` "intra" or "inter", if given)."""
        return [m for m in self.matrices if m.measure == measure and (scope is None or m.scope == scope)]

    def activations(self, model_name: str, split: str = "test", n: int | None = None) -> dict[str, torch.Tensor]:
        """Every stitchable layer's activations (float32, CPU) of the first ``n`` examples
        of ``split`` (``test``, ``train``, or ``train_sample``: the training split in the
        run's fixed random order), keyed by layer name; extracted once per run."""
        if self.cache is None:
            from ..nn.activations import ActivationCache

            self.cache = ActivationCache()
        return self.cache.all_layers(self.networks[model_name], split, n, self.data, self.config.seed)

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-example activation shape of every stitchable layer (computed once per run)."""
        key = ("layer_shapes", tuple(self.data.image_shape))
        if key not in self.shared:
            net = next(iter(self.networks.values()))
            self.shared[key] = net.layer_shapes(tuple(self.data.image_shape))
        return self.shared[key]

    def stitching_layer(self, record: MatrixRecord, i: int, j: int) -> StitchingLayer:
        """The fitted stitching layer of cell (i, j) of a stitching matrix, on ``device``,
        in eval mode: T for source layer ``record.layers[i]`` -> target ``record.layers[j]``."""
        from ..nn.lowrank import LowRankProjection
        from ..nn.stitching import StitchingLayer

        if record.stitcher_state is None:
            raise ValueError(f"matrix {record.measure} ({record.scope}) has no stitchers (it is not a stitching matrix)")
        shapes = self.layer_shapes()
        state = record.stitcher_state(i, j)
        layer = StitchingLayer(shapes[record.layers[i]], shapes[record.layers[j]])
        if "source_transform.basis" in state:
            layer.source_transform = LowRankProjection(state["source_transform.mean"], state["source_transform.basis"])
        layer.load_state_dict(state)
        return layer.to(self.device).eval()

    def stitched_network(self, record: MatrixRecord, i: int, j: int) -> StitchedNetwork:
        """g>j ∘ T ∘ f<=i for cell (i, j), both halves frozen in eval mode."""
        from ..nn.stitching import StitchedNetwork

        return StitchedNetwork(
            self.networks[record.source], record.layers[i], self.stitching_layer(record, i, j),
            self.networks[record.target], record.layers[j],
        )

    # -- other plugins -------------------------------------------------------------------
    def get_plugin(self, name: str) -> Plugin:
        """Another plugin of this run's plugin set, by name."""
        if self.plugins is None:
            from ..plugin.manager import get_plugin

            return get_plugin(name)
        return self.plugins.get(name)

    def params_of(self, name: str) -> Params:
        """The validated parameters plugin ``name`` has in this run's config (its defaults
        where the config gives none)."""
        obj = self.get_plugin(name)
        section = {
            "matcher": self.config.stitching.params,
            "similarity_index": self.config.indices.params,
            "evaluation": self.config.evaluations.params,
        }.get(obj.kind, {})
        if obj.kind == "dataset" and name == self.config.dataset.name:
            section = {name: self.config.dataset.params}
        elif obj.kind == "architecture" and name == self.config.networks.architecture.name:
            section = {name: self.config.networks.architecture.params}
        return obj.Params.model_validate(section.get(name) or {})

    # -- job keys and finished jobs ------------------------------------------------------
    def network_key(self, model_name: str) -> str:
        """What identifies network ``model_name`` in the keys of jobs derived from it (a
        detector, a probe): its job key in the run, or ``weights:<hash of its weights>``
        for a context built by hand."""
        key = self.network_keys.get(model_name)
        return key or "weights:" + weights_fingerprint(self.networks[model_name])

    def stored_key(self, key: str) -> str:
        """The key a job of this evaluation is stored under: ``key`` combined with the
        evaluation's name and the identity of its code (`PluginSet.code_identity`), so that
        editing the evaluation's code never reuses what the old code computed."""
        if self.plugin is None or self.plugins is None or self.plugin not in self.plugins.infos:
            return key
        from .keys import job_key

        return job_key("evaluation_job", key=key, evaluation=self.plugin, code=self.plugins.code_identity(self.plugin))

    def find_job(self, key: str) -> FinishedJob | None:
        """The finished job this evaluation stored with ``job_run(key=key)`` (in this run or
        any earlier one in the store), or None: its run FINISHED with every output written.
        Make the key with `stitchbench.job_key` from everything the result depends on; the
        evaluation's code identity is added to it (`stored_key`). Always None for an
        evaluation named by ``stitchbench run --no-reuse``."""
        from ..store.jobs import find_finished_job

        if {"all", "evaluation", self.plugin} & self.no_reuse:
            return None
        return find_finished_job(self.stored_key(key))

    @contextmanager
    def job_run(self, name: str, *, key: str, kind: str, tags: Mapping[str, str] | None = None) -> Iterator[JobRun]:
        """A nested run of this evaluation's run for a job of its own (a detector, a batch
        of probes): write the job's outputs to the `JobRun` inside the block; when the
        block ends normally the job is complete and `find_job(key)` finds it from then on.
        An exception ends the run FAILED and comes out naming the job and the evaluation."""
        from ..store.jobs import job_run

        with job_run(name, kind=kind, plugin=self.plugin, key=self.stored_key(key), tags=tags) as job:
            yield job

    # -- this evaluation's run -------------------------------------------------------------
    def _out(self) -> JobRun:
        if self.run is None:
            raise RuntimeError("this RunContext belongs to no evaluation run: nothing can be logged through it "
                               "(the pipeline hands each evaluation a context with its run)")
        return self.run

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Metrics on the evaluation's run (the ones in `EvaluationResult.metrics` also go on
        the parent run)."""
        self._out().log_metrics(metrics, step=step)

    def log_table(self, obj: Any, name: str) -> None:
        """A JSON-able object as ``<name>.json`` on the evaluation's run."""
        self._out().log_table(obj, name)

    def log_array(self, values: Any, stem: str, *, header: list[str] | None = None,
                  index: list[str] | None = None) -> None:
        """``<stem>.npy`` and ``<stem>.csv`` on the evaluation's run."""
        self._out().log_array(values, stem, header=header, index=index)

    def log_figure(self, fig: Any, name: str) -> None:
        """A matplotlib figure as ``<name>.png`` on the evaluation's run (and closed)."""
        self._out().log_figure(fig, name)

    def log_file(self, local_path: str | Path, artifact_dir: str | None = None) -> None:
        """A file into ``artifact_dir`` of the evaluation's run."""
        self._out().log_file(local_path, artifact_dir)

    # -- tasks ---------------------------------------------------------------------------
    def _executor(self) -> Executor:
        if self.executor is None:
            from ..execution.executors import LocalExecutor

            self.executor = LocalExecutor()
        return self.executor

    @property
    def tasks_in_process(self) -> bool:
        """True when tasks run in this process (the local executor)."""
        return bool(self._executor().in_process)

    def submit(self, fn: Callable[..., Any], *args: Any, label: str, cpus: float | None = None,
               gpus: float | None = None) -> Future:
        """Run ``fn(*args)`` as a task of the run's executor: a future whose ``result()`` is
        the return value. ``fn`` is a module-level function of plain-data arguments that
        writes nothing to MLflow (log what it returns, in ``run``); on Ray it runs as a Ray
        task. ``cpus`` / ``gpus``: its resource request (default: the executor's)."""
        from ..execution.executors import Resources

        resources = None
        if cpus is not None or gpus is not None:
            base = getattr(self._executor(), "resources", None) or Resources()
            resources = Resources(cpus if cpus is not None else base.cpus, gpus if gpus is not None else base.gpus)
        return self._executor().submit(fn, *args, label=label, resources=resources)

    def as_completed(self, futures: Iterable[Future]) -> Iterator[Future]:
        """Each of ``futures`` once, as it finishes (with the local executor: in order)."""
        return self._executor().as_completed(futures)

    def share(self, key: str, value: Any) -> Any:
        """A handle to pass to tasks instead of a large read-only ``value`` (stored once);
        ``key`` names it (a job key)."""
        return self._executor().share(key, value)

    def data_input(self) -> Any:
        """The run's data set, as a task argument."""
        return self.share(self.data_key, self.data)

    def network_input(self, model_name: str) -> NetworkInput:
        """Network ``model_name`` as a task argument: the task receives a
        `stitchbench.NetworkInput` (its weights travel only to other processes)."""
        from ..execution import worker_state as worker
        from ..execution.worker_state import NetworkInput, NetworkResult

        net = self.networks[model_name]
        key = self.network_keys.get(model_name) or f"network:{model_name}:{id(net)}"
        in_process = self.tasks_in_process
        if in_process:
            worker.state().add(key, net)  # the task finds it here, weights and all
        elif self.architecture is None:
            raise ValueError("RunContext.architecture is needed to send a network to another process")
        state = None if in_process else {k: v.detach().cpu() for k, v in net.state_dict().items()}
        # The seed only initialises a network that its weights then overwrite.
        result = NetworkResult(key, model_name, 0, float(self.network_accuracy.get(model_name, float("nan"))), state)
        return self.share(f"{key}/input", NetworkInput(self.architecture, result))


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weights_fingerprint(net: Any) -> str:
    """A hash of a network's weights and buffers (names, dtypes, shapes, bytes). Cached per
    network object until one of its tensors is modified in place (torch's version counters)."""
    import hashlib

    import torch

    state = net.state_dict()
    versions = tuple(t._version for t in state.values())
    hit = _FINGERPRINTS.get(net)
    if hit is not None and hit[0] == versions:
        return hit[1]
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    out = h.hexdigest()[:20]
    _FINGERPRINTS[net] = (versions, out)
    return out
