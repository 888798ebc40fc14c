"""Small stand-ins for what the core hands plugins: data, networks, a `StitchingProblem`
and a `RunContext`, built in milliseconds and kept in memory (no MLflow store).

Use them in a plugin's own tests::

    from stitchbench.testing import fake_problem, fake_context

    layer = MyMatcher().fit(fake_problem(), MyMatcher.Params())
    result = MyEvaluation().run(fake_context(), MyEvaluation.Params())
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..nn.activations import ActivationCache
from ..nn.data import LoadedDataset, TensorSplit
from ..nn.network import StitchableNetwork
from ..nn.stitching import StitchingLayer, StitchingProblem
from ..plugin.types import ArchitecturePlugin, IndexContext, Params
from ..run import boundary
from ..run.context import MatrixRecord, RunContext
from ..run.plan import PluginUse
from ..store.artifacts import to_json


def tiny_data(n_train: int = 160, n_test: int = 48, num_classes: int = 3, image_shape: Sequence[int] = (3, 8, 8),
              seed: int = 0) -> LoadedDataset:
    """Random images whose class is the channel with the largest mean (learnable), as a
    `LoadedDataset` with in-memory `TensorSplit`s."""
    g = torch.Generator().manual_seed(seed)
    c = image_shape[0]

    def split(n: int) -> TensorSplit:
        x = torch.randn(n, *image_shape, generator=g)
        y = x.mean(dim=(2, 3))[:, :num_classes].argmax(1) if c >= num_classes else torch.randint(0, num_classes, (n,), generator=g)
        return TensorSplit(x, y)

    return LoadedDataset(name="tiny_fake", train=split(n_train), test=split(n_test), num_classes=num_classes,
                         image_shape=tuple(int(s) for s in image_shape))


class TinyNet(StitchableNetwork):
    """A 3-layer conv net: stem, blocks ``b0`` (C x H x W), ``b1`` (2C x H/2 x W/2), ``b2``
    (2C x H/2 x W/2), head (global pool, linear)."""

    def __init__(self, num_classes: int = 3, in_channels: int = 3, width: int = 4):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1), nn.Tanh())
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.Tanh()),
            nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.Tanh()),
            nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.Tanh()),
        ])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, num_classes))
        self.layer_names = ["b0", "b1", "b2"]


class TinyArchitecture(ArchitecturePlugin):
    """`TinyNet`s, for fake runs (not registered anywhere)."""

    name = "tiny_fake"

    class Params(Params):
        width: int = 4

    def build(self, params: Any, num_classes: int, image_shape: tuple[int, int, int]) -> StitchableNetwork:
        return TinyNet(num_classes, image_shape[0], getattr(params, "width", 4))


def tiny_networks(count: int = 2, data: LoadedDataset | None = None, width: int = 4) -> dict[str, TinyNet]:
    """``count`` `TinyNet`s (seeds 0, 1, ...), untrained, in eval mode, named ``fake-seed<i>``."""
    data = data or tiny_data()
    nets = {}
    for seed in range(count):
        torch.manual_seed(seed)
        nets[f"fake-seed{seed}"] = TinyNet(data.num_classes, data.image_shape[0], width).eval()
    return nets


def fake_problem(source_layer: str = "b0", target_layer: str = "b2", *, data: LoadedDataset | None = None,
                 networks: Mapping[str, StitchableNetwork] | None = None, seed: int = 0) -> StitchingProblem:
    """A `StitchingProblem` between two different `TinyNet`s (source ``fake-seed0``,
    target ``fake-seed1``) on `tiny_data`; by default from ``b0`` (4 x 8 x 8) to ``b2``
    (8 x 4 x 4), so a matcher meets different channel counts and spatial sizes."""
    data = data or tiny_data()
    nets = dict(networks or tiny_networks(2, data))
    src, tgt = list(nets.values())[:2]
    return StitchingProblem(source=src, source_layer=source_layer, target=tgt, target_layer=target_layer,
                            data=data, device=torch.device("cpu"), seed=seed, cache=ActivationCache())


# -- a run context kept in memory ---------------------------------------------------------


class MemoryJobRun:
    """What `RunContext.job_run` yields, kept in memory: the same methods as
    `stitchbench.JobRun`, recording into ``params``, ``metrics``, ``tags`` and ``artifacts``
    (artifact path -> the value: JSON-able objects, arrays, text, state dicts)."""

    def __init__(self, name: str, key: str | None = None) -> None:
        self.run_id = f"memory-{name}"
        self.name = name
        self.key = key
        self.params: dict[str, str] = {}
        self.metrics: dict[str, list[float]] = {}
        self.tags: dict[str, str] = {}
        self.artifacts: dict[str, Any] = {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update({str(k): str(v) for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log_history([metrics], first_step=step)

    def log_history(self, history: Sequence[Mapping[str, float]], first_step: int = 1) -> None:
        for row in history:
            for k, v in row.items():
                self.metrics.setdefault(str(k), []).append(float(v))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update({str(k): str(v) for k, v in tags.items()})

    def log_table(self, obj: Any, name: str) -> None:
        import json

        self.artifacts[name if name.endswith(".json") else f"{name}.json"] = json.loads(to_json(obj))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.artifacts[artifact_file] = str(text)

    def log_array(self, values: Any, stem: str, *, header: list[str] | None = None,
                  index: list[str] | None = None) -> None:
        self.artifacts[f"{stem}.npy"] = np.asarray(values)

    def log_figure(self, fig: Any, name: str) -> None:
        import matplotlib.pyplot as plt

        self.artifacts[name if Path(name).suffix else f"{name}.png"] = "figure"
        plt.close(fig)

    def log_file(self, local_path: str | Path, artifact_dir: str | None = None) -> None:
        name = Path(local_path).name
        self.artifacts[f"{artifact_dir}/{name}" if artifact_dir else name] = Path(local_path).read_bytes()

    def log_state_dict(self, state: Mapping[str, Any], artifact_file: str) -> None:
        self.artifacts[artifact_file] = {k: v.detach().cpu().clone() for k, v in state.items()}

    def register_weights(self, model_name: str, artifact_dir: str, tags: Mapping[str, str] | None = None) -> str:
        self.set_tags({"stitchbench.model_name": model_name, "stitchbench.model_version": "1"})
        return "1"

    def log_model(self, module: Any, input_example: Any, model_name: str, *, fallback_dir: str,
                  tags: Mapping[str, str] | None = None) -> str:
        self.artifacts[f"{fallback_dir}/state_dict.pt"] = {k: v.detach().cpu().clone()
                                                           for k, v in module.state_dict().items()}
        return self.register_weights(model_name, fallback_dir, tags)


@dataclasses.dataclass(frozen=True)
class MemoryFinishedJob:
    """A job finished in a `fake_context`, as `RunContext.find_job` returns it."""

    key: str
    run: MemoryJobRun

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def tags(self) -> dict[str, str]:
        return self.run.tags

    @property
    def params(self) -> dict[str, str]:
        return self.run.params

    @property
    def metrics(self) -> dict[str, float]:
        return {k: v[-1] for k, v in self.run.metrics.items()}

    @property
    def model_name(self) -> str | None:
        return self.run.tags.get("stitchbench.model_name")

    @property
    def model_version(self) -> str | None:
        return self.run.tags.get("stitchbench.model_version")

    def read_json(self, artifact: str) -> Any:
        return self.run.artifacts[artifact]

    def load_array(self, artifact: str) -> Any:
        return self.run.artifacts[artifact]

    def load_state_dict(self, artifact: str) -> dict[str, Any]:
        return self.run.artifacts[artifact]

    def path(self, artifact: str) -> Path:
        raise FileNotFoundError(f"{artifact}: a fake context keeps its jobs in memory, not in files")


@dataclasses.dataclass
class MemoryRunContext(RunContext):
    """A `RunContext` whose jobs and logs stay in memory (``jobs``: key -> `MemoryJobRun`;
    ``logged``: the evaluation's own run)."""

    jobs: dict[str, MemoryJobRun] = dataclasses.field(default_factory=dict)
    logged: MemoryJobRun = dataclasses.field(default_factory=lambda: MemoryJobRun("evaluation"))

    def find_job(self, key: str) -> Any:
        run = self.jobs.get(key)
        return MemoryFinishedJob(key, run) if run is not None and run.tags.get("complete") == "1" else None

    @contextmanager
    def job_run(self, name: str, *, key: str, kind: str, tags: Mapping[str, str] | None = None) -> Iterator[Any]:
        run = MemoryJobRun(name, key)
        run.set_tags({"stitchbench.kind": kind, **dict(tags or {})})
        yield run
        run.set_tags({"complete": "1"})
        self.jobs[key] = run

    def _out(self) -> Any:
        return self.logged


def fake_context(*, matchers: Sequence[Any] = (), indices: Sequence[Any] = (), networks: int = 2,
                 data: LoadedDataset | None = None, params: Mapping[str, Any] | None = None,
                 plugins: Any = None, config: Mapping[str, Any] | None = None, seed: int = 0) -> MemoryRunContext:
    """A `RunContext` of a tiny finished run, in memory: ``networks`` untrained `TinyNet`s on
    `tiny_data`, layers ``b0``, ``b1``, ``b2``, and intra- and inter-network matrices.

    ``matchers`` and ``indices`` (plugin objects, or names looked up in ``plugins``, the
    loaded plugin set, default: this environment's) fill real matrices with their
    ``params`` (name -> Params or dict; default: the plugin's defaults). With neither, the
    context holds one synthetic stitching matrix (measure ``fake_func``, randomly
    initialised stitchers) and one synthetic index matrix (``fake_index``), so an
    evaluation that summarises matrices has something to read.
    """
    from ..plugin.manager import load_plugins
    from ..run.config import RunConfig

    data = data or tiny_data(seed=seed)
    nets = tiny_networks(networks, data)
    plugin_set = plugins if plugins is not None else load_plugins()
    layers = ["b0", "b1", "b2"]
    cache = ActivationCache()
    arch = TinyArchitecture()
    cfg = RunConfig.model_validate({
        "name": "fake", "dataset": {"name": "fake_data"},
        "networks": {"architecture": {"name": arch.name}, "count": networks, "training": {"epochs": 0}},
        "indices": {"n_examples": len(data.test)}, "seed": seed, **dict(config or {}),
    })
    ctx = MemoryRunContext(
        config=cfg, data=data, networks=dict(nets), network_accuracy={}, layers=layers, matrices=[],
        device=torch.device("cpu"), workspace=Path.cwd(), cache=cache, plugins=plugin_set,
        architecture=PluginUse(arch.name, arch, arch.Params()), data_key=f"fake-data-{seed}",
    )
    ctx.network_accuracy = {n: _accuracy(net, data) for n, net in nets.items()}
    names = list(nets)
    pairs = [(a, a, "intra") for a in names] + [(names[i], names[j], "inter")
                                                for i in range(len(names)) for j in range(i + 1, len(names))]
    given = dict(params or {})

    def resolve(p: Any) -> Any:
        obj = plugin_set.get(p) if isinstance(p, str) else p
        raw = given.get(obj.name)
        return obj, raw if isinstance(raw, Params) else obj.Params.model_validate(raw or {})

    for m in matchers:
        obj, prm = resolve(m)
        for src, tgt, scope in pairs:
            ctx.matrices.append(_stitch_record(obj, prm, nets, src, tgt, scope, data, layers, cache, ctx, seed))
    for ix in indices:
        obj, prm = resolve(ix)
        for src, tgt, scope in pairs:
            ctx.matrices.append(_index_record(obj, prm, nets, src, tgt, scope, data, layers, cache, seed))
    if not matchers and not indices:
        for src, tgt, scope in pairs:
            ctx.matrices += _synthetic_records(nets, src, tgt, scope, data, layers)
    return ctx


def _accuracy(net: nn.Module, data: LoadedDataset) -> float:
    with torch.no_grad():
        return float((net(data.test.images).argmax(1) == data.test.labels).float().mean())


def _stitch_record(matcher: Any, params: Any, nets: dict, src: str, tgt: str, scope: str, data: LoadedDataset,
                   layers: list[str], cache: ActivationCache, ctx: RunContext, seed: int) -> MatrixRecord:
    n = len(layers)
    values = np.zeros((n, n))
    states: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    target_acc = max(ctx.network_accuracy[tgt], 1e-9)
    for i, a in enumerate(layers):
        for j, b in enumerate(layers):
            problem = StitchingProblem(nets[src], a, nets[tgt], b, data, torch.device("cpu"), seed, cache)
            torch.manual_seed(seed)
            layer = boundary.stitching_layer(matcher, "fit()", matcher.fit(problem, params), problem)
            with torch.no_grad():
                stitched = problem.stitched(layer).eval()
                acc = float((stitched(data.test.images).argmax(1) == data.test.labels).float().mean())
            values[i, j] = acc / target_acc
            states[i, j] = {k: v.detach().cpu() for k, v in layer.state_dict().items()}
    return MatrixRecord(measure=matcher.measure(), plugin=matcher.name, functional=True, higher_is_more_similar=True,
                        source=src, target=tgt, scope=scope, layers=list(layers), values=values,
                        stitcher_state=lambda i, j: states[i, j])


def _index_record(index: Any, params: Any, nets: dict, src: str, tgt: str, scope: str, data: LoadedDataset,
                  layers: list[str], cache: ActivationCache, seed: int) -> MatrixRecord:
    def acts(name: str, split: str, k: int | None) -> list[np.ndarray]:
        return cache.numpy_layers(nets[name], split, k, data, seed, layers)

    sources = acts(src, "test", None)
    targets = sources if scope == "intra" else acts(tgt, "test", None)
    ctx = IndexContext(params=params, same_network=scope == "intra",
                       train_sample=(lambda side, k: acts(src if side == "source" else tgt, "train_sample", k))
                       if getattr(index, "needs_train_activations", False) else None)
    values = boundary.index_matrix(index, sources, targets, ctx)
    return MatrixRecord(measure=index.name, plugin=index.name, functional=False,
                        higher_is_more_similar=bool(index.higher_is_more_similar), source=src, target=tgt,
                        scope=scope, layers=list(layers), values=values)


def _synthetic_records(nets: dict, src: str, tgt: str, scope: str, data: LoadedDataset,
                       layers: list[str]) -> list[MatrixRecord]:
    n = len(layers)
    shapes = nets[src].layer_shapes(data.image_shape)
    values = 1.0 - np.abs(np.subtract.outer(np.arange(n), np.arange(n))) / n
    states = {}
    for i, a in enumerate(layers):
        for j, b in enumerate(layers):
            torch.manual_seed(i * n + j)
            states[i, j] = StitchingLayer(shapes[a], shapes[b]).state_dict()
    common = {"source": src, "target": tgt, "scope": scope, "layers": list(layers), "higher_is_more_similar": True}
    return [MatrixRecord(measure="fake_func", plugin="fake_func", functional=True, values=values.copy(),
                         stitcher_state=lambda i, j: states[i, j], **common),
            MatrixRecord(measure="fake_index", plugin="fake_index", functional=False, values=values.copy(), **common)]
