"""Conformance checks per plugin kind, on tiny synthetic inputs (seconds per plugin).

`check_plugin(obj)` raises `PluginCheckError` listing every problem it found, and returns
the names of the checks that ran; `plugin_problems(obj)` returns the problems instead.
``stitchbench plugins check`` runs the same checks. What is checked:

* dataset: ``load`` (unless it needs ``--data-dir``) returns a `LoadedDataset` whose
  examples are (image of ``image_shape``, label in range); ``info`` agrees with it.
* architecture: a built network is a `StitchableNetwork` whose stitchable layers are
  registered submodules, ``front``/``back`` compose to the forward pass at every layer,
  ``activations`` equals ``front`` (`stitchbench.nn.conformance`); ``tag`` is a string.
* matcher: ``fit`` on a `fake_problem` returns a `StitchingLayer` for the problem's shapes
  with finite parameters that maps source activations to the target's shape; an
  overridden ``fit_many`` returns one such layer per problem, equal to ``fit``'s.
* similarity index: finite float values, identical inputs score best (0 for a distance),
  symmetry unless ``symmetric = False``, ``matrix`` agrees with ``compute``, numpy and
  torch inputs agree (`stitchbench.run.conformance`).
* evaluation: ``run`` on a `fake_context` (with the plugins its ``requires`` names)
  returns an `EvaluationResult` whose metrics are numbers (a NaN one, an undefined
  statistic, is left out with a warning, as in a run) and whose tables and report are
  JSON-able.

A plugin's ``check_params`` (a dict, default empty) are the params the checks use: small
settings (one epoch, a few examples) so that a check takes seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import PluginError
from ..plugin.types import Matcher, Params
from ..run import boundary, conformance
from ..store.artifacts import to_json
from .fakes import fake_context, fake_problem, tiny_data

#: The input image shape networks are checked on (an architecture's params may need another).
IMAGE_SHAPE = (3, 32, 32)


class PluginCheckError(PluginError):
    """A plugin failed conformance checks; ``problems`` lists them."""

    def __init__(self, plugin: str, problems: list[str]):
        super().__init__(plugin, "fails its checks:\n  - " + "\n  - ".join(problems), usage=True)
        self.problems = problems


@dataclass
class CheckResult:
    """The outcome of checking one plugin: ``checks`` that ran, ``problems`` found."""

    name: str
    kind: str
    checks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_plugin(plugin: Any, params: Any = None, *, image_shape: tuple[int, int, int] | None = None,
                 plugins: Any = None) -> list[str]:
    """Check ``plugin`` (a registered object of any kind); raise `PluginCheckError` with
    every problem, else return the names of the checks made. ``params``: its Params (or a
    dict; default: the plugin's ``check_params``). ``plugins``: the plugin set an
    evaluation's ``requires`` are looked up in (default: this environment's)."""
    result = run_checks(plugin, params, image_shape=image_shape, plugins=plugins)
    if result.problems:
        raise PluginCheckError(result.name, result.problems)
    return result.checks


def plugin_problems(plugin: Any, params: Any = None, **kwargs: Any) -> list[str]:
    """The problems `check_plugin` would raise, as a list ([] when it passes)."""
    return run_checks(plugin, params, **kwargs).problems


def run_checks(plugin: Any, params: Any = None, *, image_shape: tuple[int, int, int] | None = None,
               plugins: Any = None) -> CheckResult:
    kind = getattr(plugin, "kind", "")
    result = CheckResult(getattr(plugin, "name", repr(plugin)), kind)
    try:
        prm = _params(plugin, params)
    except Exception as e:  # noqa: BLE001 - invalid params are the problem to report
        result.problems.append(f"its params do not validate: {e}")
        return result
    checker = {"dataset": _dataset, "architecture": _architecture, "matcher": _matcher,
               "similarity_index": _index, "evaluation": _evaluation}.get(kind)
    if checker is None:
        result.problems.append(f"{plugin!r} is not a plugin object (its kind is {kind!r})")
        return result
    try:
        checker(plugin, prm, result, image_shape=image_shape, plugins=plugins)
    except Exception as e:  # noqa: BLE001 - a crash of the plugin's code is a problem too
        result.problems.append(f"raised {type(e).__name__}: {str(e).strip()}")
    return result


def _params(plugin: Any, params: Any) -> Any:
    if isinstance(params, Params):
        return params
    raw = params if params is not None else dict(getattr(plugin, "check_params", {}) or {})
    return plugin.Params.model_validate(raw)


def _dataset(ds: Any, params: Any, result: CheckResult, **_: Any) -> None:
    info = ds.info(params)
    result.checks.append("info")
    if getattr(ds, "needs_data_dir", False):
        result.checks.append("load skipped: it reads --data-dir")
        return
    data = boundary.loaded_dataset(ds, ds.load(params, None, False))
    result.checks.append("load")
    x, y = data.test[0]
    if tuple(torch.as_tensor(x).shape) != tuple(data.image_shape):
        result.problems.append(f"a test image has shape {tuple(torch.as_tensor(x).shape)}, but image_shape is "
                               f"{tuple(data.image_shape)}")
    if not ds.auxiliary and not 0 <= int(y) < data.num_classes:
        result.problems.append(f"a test label is {int(y)}, outside 0..{data.num_classes - 1}")
    if info is not None and (info.num_classes, tuple(info.image_shape)) != (data.num_classes, tuple(data.image_shape)):
        result.problems.append(f"info() says {info.num_classes} classes of {tuple(info.image_shape)}, load() gives "
                               f"{data.num_classes} of {tuple(data.image_shape)}")
    result.checks.append("examples")


def _architecture(arch: Any, params: Any, result: CheckResult, *, image_shape: Any = None, **_: Any) -> None:
    shape = tuple(image_shape or IMAGE_SHAPE)
    result.problems += conformance.architecture_problems(arch, params, 10, shape)
    result.checks += ["build", "registered layers", "front/back compose", "activations"]
    tag = arch.tag(params)
    if not isinstance(tag, str) or not tag:
        result.problems.append(f"tag(params) returned {tag!r}; expected a non-empty string")
    result.checks.append("tag")


def _matcher(matcher: Any, params: Any, result: CheckResult, **_: Any) -> None:
    data = tiny_data()
    problems = [fake_problem("b0", "b2", data=data), fake_problem("b2", "b0", data=data)]
    for problem in problems:
        torch.manual_seed(0)
        layer = boundary.stitching_layer(matcher, "fit()", matcher.fit(problem, params), problem)
        h = problem.activations(problem.source, problem.source_layer, "test", 4)
        with torch.no_grad():
            out = layer.eval()(h)
        want = (4, *problem.target_shape)
        if tuple(out.shape) != want:
            result.problems.append(f"the fitted layer maps {tuple(h.shape)} to {tuple(out.shape)}, expected {want}")
    result.checks += ["fit", "shapes", "finite parameters"]
    if type(matcher).fit_many is not Matcher.fit_many:
        row = [fake_problem("b0", t, data=data) for t in ("b0", "b2")]
        torch.manual_seed(0)
        many = list(matcher.fit_many(row, params))
        if len(many) != len(row):
            result.problems.append(f"fit_many() returned {len(many)} layers for {len(row)} problems")
            return
        for p, layer in zip(row, many):
            boundary.stitching_layer(matcher, "fit_many()", layer, p)
        result.checks.append("fit_many")


def _index(index: Any, params: Any, result: CheckResult, **_: Any) -> None:
    result.problems += conformance.index_problems(index, params, thorough=True)
    result.checks += ["finite values", "identical inputs", *(["symmetry"] if getattr(index, "symmetric", True) else []),
                      "matrix", "torch input"]


def _evaluation(ev: Any, params: Any, result: CheckResult, *, plugins: Any = None, **_: Any) -> None:
    from ..plugin.manager import load_plugins

    plugin_set = plugins if plugins is not None else load_plugins()
    needs = [plugin_set.get(n) for n in getattr(ev, "requires", ())]
    matchers = [p for p in needs if p.kind == "matcher"]
    indices = [p for p in needs if p.kind == "similarity_index"]
    check_params = {p.name: getattr(p, "check_params", None) or {} for p in needs}
    ctx = fake_context(matchers=matchers, indices=indices, plugins=plugin_set, params=check_params)
    out = boundary.evaluation_result(ev, ev.run(ctx.for_evaluation(ev.name, None), params))
    result.checks += ["run", "numeric metrics"]
    for what, obj in (("tables", out.tables), ("report", out.report)):
        try:
            json.loads(to_json(obj))
        except (TypeError, ValueError) as e:
            result.problems.append(f"its {what} are not JSON-able: {e}")
    result.checks.append("JSON-able tables and report")
    import matplotlib.pyplot as plt

    for fig in out.figures.values():
        plt.close(fig)
