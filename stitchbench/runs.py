"""Run lifecycle: a parent run per ``stitchbench run`` and nested runs for its jobs, each
ending FINISHED, FAILED or KILLED (never left RUNNING)."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import RunConfig, config_json, flat_params

log = logging.getLogger(__name__)


def _status_for(exc: BaseException | None) -> str:
    if exc is None:
        return "FINISHED"
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return "KILLED"
    return "FAILED"


@contextmanager
def parent_run(experiment_id: str, cfg: RunConfig, *, run_name: str | None, tags: dict[str, str]) -> Iterator[Any]:
    import mlflow

    # Nested runs take the active experiment, not their parent's: make it this one.
    mlflow.set_experiment(experiment_id=experiment_id)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
    try:
        params = flat_params(cfg)
        items = [(k[:250], v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            mlflow.log_params(dict(items[start : start + 100]))
        mlflow.log_text(config_json(cfg), "config.json")
        yield run
    except BaseException as e:
        _end_all(_status_for(e))
        raise
    _end_all("FINISHED")


def _end_all(status: str) -> None:
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run(status=status)


@contextmanager
def child_run(name: str, tags: dict[str, str]) -> Iterator[Any]:
    import mlflow

    parent = mlflow.active_run()
    experiment_id = parent.info.experiment_id if parent is not None else None
    run = mlflow.start_run(run_name=name, nested=True, tags=tags, experiment_id=experiment_id)
    try:
        yield run
    except BaseException as e:
        mlflow.end_run(status=_status_for(e))
        raise
    mlflow.end_run(status="FINISHED")


def log_figure(fig: Any, artifact_file: str) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    mlflow.log_figure(fig, artifact_file)
    plt.close(fig)


def log_array(values: Any, stem: str, *, header: list[str] | None = None, index: list[str] | None = None) -> None:
    """Log ``values`` as ``<stem>.npy`` and ``<stem>.csv`` (with layer names when given)."""
    import mlflow
    import numpy as np

    with tempfile.TemporaryDirectory() as d:
        npy = Path(d) / (Path(stem).name + ".npy")
        np.save(npy, np.asarray(values))
        csv = Path(d) / (Path(stem).name + ".csv")
        with open(csv, "w") as f:
            if header is not None:
                f.write("source\\target," + ",".join(header) + "\n")
            for i, row in enumerate(np.atleast_2d(values)):
                lead = (index[i] + ",") if index is not None else ""
                f.write(lead + ",".join(f"{v:.10g}" for v in row) + "\n")
        folder = os.path.dirname(stem) or None
        mlflow.log_artifact(str(npy), folder)
        mlflow.log_artifact(str(csv), folder)
