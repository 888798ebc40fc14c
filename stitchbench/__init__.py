"""stitchbench: compare neural-network representations by model stitching and by
structural similarity indices, with the checks of Balogh & Jelasity (AAAI 2025).

This module is the public API: everything a plugin (bundled or third-party) or a user
needs is importable from ``stitchbench`` itself, and documented in docs/plugins.md. The
subpackages (``plugin``, ``nn``, ``store``, ``execution``, ``run``, ``cli``) are the
implementation; their layout may change.

Plugin system (no torch)::

    stitchbench.list_plugins(kind=None)   # -> [PluginInfo(name, kind, origin, description)]
    stitchbench.get_plugin("lcka")        # -> the registered object
    stitchbench.hookimpl                  # marker for plugin hook implementations
    DatasetPlugin, ArchitecturePlugin, Matcher, SimilarityIndex, Evaluation, Params, ...

Job keys and helpers (no torch): ``job_key``, ``code_version``, ``progress_bar``,
``heatmap``, the error classes.

Torch-based names (data, networks, stitching, blocks, the run context, the store's job
records) are imported on first use, so ``import stitchbench`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

import pluggy

from .errors import (
    ConfigError,
    DivergenceError,
    JobError,
    PluginError,
    StitchbenchError,
    StorageError,
    UsageError,
)
from .figures import heatmap
from .plugin.manager import PluginInfo, get_plugin, list_plugins
from .plugin.types import (
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
from .progress import progress_bar
from .run.keys import code_version, job_key

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("stitchbench")

#: Public names imported on first use (they import torch or MLflow).
_LAZY = {
    # data sets
    "LoadedDataset": "stitchbench.nn.data",
    "TensorSplit": "stitchbench.nn.data",
    "iterate_batches": "stitchbench.nn.data",
    "random_crop_flip": "stitchbench.nn.data",
    # networks and stitching
    "StitchableNetwork": "stitchbench.nn.network",
    "StitchingLayer": "stitchbench.nn.stitching",
    "StitchedNetwork": "stitchbench.nn.stitching",
    "StitchingProblem": "stitchbench.nn.stitching",
    "to_rows": "stitchbench.nn.stitching",
    "frozen": "stitchbench.nn.stitching",
    "LowRankProjection": "stitchbench.nn.lowrank",
    "extract_activations": "stitchbench.nn.activations",
    # building blocks shared by plugins
    "BasicBlock": "stitchbench.nn.blocks",
    "conv3x3": "stitchbench.nn.blocks",
    # what evaluations see of a run, and the store's job records
    "RunContext": "stitchbench.run.context",
    "MatrixRecord": "stitchbench.run.context",
    "NetworkInput": "stitchbench.execution.worker_state",
    "FinishedJob": "stitchbench.store.jobs",
    "JobRun": "stitchbench.store.jobs",
}

__all__ = [
    "KINDS",
    "ArchitecturePlugin",
    "BasicBlock",
    "ConfigError",
    "Cost",
    "DatasetInfo",
    "DatasetPlugin",
    "DivergenceError",
    "Evaluation",
    "EvaluationResult",
    "FinishedJob",
    "IndexContext",
    "JobError",
    "JobRun",
    "LoadedDataset",
    "LowRankProjection",
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
    "StorageError",
    "TensorSplit",
    "UsageError",
    "code_version",
    "conv3x3",
    "extract_activations",
    "frozen",
    "get_plugin",
    "heatmap",
    "hookimpl",
    "iterate_batches",
    "job_key",
    "list_plugins",
    "progress_bar",
    "random_crop_flip",
    "to_rows",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'stitchbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
