"""The run configuration: pydantic models (unknown keys are errors), presets, overrides.

A configuration is built from a preset (``quick`` by default), then a ``--config`` file
(YAML or TOML, merged over the preset), then ``--set dotted.key=value`` overrides. Plugin
parameters (``params`` mappings) are validated later, against each plugin's own
``Params`` model, when the plan is made.
"""

from __future__ import annotations

import copy
import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from ..errors import ConfigError, UsageError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PluginRef(Strict):
    """A plugin by name with its parameters."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class TrainingConfig(Strict):
    """How base networks are trained."""

    epochs: int = Field(10, ge=0, description="training epochs (0: keep the initialisation)")
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only")
    lr_step_epochs: int | None = Field(None, ge=1, description="multiply the lr by lr_gamma every N epochs")
    lr_gamma: float = Field(0.1, gt=0)
    augment: bool = True


class NetworksConfig(Strict):
    """The base networks: ``count`` networks of one architecture, differing only in seed."""

    architecture: PluginRef = Field(description="the architecture plugin and its params (set by every preset)")
    count: int = Field(2, ge=1)
    seeds: list[int] | None = Field(None, description="one seed per network (default 0..count-1)")
    training: TrainingConfig = Field(default_factory=TrainingConfig)

    def seed_list(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else list(range(self.count))


class StitchingConfig(Strict):
    """Which stitching matrices to fill."""

    matchers: list[str] | None = Field(None, description="matcher names; null = every registered matcher")
    params: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-matcher params")
    layers: list[int | str] | None = Field(None, description="stitchable layers (0-based index or name); null = all")
    intra: bool = True
    inter: Literal["one_direction", "both_directions", "none"] = "one_direction"
    eval_batch_size: int = Field(256, ge=1)


class IndicesConfig(Strict):
    """Which structural similarity indices to compute, on how many test examples."""

    names: list[str] | None = Field(None, description="index names; null = every registered index")
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    n_examples: int = Field(1000, ge=2, description="the first n test examples (unshuffled)")


class EvaluationsConfig(Strict):
    names: list[str] | None = Field(None, description="evaluation names; null = every registered evaluation")
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)


class ExecutorConfig(Strict):
    """Where the jobs run (see docs/scaling.md). Results do not depend on it, so it is not
    part of any job key: a Ray run reuses what a local run finished, and vice versa."""

    name: Literal["local", "ray"] = Field("local", description="local: in this process, one job at a time; "
                                          "ray: Ray tasks (pip install -e \".[ray]\")")
    ray_address: str | None = Field(
        None, description="ray only: a running cluster to use (e.g. auto); null starts a local one for the run")
    num_cpus: int | None = Field(None, ge=1, description="ray only: CPUs of the local cluster (null: all)")
    cpus_per_task: float = Field(1.0, gt=0, description="ray only: CPUs each job asks for (its torch threads)")
    gpus_per_task: float | None = Field(
        None, ge=0, description="ray only: GPUs each job asks for; a fraction shares a GPU (null: 1 on cuda, else 0)")


class RunConfig(Strict):
    """One ``stitchbench run``."""

    name: str = Field("quick", description="the MLflow experiment the run goes to")
    description: str = ""
    dataset: PluginRef = Field(description="the data set plugin and its params (set by every preset)")
    networks: NetworksConfig
    stitching: StitchingConfig = Field(default_factory=StitchingConfig)
    indices: IndicesConfig = Field(default_factory=IndicesConfig)
    evaluations: EvaluationsConfig = Field(default_factory=EvaluationsConfig)
    data_dir: str | None = None
    download: bool = False
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    seed: int = Field(0, description="seed of data sampling for matchers and evaluations")
    requires: list[Literal["gpu", "data_dir"]] = Field(
        default_factory=list, description="what this preset needs to be practical (checked, with a warning)"
    )

    #: The params blocks the preset gave ({"stitching": {name: params}, ...}): a block left
    #: as the preset wrote it may name a plugin the run leaves out; one a user wrote may not.
    _preset_params: dict[str, dict[str, Any]] = PrivateAttr(default_factory=dict)

    @field_validator("executor", mode="before")
    @classmethod
    def _executor_by_name(cls, v: Any) -> Any:
        # `executor: ray` (and `--set executor=ray`) is short for `executor: {name: ray}`.
        return {"name": v} if isinstance(v, str) else v


# -- presets ------------------------------------------------------------------------------


def preset_names() -> list[str]:
    files = resources.files(__package__).joinpath("presets").iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def preset_data(name: str) -> dict[str, Any]:
    if name not in preset_names():
        raise UsageError(f"unknown preset {name!r}; presets are: {', '.join(preset_names())}")
    text = resources.files(__package__).joinpath("presets", f"{name}.yaml").read_text()
    data = yaml.safe_load(text) or {}
    own_name = data.get("name", name)
    base = data.pop("extends", None)
    if base:
        data = deep_merge(preset_data(base), data)
    data["name"] = own_name
    return data


def preset_summary(name: str) -> str:
    text = resources.files(__package__).joinpath("presets", f"{name}.yaml").read_text()
    data = yaml.safe_load(text) or {}
    return str(data.get("description", "")).strip().splitlines()[0] if data.get("description") else ""


# -- building a config --------------------------------------------------------------------


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base``. A plugin reference (a mapping with ``name``) that
    names another plugin replaces the old one whole, so old params do not leak into it."""
    if "name" in over and "name" in base and over["name"] != base["name"] and "params" in base:
        return copy.deepcopy(over)
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif p.suffix.lower() in (".yaml", ".yml", ".json"):
            data = yaml.safe_load(text)
        else:
            raise UsageError(f"config file {p}: use a .yaml, .yml, .json or .toml file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise UsageError(f"config file {p} cannot be parsed: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {p} must hold a mapping at its top level")
    return data


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``dotted.key=value`` (value parsed as YAML: numbers, booleans, lists, null)."""
    if "=" not in assignment:
        raise UsageError(f"--set {assignment!r}: expected dotted.key=value, e.g. --set networks.count=3")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UsageError(f"--set {assignment!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise UsageError(f"--set {key}: {part!r} is not a mapping (it is {nxt!r})")
        node = nxt
    if parts[-1] == "name" and "params" in node and node.get("name") != value:
        node["params"] = {}  # the old plugin's params: not for the new one
    node[parts[-1]] = value


def format_validation_error(e: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in e.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (misspelt?)"
        lines.append(f"{prefix}{path}: {msg}")
    return "\n".join(lines)


def validate(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError("invalid configuration:\n" + format_validation_error(e)) from None


def build_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> RunConfig:
    """Preset (default ``quick``, or the file's ``preset`` key) <- file <- extra <- overrides."""
    file_data = read_config_file(config_file) if config_file else {}
    preset = preset or file_data.pop("preset", None) or "quick"
    file_data.pop("preset", None)
    base = preset_data(preset)
    data = deep_merge(base, file_data)
    if config_file and "name" not in file_data:
        data["name"] = Path(config_file).stem
    if extra:
        data = deep_merge(data, extra)
    # A plugin's name first, then its params: `--set x.name=other` starts `other` with no
    # params (another plugin's params mean nothing to it), whatever the order on the line.
    for o in sorted(overrides or [], key=lambda o: not o.split("=", 1)[0].strip().endswith(".name")):
        apply_override(data, o)
    data.pop("extends", None)
    cfg = validate(data)
    cfg._preset_params = {s: copy.deepcopy((base.get(s) or {}).get("params") or {})
                          for s in ("stitching", "indices", "evaluations")}
    return cfg


def config_json(cfg: RunConfig) -> str:
    return json.dumps(cfg.model_dump(mode="json"), indent=2, sort_keys=True)


def flat_params(cfg: RunConfig) -> dict[str, str]:
    """The config as flat ``dotted.key -> value`` strings, for MLflow params."""
    out: dict[str, str] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict) and v:
            for k, sub in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), sub)
        else:
            out[prefix] = json.dumps(v) if not isinstance(v, str) else v

    walk("", cfg.model_dump(mode="json"))
    return out
