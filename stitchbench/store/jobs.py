"""Jobs in the store: a job's result is a function of its key, so a finished job is found
by its key and reused instead of computed again.

One mechanism serves every kind of job, the core's (networks, matrices) and the plugins'
(detectors, probes, ...): a job writes its outputs in a nested run of its own, opened with
`job_run`, tagged with its key (``stitchbench.job_key``) and, once every output is written,
with ``stitchbench.complete``. `find_finished_job` returns the newest such run that
FINISHED: a run that failed, was killed or was interrupted half-way is never reused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import artifacts
from .models import log_torch_model, register_weights
from .runs import child_run
from .tags import TAG_COMPLETE, TAG_KEY, TAG_KIND, TAG_PLUGIN

log = logging.getLogger(__name__)

TAG_MODEL_NAME = "stitchbench.model_name"
TAG_MODEL_VERSION = "stitchbench.model_version"
#: MLflow's limits on a param's key and value.
_PARAM_KEY_MAX, _PARAM_VALUE_MAX = 250, 6000


@dataclass(frozen=True)
class FinishedJob:
    """A finished job, found by ``key``: its run (``run_id``, ``name``) and what the run
    holds (``tags``, ``params``, ``metrics``, and artifacts, read with the methods below).
    ``model_name`` / ``model_version``: the registered model version the job created, if
    any."""

    key: str
    run_id: str
    name: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def model_name(self) -> str | None:
        return self.tags.get(TAG_MODEL_NAME)

    @property
    def model_version(self) -> str | None:
        return self.tags.get(TAG_MODEL_VERSION)

    def path(self, artifact: str) -> Path:
        """A local path holding the artifact (a copy for a remote store)."""
        return artifacts.download(self.run_id, artifact)

    def read_json(self, artifact: str) -> Any:
        return artifacts.read_json(self.run_id, artifact)

    def load_array(self, artifact: str) -> Any:
        """A numpy array logged with `JobRun.log_array` (``artifact`` is the ``.npy`` path)."""
        import numpy as np

        return np.load(self.path(artifact), allow_pickle=False)

    def load_state_dict(self, artifact: str) -> dict[str, Any]:
        """A state dict logged with `JobRun.log_state_dict`, read with ``weights_only=True``
        (no pickled code runs)."""
        return artifacts.load_state_dict(self.run_id, artifact)


def all_experiment_ids(client: Any) -> list[str]:
    return [e.experiment_id for e in client.search_experiments(max_results=1000)]


def find_finished_job(key: str, client: Any = None) -> FinishedJob | None:
    """The newest run of any experiment with job key ``key`` that FINISHED with every output
    written, or None."""
    client = client or artifacts.client()
    ids = all_experiment_ids(client)
    if not ids:
        return None
    runs = client.search_runs(
        ids,
        filter_string=f"tags.`{TAG_KEY}` = '{key}' and tags.`{TAG_COMPLETE}` = '1' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    run = runs[0]
    return FinishedJob(key, run.info.run_id, run.info.run_name or "", dict(run.data.tags), dict(run.data.params),
                       dict(run.data.metrics))


class JobRun:
    """The nested run of one job while its outputs are written (see `job_run`).

    Everything is written to this run, whichever MLflow run is active elsewhere."""

    def __init__(self, run_id: str, name: str, key: str | None) -> None:
        self.run_id = run_id
        self.name = name
        self.key = key

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Parameters as strings (cut to MLflow's limits), e.g. the settings a key hashes."""
        from mlflow.entities import Param

        items = [Param(str(k)[:_PARAM_KEY_MAX], str(v)[:_PARAM_VALUE_MAX]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            artifacts.client().log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log_history([metrics], first_step=step)

    def log_history(self, history: Sequence[Mapping[str, float]], first_step: int = 1) -> None:
        """One metrics dict per step (e.g. per training epoch), steps ``first_step``, ...,
        written in batches."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, first_step + i) for i, row in enumerate(history) for k, v in row.items()]
        for start in range(0, len(items), 1000):
            artifacts.client().log_batch(self.run_id, metrics=items[start : start + 1000])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        artifacts.client().log_batch(self.run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])

    def log_table(self, obj: Any, name: str) -> None:
        """A JSON-able object as ``<name>.json`` (numpy values become numbers and lists)."""
        artifacts.log_json(self.run_id, obj, name if name.endswith(".json") else f"{name}.json")

    def log_text(self, text: str, artifact_file: str) -> None:
        artifacts.log_text(self.run_id, text, artifact_file)

    def log_array(self, values: Any, stem: str, *, header: list[str] | None = None,
                  index: list[str] | None = None) -> None:
        """``<stem>.npy`` and ``<stem>.csv`` (rows ``index``, columns ``header``)."""
        artifacts.log_array(self.run_id, values, stem, header=header, index=index)

    def log_figure(self, fig: Any, name: str) -> None:
        """A matplotlib figure as ``<name>.png`` (or ``name`` when it has an extension); the
        figure is closed."""
        artifacts.log_figure(self.run_id, fig, name if Path(name).suffix else f"{name}.png")

    def log_file(self, local_path: str | Path, artifact_dir: str | None = None) -> None:
        artifacts.log_file(self.run_id, local_path, artifact_dir)

    def log_state_dict(self, state: Mapping[str, Any], artifact_file: str) -> None:
        """Tensors (moved to the CPU) with ``torch.save``; `FinishedJob.load_state_dict`
        reads them back."""
        artifacts.log_state_dict(self.run_id, dict(state), artifact_file)

    def _model_tags(self, tags: Mapping[str, str] | None) -> dict[str, str]:
        return {**({TAG_KEY: self.key} if self.key else {}), **{k: str(v) for k, v in (tags or {}).items()}}

    def register_weights(self, model_name: str, artifact_dir: str, tags: Mapping[str, str] | None = None) -> str:
        """Register this run's folder ``artifact_dir`` (e.g. a state dict logged into it) as a
        new version of ``model_name`` in the model registry, tagged with the job key."""
        version = register_weights(self.run_id, model_name, artifact_dir, self._model_tags(tags))
        self.set_tags({TAG_MODEL_NAME: model_name, TAG_MODEL_VERSION: version})
        return version

    def log_model(self, module: Any, input_example: Any, model_name: str, *, fallback_dir: str,
                  tags: Mapping[str, str] | None = None) -> str:
        """Log ``module`` as an MLflow PyTorch model (pt2) and register it as ``model_name``;
        an untraceable module registers ``fallback_dir`` instead (see `log_torch_model`)."""
        version = log_torch_model(self.run_id, module, input_example, model_name, self._model_tags(tags),
                                  fallback_dir=fallback_dir)
        self.set_tags({TAG_MODEL_NAME: model_name, TAG_MODEL_VERSION: version})
        return version


@contextmanager
def job_run(name: str, *, kind: str, plugin: str | None = None, key: str | None = None,
            tags: Mapping[str, str] | None = None) -> Iterator[JobRun]:
    """A nested run of the active run for job ``name``, tagged with its ``kind``, the
    ``plugin`` whose job it is and its ``key``. When the block ends normally the run is
    marked complete (every output written) and ends FINISHED, so `find_finished_job`
    finds it by key; an exception ends it FAILED (KILLED for Ctrl-C) and comes out as a
    `StitchbenchError` naming the job and the plugin."""
    all_tags = {TAG_KIND: kind, **({TAG_PLUGIN: plugin} if plugin else {}), **({TAG_KEY: key} if key else {}),
                **dict(tags or {})}
    with child_run(name, all_tags) as run:
        job = JobRun(run.info.run_id, name, key)
        yield job
        job.set_tags({TAG_COMPLETE: "1"})
