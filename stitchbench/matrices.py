"""Filling similarity matrices: stitching matrices (one stitcher per layer pair) and
index matrices, as resumable jobs.

A stitching matrix job keeps every finished cell (the stitcher's weights and its relative
accuracy) in ``mlruns/cache/<job key>/`` as it goes, written atomically, so a run killed
in the middle resumes from the finished cells. When every cell is done the matrix, heat
map and stitchers are logged to the job's nested MLflow run, which is then tagged
complete; a later run with the same key reuses it whole.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import tracking
from .activations import ActivationCache
from .context import MatrixRecord
from .data import iterate_batches
from .errors import JobError, StitchbenchError
from .networks import TrainedNetwork
from .plan import MatrixJob, Plan
from .plots import heatmap
from .plugin_types import IndexContext
from .progress import progress_bar
from .runs import child_run, log_array, log_figure
from .stitching import StitchingLayer, StitchingProblem
from .workspace import mlruns_dir

log = logging.getLogger(__name__)


class CellCache:
    """Finished cells of one matrix job on local disk (atomic writes)."""

    def __init__(self, directory: Path):
        self.dir = directory

    def path(self, i: int, j: int) -> Path:
        return self.dir / f"cell_{i}_{j}.pt"

    def get(self, i: int, j: int) -> dict[str, Any] | None:
        p = self.path(i, j)
        if not p.exists():
            return None
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged file is recomputed, never trusted
            p.unlink(missing_ok=True)
            return None

    def put(self, i: int, j: int, payload: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
        os.close(fd)
        torch.save(payload, tmp)
        os.replace(tmp, self.path(i, j))

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _stitcher_lookup(stitchers: dict[str, torch.Tensor] | None, run_id: str | None):
    """(i, j) -> the state dict of cell (i, j), from memory or, lazily, from the run's
    ``matrix/stitchers.pt`` artifact (read with ``weights_only=True``)."""
    loaded: dict[str, dict[str, torch.Tensor]] = {}

    def get(i: int, j: int) -> dict[str, torch.Tensor]:
        if not loaded:
            flat = stitchers
            if flat is None:
                flat = torch.load(tracking.download(run_id, "matrix/stitchers.pt"), map_location="cpu",
                                  weights_only=True)
            for k, v in flat.items():
                cell, name = k.split(".", 1)
                loaded.setdefault(cell, {})[name] = v
        return loaded[f"{i}_{j}"]

    return get


def _record(job: MatrixJob, plan: Plan, values: np.ndarray, run_id: str | None,
            stitchers: dict[str, torch.Tensor] | None = None) -> MatrixRecord:
    obj = job.plugin.obj
    functional = job.kind == "stitch_matrix"
    return MatrixRecord(
        measure=obj.measure() if functional else obj.name,
        plugin=obj.name,
        functional=functional,
        higher_is_more_similar=True if functional else bool(obj.higher_is_more_similar),
        source=job.source.model_name,
        target=job.target.model_name,
        scope=job.scope,
        layers=list(plan.layers),
        values=values,
        run_id=run_id,
        stitcher_state=_stitcher_lookup(stitchers, run_id) if functional else None,
    )


def _reuse(job: MatrixJob, plan: Plan, client: Any) -> MatrixRecord | None:
    run = tracking.find_finished_job(client, job.key)
    if run is None:
        return None
    try:
        values = np.load(tracking.download(run.info.run_id, "matrix/values.npy"))
    except Exception as e:  # noqa: BLE001 - a missing or damaged artifact means: recompute
        log.warning("job %s: finished run %s has no readable matrix (%s); recomputing", job.label, run.info.run_id, e)
        return None
    log.info("reusing %s from run %s", job.label, run.info.run_id)
    return _record(job, plan, values, run.info.run_id)


def _tags(job: MatrixJob) -> dict[str, str]:
    return {
        tracking.TAG_KIND: job.kind,
        tracking.TAG_KEY: job.key,
        tracking.TAG_PLUGIN: job.plugin.name,
        "stitchbench.scope": job.scope,
        "stitchbench.source": job.source.model_name,
        "stitchbench.target": job.target.model_name,
    }


def _log_matrix(job: MatrixJob, plan: Plan, values: np.ndarray, record: MatrixRecord) -> None:
    import mlflow

    log_array(values, "matrix/values", header=plan.layers, index=plan.layers)
    what = "relative accuracy" if record.functional else record.measure
    title = f"{record.measure} ({what}), {job.scope}\n{job.source.model_name} -> {job.target.model_name}"
    log_figure(
        heatmap(values, plan.layers, title=title, higher_is_more_similar=record.higher_is_more_similar),
        "matrix/heatmap.png",
    )
    diag = np.diag(values)
    mlflow.log_metrics({"diag_mean": float(np.mean(diag)), "mean": float(np.mean(values))})


def run_stitch_matrix(
    job: MatrixJob, plan: Plan, nets: dict[str, TrainedNetwork], cache: ActivationCache, client: Any,
    device: torch.device, workspace: Path,
) -> MatrixRecord:
    reused = _reuse(job, plan, client)
    if reused is not None:
        return reused
    import mlflow

    src, tgt = nets[job.source.model_name], nets[job.target.model_name]
    cells = CellCache(mlruns_dir(workspace) / "cache" / job.key)
    n = len(plan.layers)
    values = np.full((n, n), np.nan)
    stitchers: dict[str, torch.Tensor] = {}
    matcher = job.plugin.obj
    with child_run(job.label, _tags(job)) as run:
        mlflow.log_params({f"{job.plugin.name}.{k}": v for k, v in job.plugin.params_dict().items()} or {"params": "{}"})
        resumed = 0
        with progress_bar(total=n * n, desc=job.label, unit="stitcher") as bar:
            for i, s_layer in enumerate(plan.layers):
                for j, t_layer in enumerate(plan.layers):
                    done = cells.get(i, j)
                    resumed += done is not None
                    if done is None:
                        problem = StitchingProblem(
                            source=src.net, source_layer=s_layer, target=tgt.net, target_layer=t_layer,
                            data=plan.data, device=device, seed=plan.config.seed, cache=cache,
                        )
                        cell = f"{job.label} cell ({s_layer} -> {t_layer})"
                        try:
                            layer = matcher.fit(problem, job.plugin.params)
                        except StitchbenchError:
                            raise
                        except Exception as e:
                            raise JobError(cell, matcher.name, e) from e
                        if not isinstance(layer, StitchingLayer):
                            raise JobError(cell, matcher.name, TypeError(
                                f"fit() returned {type(layer).__name__}, expected a stitchbench.StitchingLayer"))
                        acc = stitched_accuracy(problem, layer, cache, plan.config.stitching.eval_batch_size)
                        rel = acc / tgt.test_accuracy if tgt.test_accuracy > 0 else float("nan")
                        done = {"relative_accuracy": torch.tensor(rel, dtype=torch.float64),
                                "accuracy": torch.tensor(acc, dtype=torch.float64),
                                "state": {k: v.detach().cpu() for k, v in layer.state_dict().items()}}
                        cells.put(i, j, done)
                    values[i, j] = float(done["relative_accuracy"])
                    for k, v in done["state"].items():
                        stitchers[f"{i}_{j}.{k}"] = v
                    bar.update(1)
        mlflow.log_metric("cells_resumed", resumed)
        if resumed:
            log.info("%s: resumed %d finished stitchers of an interrupted run", job.label, resumed)
        if not np.all(np.isfinite(values)):
            raise JobError(job.label, matcher.name, ValueError("the matrix has non-finite cells"))
        record = _record(job, plan, values, run.info.run_id, stitchers)
        _log_matrix(job, plan, values, record)
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "stitchers.pt"
            torch.save(stitchers, p)
            mlflow.log_artifact(str(p), "matrix")
        mlflow.set_tag(tracking.TAG_COMPLETE, "1")
    cells.clear()
    return record


@torch.no_grad()
def stitched_accuracy(problem: StitchingProblem, layer: StitchingLayer, cache: ActivationCache, batch_size: int) -> float:
    """Test accuracy of g>j ∘ T ∘ f<=i, with f<=i's test activations reused when cached."""
    stitched = problem.stitched(layer)
    stitched.eval()
    data = problem.data
    labels = _test_labels(data)
    acts = cache.all_layers(problem.source, "test", None, data) if _fits(problem, cache) else None
    correct = 0
    if acts is not None:
        h_all = acts[problem.source_layer]
        for start in range(0, len(h_all), batch_size):
            h = h_all[start : start + batch_size].to(problem.device)
            pred = stitched.forward_from_source(h).argmax(1).cpu()
            correct += (pred == labels[start : start + batch_size]).sum().item()
    else:
        for x, y in iterate_batches(data.test, batch_size):
            correct += (stitched(x.to(problem.device)).argmax(1).cpu() == y).sum().item()
    return correct / max(len(labels), 1)


def _test_labels(data: Any) -> torch.Tensor:
    if hasattr(data.test, "labels"):
        return data.test.labels
    return torch.cat([y for _, y in iterate_batches(data.test, 512)])


def _fits(problem: StitchingProblem, cache: ActivationCache) -> bool:
    shapes = problem.source.layer_shapes(problem.data.image_shape)
    per_example = sum(int(np.prod(s)) for s in shapes.values()) * 4
    return per_example * len(problem.data.test) + cache.nbytes() <= cache.max_bytes


def run_index_matrix(
    job: MatrixJob, plan: Plan, nets: dict[str, TrainedNetwork], cache: ActivationCache, client: Any,
    shared: dict[Any, Any] | None = None,
) -> MatrixRecord:
    reused = _reuse(job, plan, client)
    if reused is not None:
        return reused
    import mlflow

    index = job.plugin.obj
    n_ex = plan.config.indices.n_examples
    src, tgt = nets[job.source.model_name], nets[job.target.model_name]

    def layer_list(net: Any, split: str, n: int | None) -> list[np.ndarray]:
        return cache.numpy_layers(net, split, n, plan.data, plan.config.seed, plan.layers)

    sources = layer_list(src.net, "test", n_ex)
    targets = sources if job.scope == "intra" else layer_list(tgt.net, "test", n_ex)

    def train_sample(side: str, n: int) -> list[np.ndarray]:
        return layer_list((src if side == "source" else tgt).net, "train_sample", n)

    ctx = IndexContext(
        params=job.plugin.params,
        train_sample=train_sample if getattr(index, "needs_train_activations", False) else None,
        same_network=job.scope == "intra",
        shared=shared if shared is not None else {},
    )
    with child_run(job.label, _tags(job)) as run:
        mlflow.log_params({"n_examples": n_ex, **{f"{index.name}.{k}": v for k, v in job.plugin.params_dict().items()}})
        try:
            values = np.asarray(index.matrix(sources, targets, ctx), dtype=float)
        except StitchbenchError:
            raise
        except Exception as e:
            raise JobError(job.label, index.name, e) from e
        if values.shape != (len(plan.layers), len(plan.layers)):
            raise JobError(job.label, index.name, ValueError(
                f"matrix() returned shape {values.shape}, expected {(len(plan.layers),) * 2}"))
        record = _record(job, plan, values, run.info.run_id)
        _log_matrix(job, plan, values, record)
        mlflow.set_tag(tracking.TAG_COMPLETE, "1")
    return record
