"""The MLflow model registry: trained networks and detectors registered under names that
say what they are, each version tagged with its job key. The registry is for browsing and
serving; finding a finished job goes by key through its run (`jobs.find_finished_job`)."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

from .artifacts import client

log = logging.getLogger(__name__)


def register_weights(run_id: str, model_name: str, artifact_dir: str, tags: dict[str, str]) -> str:
    """Register the folder ``artifact_dir`` of run ``run_id`` (e.g. a logged state dict) as a
    new version of ``model_name``; returns the version."""
    c = client()
    try:
        c.create_registered_model(model_name)
    except Exception as exists:  # noqa: BLE001 - already registered
        log.debug("registered model %s: %s", model_name, exists)
    source = f"{c.get_run(run_id).info.artifact_uri}/{artifact_dir}"
    return str(c.create_model_version(model_name, source=source, run_id=run_id, tags=tags).version)


def log_torch_model(run_id: str, module: Any, input_example: Any, model_name: str, tags: dict[str, str], *,
                    fallback_dir: str) -> str:
    """Log ``module`` as an MLflow PyTorch model of run ``run_id`` (which must be the active
    run) in the ``pt2`` format (a traced graph: loading it runs no pickled code) and register
    it; returns the version. A module that ``torch.export`` cannot trace is registered as
    the run's ``fallback_dir`` folder (its logged weights) instead, with a warning."""
    import mlflow
    import torch

    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        raise RuntimeError(f"log_torch_model: run {run_id} is not the active MLflow run")
    chatter = io.StringIO()  # MLflow prints "Successfully registered model ..." to stderr
    try:
        with contextlib.redirect_stderr(chatter), contextlib.redirect_stdout(chatter):
            info = mlflow.pytorch.log_model(
                module,
                name="model",
                input_example=input_example,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                serialization_format="pt2",
            )
            return str(mlflow.register_model(info.model_uri, model_name, tags=tags).version)
    except Exception as e:  # noqa: BLE001 - an architecture torch.export cannot trace
        log.warning("could not export %s as an MLflow model (%s); registering its weights", model_name, e)
        return register_weights(run_id, model_name, fallback_dir, tags)
