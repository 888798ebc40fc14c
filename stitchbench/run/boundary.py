"""Calls into plugins, with what they return checked where they return it.

Whatever a plugin method returns is checked before the core uses or stores it: the type,
the shape and that every number is finite. A bad value is a `PluginError` that names the
plugin and the method (``plugin lcka: matrix() returned ...``), raised inside the job that
called it, so that job ends FAILED and is never reused; nothing invalid is ever stored as
a complete result. An exception the plugin raises itself passes through unchanged (the
job around the call names the plugin).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import PluginError

log = logging.getLogger(__name__)


def accepts_params(method: Any) -> bool:
    """True when ``method`` takes a ``params`` argument (a keyword, or ``**kwargs``)."""
    try:
        sig = inspect.signature(method)
    except (TypeError, ValueError):
        return False
    return any(p.name == "params" or p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def real_number(plugin: Any, method: str, value: Any) -> float:
    """``value`` (a Python, numpy or one-element torch number) as a float, possibly NaN or
    infinite; a PluginError naming ``plugin`` and ``method`` when it is not one real number."""
    arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
    if arr.size != 1 or arr.dtype.kind not in "biuf":
        raise PluginError(getattr(plugin, "name", str(plugin)),
                          f"{method} returned {_describe(value)}; expected one real number (a float)")
    return float(arr.reshape(()))


def finite_float(plugin: Any, method: str, value: Any) -> float:
    """``value`` as a float, or a PluginError naming ``plugin`` and ``method`` when it is not
    one real, finite number."""
    name = getattr(plugin, "name", str(plugin))
    out = real_number(plugin, method, value)
    if not math.isfinite(out):
        raise PluginError(name, f"{method} returned {out}; expected a finite number (a NaN or an infinity usually "
                          "means degenerate input, e.g. a constant activation: raise a ValueError saying so instead)")
    return out


def index_value(index: Any, A: Any, B: Any, params: Any = None) -> float:
    """``index.compute(A, B)`` with ``params`` (the index's validated Params, or None for
    its defaults), checked: one finite float."""
    if params is not None and accepts_params(index.compute):
        value = index.compute(A, B, params=params)
    else:
        value = index.compute(A, B)
    return finite_float(index, "compute()", value)


def index_matrix(index: Any, sources: Sequence[Any], targets: Sequence[Any], context: Any) -> np.ndarray:
    """``index.matrix(sources, targets, context)``, checked: a (len(sources), len(targets))
    array of finite floats. With the base class's ``matrix`` each ``compute`` is checked
    as it returns, so an error names ``compute()``."""
    from ..plugin.types import SimilarityIndex

    if type(index).matrix is SimilarityIndex.matrix:
        params = getattr(context, "params", None)
        return np.array([[index_value(index, a, b, params) for b in targets] for a in sources], dtype=float)
    values = index.matrix(sources, targets, context)
    expected = (len(sources), len(targets))
    try:
        arr = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)
    except Exception:  # noqa: BLE001 - anything numpy cannot read is the plugin's fault
        arr = np.asarray(None)
    if arr.dtype.kind not in "biuf":
        raise PluginError(index.name, f"matrix() returned {_describe(values)}; expected a {expected} array of floats")
    if arr.shape != expected:
        raise PluginError(index.name, f"matrix() returned shape {arr.shape}; expected {expected} "
                          "(source layers x target layers)")
    arr = arr.astype(float)
    bad = np.argwhere(~np.isfinite(arr))
    if len(bad):
        cells = ", ".join(f"({i}, {j})={arr[i, j]}" for i, j in bad[:4]) + (" ..." if len(bad) > 4 else "")
        raise PluginError(index.name, f"matrix() returned {len(bad)} non-finite value(s), at cells {cells}; "
                          "an index must return finite numbers or raise an error saying why it cannot")
    return arr


def stitching_layer(matcher: Any, method: str, layer: Any, problem: Any) -> Any:
    """A matcher's result for ``problem``, checked: a `StitchingLayer` for the problem's two
    activation shapes whose parameters are finite."""
    import torch

    from ..nn.stitching import StitchingLayer

    if not isinstance(layer, StitchingLayer):
        raise PluginError(matcher.name, f"{method} returned {_describe(layer)}; expected a stitchbench.StitchingLayer "
                          "(build it with problem.new_layer())")
    want = (tuple(problem.source_shape), tuple(problem.target_shape))
    got = (tuple(layer.source_shape), tuple(layer.target_shape))
    if got != want:
        raise PluginError(matcher.name, f"{method} returned a stitching layer for shapes {got[0]} -> {got[1]}, but "
                          f"the problem ({problem.source_layer} -> {problem.target_layer}) is {want[0]} -> {want[1]}")
    for pname, t in layer.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PluginError(matcher.name, f"{method} returned a stitching layer whose {pname} has non-finite "
                              "values (the fit diverged?)")
    return layer


def evaluation_result(evaluation: Any, result: Any) -> Any:
    """An evaluation's ``run()`` result, checked: an `EvaluationResult` whose metrics are
    numbers with string names.

    A NaN metric is a statistic that is undefined for this run (a rank correlation of
    constant values, an off-diagonal mean without off-diagonal cells): it is left out of
    the logged metrics with a warning naming the evaluation and the metric, and stays in
    the evaluation's tables and report (where JSON shows it as null). Evaluations are
    computed again by every run, so nothing undefined is ever reused."""
    from ..plugin.types import EvaluationResult

    if not isinstance(result, EvaluationResult):
        raise PluginError(evaluation.name, f"run() returned {_describe(result)}; expected a "
                          "stitchbench.EvaluationResult")
    metrics = {}
    for k, v in (result.metrics or {}).items():
        if not isinstance(k, str) or not k:
            raise PluginError(evaluation.name, f"run() returned a metric named {k!r}; metric names are strings")
        value = real_number(evaluation, f"run() metric {k!r}", v)
        if math.isfinite(value):
            metrics[k] = value
        else:
            log.warning("evaluation %s: metric %s is undefined in this run (%s); it is not logged", evaluation.name,
                        k, value)
    result.metrics = metrics
    return result


def loaded_dataset(dataset: Any, data: Any) -> Any:
    """A dataset's ``load()`` result, checked: a `LoadedDataset` with both splits."""
    from ..nn.data import LoadedDataset

    if not isinstance(data, LoadedDataset):
        raise PluginError(dataset.name, f"load() returned {_describe(data)}; expected a stitchbench.LoadedDataset")
    for split in ("train", "test"):
        part = getattr(data, split, None)
        if part is None or not hasattr(part, "__len__") or len(part) == 0:
            raise PluginError(dataset.name, f"load() returned a LoadedDataset whose {split} split is empty or missing")
    least = 1 if getattr(dataset, "auxiliary", False) else 2  # an auxiliary set's labels mean nothing
    if not isinstance(data.num_classes, int) or data.num_classes < least:
        raise PluginError(dataset.name, f"load() returned num_classes={data.num_classes!r}; expected an int >= {least}")
    return data


def _describe(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{type(value).__name__} {text}" if not isinstance(value, (type(None), bool)) else repr(value)
