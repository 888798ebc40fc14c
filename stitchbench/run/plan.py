"""From a validated configuration and the loaded plugins to a plan: the networks, the
layers, and the jobs with their keys. Every name and parameter is checked here, before
any heavy work, with errors that give the config path and the known names."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import ConfigError, PluginError, UsageError
from ..execution.executors import require_ray
from ..plugin.manager import PluginSet
from ..plugin.types import KINDS, Plugin
from . import boundary, conformance
from .config import RunConfig, format_validation_error
from .keys import job_key

log = logging.getLogger(__name__)


@dataclass
class PluginUse:
    """A plugin chosen for the run, with its validated params."""

    name: str
    obj: Plugin
    params: Any
    #: the identity of the plugin's code (`PluginSet.code_identity`), part of its jobs' keys
    code: str = ""

    def params_dict(self) -> dict[str, Any]:
        return self.params.model_dump(mode="json") if hasattr(self.params, "model_dump") else {}

    def changed_params(self) -> dict[str, Any]:
        """The params that differ from the plugin's defaults, as ``dotted.key -> value``
        (what a preset or a config chose: e.g. the authors' switches of a paper preset)."""
        try:
            defaults = self.obj.Params().model_dump(mode="json")
        except Exception:  # noqa: BLE001 - a Params with required fields has no defaults to compare
            defaults = {}
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any, default: Any) -> None:
            if isinstance(value, dict) and isinstance(default, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v, default.get(k))
            elif value != default:
                out[prefix] = value

        walk("", self.params_dict(), defaults)
        return out


@dataclass
class NetworkSpec:
    position: int
    seed: int
    model_name: str
    key: str


@dataclass
class MatrixJob:
    kind: str  # "stitch_matrix" | "index_matrix"
    plugin: PluginUse
    source: NetworkSpec
    target: NetworkSpec
    scope: str  # "intra" | "inter"
    key: str

    @property
    def label(self) -> str:
        arrow = self.source.model_name if self.scope == "intra" else f"{self.source.model_name} -> {self.target.model_name}"
        return f"{self.plugin.name} [{self.scope}] {arrow}"


@dataclass
class Plan:
    config: RunConfig
    dataset: PluginUse
    architecture: PluginUse
    data: Any  # LoadedDataset (None for a plan made without loading data)
    networks: list[NetworkSpec]
    layers: list[str]
    layer_shapes: dict[str, tuple[int, ...]]
    matchers: list[PluginUse]
    indices: list[PluginUse]
    evaluations: list[PluginUse]
    jobs: list[MatrixJob] = field(default_factory=list)
    dataset_key: str = ""
    info: Any = None  # DatasetInfo of a plan made without loading data (None: unknown, or data loaded)
    #: ``--no-reuse``: "all", plugin kinds and plugin names whose finished jobs are computed again
    no_reuse: frozenset[str] = frozenset()

    def recompute(self, use: PluginUse) -> bool:
        """True when jobs of ``use``'s plugin must be computed again, not reused (``--no-reuse``)."""
        return bool({"all", use.obj.kind, use.name} & self.no_reuse)

    def recompute_networks(self) -> bool:
        return self.recompute(self.architecture) or self.recompute(self.dataset)

    def describe(self) -> str:
        cfg = self.config
        lines = [
            f"experiment: {cfg.name}",
            f"dataset:    {self.dataset.name} {self.dataset.params_dict() or ''}".rstrip(),
            f"networks:   {len(self.networks)} x {self.architecture.name} {self.architecture.params_dict()}",
        ]
        for n in self.networks:
            lines.append(f"  - {n.model_name}  (seed {n.seed}, key {n.key})")
        lines.append(f"layers:     {len(self.layers)}: " + ", ".join(self.layers))
        lines.append("matchers:   " + (", ".join(m.name for m in self.matchers) or "(none)"))
        lines.append("indices:    " + (", ".join(i.name for i in self.indices) or "(none)"))
        lines.append("evaluations: " + (", ".join(e.name for e in self.evaluations) or "(none)"))
        chosen = [(u.name, u.changed_params()) for u in
                  [self.dataset, self.architecture, *self.matchers, *self.indices, *self.evaluations]]
        chosen = [(n, c) for n, c in chosen if c]
        if chosen:
            lines.append("params:     (those that differ from the plugins' defaults)")
            for name, changed in chosen:
                lines.append(f"  - {name}: " + ", ".join(f"{k}={v}" for k, v in changed.items()))
        n_cells = len(self.layers) ** 2
        lines.append(f"jobs:       {len(self.networks)} network(s), {len(self.jobs)} matrix job(s)"
                     f" ({sum(j.kind == 'stitch_matrix' for j in self.jobs) * n_cells} stitchers)")
        for j in self.jobs:
            lines.append(f"  - {j.kind:13} {j.label}  (key {j.key})")
        lines.append(f"device:     {cfg.device}")
        lines.append(f"executor:   {describe_executor(cfg.executor)}")
        return "\n".join(lines)


def describe_executor(ex: Any) -> str:
    """One line for an `ExecutorConfig`."""
    if ex.name == "local":
        return "local (this process, one job at a time)"
    where = f"cluster at {ex.ray_address}" if ex.ray_address else (
        f"local cluster, {ex.num_cpus} CPUs" if ex.num_cpus else "local cluster")
    gpus = "1 GPU on cuda" if ex.gpus_per_task is None else f"{ex.gpus_per_task:g} GPU"
    return f"ray ({where}; each job {ex.cpus_per_task:g} CPU, {gpus})"


def _validate_params(use_name: str, obj: Plugin, raw: dict[str, Any], path: str) -> Any:
    try:
        return obj.Params.model_validate(raw or {})
    except ValidationError as e:
        raise ConfigError(f"invalid parameters for {obj.kind.replace('_', ' ')} {use_name!r}:\n"
                          + format_validation_error(e, prefix=f"{path}.")) from None


def apply_plugin_selection(cfg: RunConfig, plugins: PluginSet, selected: list[str]) -> tuple[RunConfig, bool]:
    """Apply ``--plugin NAME`` options; returns the new config and whether a selection of
    matchers / indices / evaluations was made."""
    if not selected:
        return cfg, False
    data = cfg.model_dump()
    chosen: dict[str, list[str]] = {k: [] for k in KINDS}
    for name in selected:
        info = plugins.infos.get(name)
        if info is None:
            plugins.get(name)  # raises a UsageError listing every known plugin
        chosen[info.kind].append(name)
    for kind in ("dataset", "architecture"):
        if len(chosen[kind]) > 1:
            raise UsageError(f"--plugin names {len(chosen[kind])} {kind}s ({', '.join(chosen[kind])}); name one")
    if chosen["dataset"] and chosen["dataset"][0] != cfg.dataset.name:
        data["dataset"] = {"name": chosen["dataset"][0], "params": {}}
    if chosen["architecture"] and chosen["architecture"][0] != cfg.networks.architecture.name:
        data["networks"]["architecture"] = {"name": chosen["architecture"][0], "params": {}}
    selection = bool(chosen["matcher"] or chosen["similarity_index"] or chosen["evaluation"])
    if selection:
        data["stitching"]["matchers"] = chosen["matcher"]
        data["indices"]["names"] = chosen["similarity_index"]
        data["evaluations"]["names"] = chosen["evaluation"]
    out = RunConfig.model_validate(data)
    out._preset_params = cfg._preset_params
    return out, selection


def make_plan(
    cfg: RunConfig,
    plugins: PluginSet,
    *,
    selected: list[str] | None = None,
    load_data: bool = True,
    workspace: Path | None = None,
    no_reuse: list[str] | None = None,
) -> Plan:
    cfg, selection = apply_plugin_selection(cfg, plugins, selected or [])
    if cfg.executor.name == "ray":
        require_ray()  # before any data is loaded

    ds_obj = plugins.get(cfg.dataset.name, "dataset")
    if getattr(ds_obj, "auxiliary", False):
        raise UsageError(
            f"dataset.name: {cfg.dataset.name!r} is an auxiliary out-of-distribution set without class labels; "
            "choose a labelled data set (" + ", ".join(
                n for n in plugins.names("dataset") if not getattr(plugins.objects[n], "auxiliary", False)) + ")"
        )
    dataset = PluginUse(cfg.dataset.name, ds_obj, _validate_params(cfg.dataset.name, ds_obj, cfg.dataset.params,
                                                                   "dataset.params"), plugins.code_identity(ds_obj.name))
    arch_obj = plugins.get(cfg.networks.architecture.name, "architecture")
    arch = PluginUse(arch_obj.name, arch_obj, _validate_params(
        arch_obj.name, arch_obj, cfg.networks.architecture.params, "networks.architecture.params"),
        plugins.code_identity(arch_obj.name))

    data_dir = Path(cfg.data_dir).expanduser() if cfg.data_dir else None
    if load_data and getattr(ds_obj, "needs_data_dir", False) and data_dir is None:
        raise UsageError(
            f"dataset {cfg.dataset.name!r} is read from disk: pass --data-dir DIR (the directory holding it"
            + (", or add --download to fetch it there)" if getattr(ds_obj, "downloadable", False) else ")")
        )
    if data_dir is not None and not data_dir.exists():
        raise UsageError(f"--data-dir {data_dir} does not exist")

    data = boundary.loaded_dataset(ds_obj, ds_obj.load(dataset.params, data_dir, cfg.download)) if load_data else None
    # Without the data (a dry run), what the plugin knows of it without reading it.
    info = None if data is not None else ds_obj.info(dataset.params)

    # Names and shapes of the layers come from one throwaway instance of the architecture,
    # checked first (a network that cannot be stitched fails here, in a second).
    if data is not None or info is not None:
        num_classes, image_shape = (
            (data.num_classes, tuple(data.image_shape)) if data is not None else (info.num_classes, info.image_shape))
        probe, problems = conformance.checked_network(arch_obj, arch.params, num_classes, image_shape,
                                                      every_layer=False)
        if problems:
            raise PluginError(arch_obj.name, "the network it builds is not stitchable:\n  - " + "\n  - ".join(problems)
                              + f"\n(`stitchbench plugins check {arch_obj.name}` repeats these checks)", usage=True)
        all_layers = list(probe.layer_names)
        shapes = probe.layer_shapes(image_shape)
        del probe
    else:
        all_layers, shapes = [], {}
    layers = resolve_layers(cfg.stitching.layers, all_layers, arch_obj.name) if all_layers else []

    matchers = _uses(plugins, "matcher", cfg.stitching.matchers, cfg.stitching.params, "stitching")
    indices = _uses(plugins, "similarity_index", cfg.indices.names, cfg.indices.params, "indices")
    ev_names = cfg.evaluations.names
    if ev_names is None:
        ev_names = plugins.names("evaluation")
    elif selection and (matchers or indices):
        ev_names = list(ev_names) + [
            n for n in plugins.names("evaluation")
            if getattr(plugins.objects[n], "summarises_matrices", False) and n not in ev_names
        ]
    evaluations = _uses(plugins, "evaluation", ev_names, cfg.evaluations.params, "evaluations")
    # What the evaluations need that is not already in the run.
    have = {u.name for u in matchers + indices}
    for ev in list(evaluations):
        for need in getattr(ev.obj, "requires", ()):
            if need in have:
                continue
            obj = plugins.get(need)
            if obj.kind == "matcher":
                matchers += _uses(plugins, "matcher", [need], cfg.stitching.params, "stitching")
            elif obj.kind == "similarity_index":
                indices += _uses(plugins, "similarity_index", [need], cfg.indices.params, "indices")
            have.add(need)
    # An evaluation with nothing to summarise is dropped (e.g. --plugin on a dataset only).
    if not matchers and not indices:
        evaluations = [e for e in evaluations if not getattr(e.obj, "summarises_matrices", False)]
    _check_param_blocks(cfg, plugins, {u.name for u in matchers + indices + evaluations}, selection)
    for use in indices:  # those the evaluations require too
        problems = conformance.index_problems(use.obj, use.params)
        if problems:
            raise PluginError(use.name, "fails the similarity index checks on synthetic data:\n  - "
                              + "\n  - ".join(problems) + f"\n(`stitchbench plugins check {use.name}` repeats them)",
                              usage=True)

    dataset_key = job_key("dataset", name=dataset.name, params=dataset.params_dict(), code=dataset.code)
    networks = []
    for pos, seed in enumerate(cfg.networks.seed_list()):
        key = job_key(
            "network",
            dataset=dataset_key,
            architecture=arch.name,
            arch_params=arch.params_dict(),
            code=arch.code,
            training=cfg.networks.training.model_dump(mode="json"),
            seed=seed,
        )
        model_name = f"{dataset.name}-{arch_obj.tag(arch.params)}-seed{seed}"
        networks.append(NetworkSpec(pos, seed, model_name, key))
    if len({n.seed for n in networks}) != len(networks):
        raise ConfigError("networks.seeds: seeds must be distinct (two networks with one seed are the same network)")

    plan = Plan(cfg, dataset, arch, data, networks, layers, shapes, matchers, indices, evaluations,
                dataset_key=dataset_key, info=info)
    plan.no_reuse = _no_reuse(no_reuse or [], plan, plugins)
    plan.jobs = _jobs(plan)
    return plan


def resolve_layers(wanted: list[int | str] | None, all_layers: list[str], arch: str) -> list[str]:
    if wanted is None:
        return list(all_layers)
    n = len(all_layers)
    out = []
    for w in wanted:
        if isinstance(w, int):
            if not 0 <= w < n:
                raise ConfigError(
                    f"stitching.layers: layer {w} is out of range: {arch} has {n} stitchable layers "
                    f"(0..{n - 1}: {', '.join(all_layers)})"
                )
            out.append(all_layers[w])
        else:
            if w not in all_layers:
                raise ConfigError(f"stitching.layers: unknown layer {w!r}; {arch}'s layers are {', '.join(all_layers)}")
            out.append(w)
    if len(set(out)) != len(out):
        raise ConfigError("stitching.layers: a layer is listed twice")
    return out


def _uses(plugins: PluginSet, kind: str, names: list[str] | None, params: dict[str, dict], section: str) -> list[PluginUse]:
    if names is None:
        names = plugins.names(kind)
    uses = []
    for name in names:
        obj = plugins.get(name, kind)
        uses.append(PluginUse(name, obj, _validate_params(name, obj, params.get(name, {}), f"{section}.params.{name}"),
                              plugins.code_identity(name)))
    return uses


#: Where each kind's params are written in a run config.
PARAMS_SECTION = {
    "dataset": "dataset.params",
    "architecture": "networks.architecture.params",
    "matcher": "stitching.params",
    "similarity_index": "indices.params",
    "evaluation": "evaluations.params",
}
_LIST_OF = {"stitching.params": "stitching.matchers", "indices.params": "indices.names",
            "evaluations.params": "evaluations.names"}


def _check_param_blocks(cfg: RunConfig, plugins: PluginSet, in_run: set[str], selection: bool) -> None:
    """Every params block names a plugin of its section's kind that is in the run; one that
    is not is an error saying where it belongs. Allowed: blocks of plugins that ``--plugin``
    left out of the run, and blocks left as the preset wrote them (a preset's settings for a
    plugin a user's list leaves out)."""
    for section, kind, blocks in (("stitching.params", "matcher", cfg.stitching.params),
                                  ("indices.params", "similarity_index", cfg.indices.params),
                                  ("evaluations.params", "evaluation", cfg.evaluations.params)):
        for pname in blocks:
            info = plugins.infos.get(pname)
            if info is None:
                plugins.get(pname, kind)  # unknown: raises with the known names
            elif info.kind != kind:
                raise ConfigError(f"{section}.{pname}: {pname} is a {info.kind.replace('_', ' ')}, not a "
                                  f"{kind.replace('_', ' ')}; its params belong under {PARAMS_SECTION[info.kind]}"
                                  + (f".{pname}" if info.kind in ("matcher", "similarity_index", "evaluation") else
                                     f" (with {PARAMS_SECTION[info.kind].rsplit('.', 1)[0]}.name: {pname})"))
            elif (pname not in in_run and not selection
                  and blocks[pname] != cfg._preset_params.get(section.split(".")[0], {}).get(pname)):
                listed = _LIST_OF[section]
                raise ConfigError(f"{section}.{pname}: {pname} is not in this run ({listed} does not include it), so "
                                  f"these params would be ignored; add {pname} to {listed}, or remove its params")


def _no_reuse(wanted: list[str], plan: Plan, plugins: PluginSet) -> frozenset[str]:
    """``--no-reuse`` values checked: "all", a plugin kind, or the name of a plugin of the run."""
    in_run = {u.name for u in [plan.dataset, plan.architecture, *plan.matchers, *plan.indices, *plan.evaluations]}
    for w in wanted:
        if w == "all" or w in KINDS or w in in_run:
            continue
        if w in plugins.infos:
            raise UsageError(f"--no-reuse {w}: {w} is not in this run (its plugins: {', '.join(sorted(in_run))})")
        raise UsageError(f"--no-reuse {w}: give `all`, a plugin kind ({', '.join(KINDS)}) or the name of a plugin "
                         f"of this run ({', '.join(sorted(in_run))})")
    networks = {"dataset", "architecture", plan.dataset.name, plan.architecture.name}
    if networks & set(wanted):
        # every other job is computed from the networks: retrained networks, everything anew
        return frozenset({"all", *wanted})
    return frozenset(wanted)


def _jobs(plan: Plan) -> list[MatrixJob]:
    cfg = plan.config
    nets = plan.networks
    pairs: list[tuple[NetworkSpec, NetworkSpec, str]] = []
    if cfg.stitching.intra:
        pairs += [(n, n, "intra") for n in nets]
    if cfg.stitching.inter != "none":
        for a in range(len(nets)):
            for b in range(len(nets)):
                if a < b or (a > b and cfg.stitching.inter == "both_directions"):
                    pairs.append((nets[a], nets[b], "inter"))
    jobs = []
    for kind, uses in (("stitch_matrix", plan.matchers), ("index_matrix", plan.indices)):
        for use in uses:
            for src, tgt, scope in pairs:
                key = job_key(
                    kind,
                    plugin=use.name,
                    params=use.params_dict(),
                    code=use.code,
                    source=src.key,
                    target=tgt.key,
                    layers=plan.layers,
                    seed=cfg.seed,
                    n_examples=cfg.indices.n_examples if kind == "index_matrix" else None,
                )
                jobs.append(MatrixJob(kind, use, src, tgt, scope, key))
    return jobs
