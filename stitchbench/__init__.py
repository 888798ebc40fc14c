"""stitchbench: compare neural-network representations by model stitching and by
structural similarity indices, with the checks of Balogh & Jelasity (AAAI 2025).

Public API (stable)::

    stitchbench.list_plugins(kind=None)   # -> [PluginInfo(name, kind, origin, description)]
    stitchbench.get_plugin("lcka")        # -> the registered object
    stitchbench.hookimpl                  # marker for plugin hook implementations

Base classes for plugins: DatasetPlugin, ArchitecturePlugin, Matcher, SimilarityIndex,
Evaluation (and Params for their parameters). Torch-based helpers (LoadedDataset,
TensorSplit, StitchableNetwork, StitchingLayer, StitchingProblem, RunContext) are imported
lazily, so ``import stitchbench`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

import pluggy

from .errors import ConfigError, JobError, PluginError, StitchbenchError, UsageError
from .plugin_types import (
    KINDS,
    ArchitecturePlugin,
    Cost,
    DatasetInfo,
    DatasetPlugin,
    Evaluation,
    EvaluationResult,
    IndexContext,
    Matcher,
    Params,
    PlanSummary,
    Plugin,
    SimilarityIndex,
)
from .plugins import PluginInfo, get_plugin, list_plugins

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("stitchbench")

_LAZY = {
    "LoadedDataset": "stitchbench.data",
    "TensorSplit": "stitchbench.data",
    "iterate_batches": "stitchbench.data",
    "random_crop_flip": "stitchbench.data",
    "StitchableNetwork": "stitchbench.network",
    "StitchingLayer": "stitchbench.stitching",
    "StitchedNetwork": "stitchbench.stitching",
    "StitchingProblem": "stitchbench.stitching",
    "RunContext": "stitchbench.context",
    "MatrixRecord": "stitchbench.context",
    "NetworkInput": "stitchbench.worker",
}

__all__ = [
    "KINDS",
    "ArchitecturePlugin",
    "ConfigError",
    "Cost",
    "DatasetInfo",
    "DatasetPlugin",
    "Evaluation",
    "EvaluationResult",
    "IndexContext",
    "JobError",
    "LoadedDataset",
    "Matcher",
    "MatrixRecord",
    "NetworkInput",
    "Params",
    "PlanSummary",
    "Plugin",
    "PluginError",
    "PluginInfo",
    "RunContext",
    "SimilarityIndex",
    "StitchableNetwork",
    "StitchbenchError",
    "StitchedNetwork",
    "StitchingLayer",
    "StitchingProblem",
    "TensorSplit",
    "UsageError",
    "get_plugin",
    "hookimpl",
    "iterate_batches",
    "list_plugins",
    "random_crop_flip",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stitchbench' has no attribute {name!r}")
