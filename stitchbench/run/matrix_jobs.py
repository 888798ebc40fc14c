"""Filling similarity matrices: stitching matrices (one stitcher per layer pair) and
index matrices, as resumable jobs.

The work of a job is a task (`compute_stitch_matrix`, `compute_index_matrix`: a
`MatrixTask`, the data and the two networks' `NetworkResult` in, plain values out) that an
executor runs anywhere; the driver looks up finished jobs by key before submitting and does
every MLflow write (`finish_matrix`).

A stitching matrix task keeps every finished cell (the stitcher's weights and its relative
accuracy) in ``mlruns/cache/<job key>/`` as it goes, written atomically, so a run killed
in the middle resumes from the finished cells (when the executor's tasks see the
workspace's disk). When every cell is done the matrix, heat map and stitchers are logged to
the job's nested MLflow run, which is then tagged complete; a later run with the same key
reuses it whole.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import JobError, PluginError, job_errors
from ..execution import worker_state as worker
from ..execution.executors import Executor, Future
from ..execution.worker_state import NetworkResult
from ..figures import heatmap
from ..nn.activations import ActivationCache
from ..nn.data import iterate_batches
from ..nn.stitching import StitchingLayer, StitchingProblem
from ..plugin.types import IndexContext, Matcher
from ..progress import progress_bar
from ..store import artifacts
from ..store.jobs import JobRun, find_finished_job, job_run
from ..workspace import mlruns_dir
from . import boundary
from .context import MatrixRecord
from .plan import MatrixJob, Plan, PluginUse

log = logging.getLogger(__name__)
VALUES_ARTIFACT = "matrix/values.npy"
STITCHERS_ARTIFACT = "matrix/stitchers.pt"


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
                flat = artifacts.load_state_dict(run_id, STITCHERS_ARTIFACT)
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


def reuse_matrix(job: MatrixJob, plan: Plan, client: Any) -> MatrixRecord | None:
    """The record of a finished run of ``job`` (same key), or None."""
    found = find_finished_job(job.key, client)
    if found is None:
        return None
    try:
        values = found.load_array(VALUES_ARTIFACT)
        if job.kind == "stitch_matrix":  # the stitchers evaluations load later: whole, or recompute now
            with zipfile.ZipFile(found.path(STITCHERS_ARTIFACT)) as z:
                if z.testzip() is not None:
                    raise ValueError(f"{STITCHERS_ARTIFACT} is damaged (a CRC check failed)")
    except Exception as e:  # noqa: BLE001 - a missing or damaged artifact means: recompute
        log.warning("job %s: finished run %s has no readable matrix (%s); recomputing", job.label, found.run_id, e)
        return None
    log.info("reusing %s from run %s", job.label, found.run_id)
    return _record(job, plan, values, found.run_id)


def _tags(job: MatrixJob) -> dict[str, str]:
    return {
        "stitchbench.code": job.plugin.code,
        "stitchbench.scope": job.scope,
        "stitchbench.source": job.source.model_name,
        "stitchbench.target": job.target.model_name,
    }


def _log_matrix(out: JobRun, job: MatrixJob, plan: Plan, values: np.ndarray, record: MatrixRecord) -> None:
    out.log_array(values, "matrix/values", header=plan.layers, index=plan.layers)
    what = "relative accuracy" if record.functional else record.measure
    title = f"{record.measure} ({what}), {job.scope}\n{job.source.model_name} -> {job.target.model_name}"
    out.log_figure(
        heatmap(values, plan.layers, title=title, higher_is_more_similar=record.higher_is_more_similar),
        "matrix/heatmap.png",
    )
    diag = np.diag(values)
    out.log_metrics({"diag_mean": float(np.mean(diag)), "mean": float(np.mean(values))})


# -- the tasks ----------------------------------------------------------------------------


@dataclass
class MatrixTask:
    """One matrix to fill (plain, picklable data): the job, the architecture that rebuilds
    its networks, the layers, and the run settings the values depend on. ``cell_dir``: where
    finished stitchers are kept for resuming (None: not kept)."""

    job: MatrixJob
    architecture: PluginUse
    layers: list[str]
    seed: int
    device: str
    eval_batch_size: int
    n_examples: int
    cell_dir: str | None = None


@dataclass
class StitchResult:
    """Rows of a stitching matrix: ``values`` (len(rows), n) relative accuracies of source
    layers ``rows`` (indices into the layers) to every target layer, ``stitchers`` each
    cell's state dict flattened as ``"<i>_<j>.<name>"``, ``fit_info`` each cell's
    `StitchingLayer.fit_info` by ``"<i>_<j>"``, ``resumed`` how many cells came from an
    interrupted run's cache."""

    rows: list[int]
    values: np.ndarray
    stitchers: dict[str, torch.Tensor]
    resumed: int
    fit_info: dict[str, Any] = field(default_factory=dict)


def compute_stitch_matrix(
    task: MatrixTask, data: Any, source: NetworkResult, target: NetworkResult, rows: list[int] | None = None
) -> StitchResult:
    """Fit the job's matcher for every (source layer, target layer) pair of the source
    layers ``rows`` (default: all) and measure each stitched network's test accuracy
    relative to the target network's. Writes nothing but the cell cache."""
    state = worker.state()
    device = torch.device(task.device)
    src = state.network(task.architecture, source, data, device)
    tgt = state.network(task.architecture, target, data, device)
    cells = CellCache(Path(task.cell_dir)) if task.cell_dir else None
    n = len(task.layers)
    rows = list(range(n)) if rows is None else list(rows)
    values = np.full((len(rows), n), np.nan)
    stitchers: dict[str, torch.Tensor] = {}
    fit_info: dict[str, Any] = {}
    resumed = 0
    # A matcher that overrides `fit_many` fits the unfinished cells of a row together (they
    # share the source half); any other matcher fits, and keeps, one cell at a time.
    by_row = type(task.job.plugin.obj).fit_many is not Matcher.fit_many
    with progress_bar(total=len(rows) * n, desc=task.job.label, unit="stitcher") as bar:
        for r, i in enumerate(rows):
            done = {j: cells.get(i, j) if cells is not None else None for j in range(n)}
            resumed += sum(d is not None for d in done.values())
            todo = [j for j, d in done.items() if d is None]
            if by_row and len(todo) > 1:
                problems = [_problem(task, data, src, i, tgt, j, state.cache, device) for j in todo]
                for j, payload in zip(todo, _fit_row(task, problems, target.test_accuracy, state.cache)):
                    done[j] = payload
                    if cells is not None:
                        cells.put(i, j, payload)
            for j in range(n):
                if done[j] is None:
                    problem = _problem(task, data, src, i, tgt, j, state.cache, device)
                    done[j] = _fit_cell(task, problem, target.test_accuracy, state.cache)
                    if cells is not None:
                        cells.put(i, j, done[j])
                values[r, j] = float(done[j]["relative_accuracy"])
                for k, v in done[j]["state"].items():
                    stitchers[f"{i}_{j}.{k}"] = v
                fit_info[f"{i}_{j}"] = done[j].get("fit_info", {})
                bar.update(1)
    return StitchResult(rows, values, stitchers, resumed, fit_info)


def merge_rows(job: MatrixJob, n: int, parts: list[StitchResult]) -> StitchResult:
    """One (n, n) `StitchResult` from results covering every row once, stitchers in row-major
    cell order; a JobError when a cell is not finite."""
    values = np.full((n, n), np.nan)
    by_cell: dict[str, dict[str, torch.Tensor]] = {}
    fit_info: dict[str, Any] = {}
    for part in parts:
        values[part.rows] = part.values
        fit_info.update(part.fit_info)
        for k, v in part.stitchers.items():
            by_cell.setdefault(k.split(".", 1)[0], {})[k] = v
    stitchers: dict[str, torch.Tensor] = {}
    for i in range(n):
        for j in range(n):
            stitchers.update(by_cell.get(f"{i}_{j}", {}))
    if not np.all(np.isfinite(values)):
        raise JobError(job.label, job.plugin.name, ValueError("the matrix has non-finite cells"))
    order = {f"{i}_{j}": None for i in range(n) for j in range(n)}
    return StitchResult(list(range(n)), values, stitchers, sum(p.resumed for p in parts),
                        {c: fit_info[c] for c in order if c in fit_info})


def _problem(task: MatrixTask, data: Any, src: Any, i: int, tgt: Any, j: int, cache: ActivationCache,
             device: torch.device) -> StitchingProblem:
    return StitchingProblem(
        source=src, source_layer=task.layers[i], target=tgt, target_layer=task.layers[j],
        data=data, device=device, seed=task.seed, cache=cache,
    )


def _fit_cell(task: MatrixTask, problem: StitchingProblem, target_accuracy: float,
              cache: ActivationCache) -> dict[str, Any]:
    """One stitcher: fitted, evaluated, as the cell-cache payload."""
    job = task.job
    matcher = job.plugin.obj
    cell = f"{job.label} cell ({problem.source_layer} -> {problem.target_layer})"
    # A matcher that draws from torch's global generator gets the same draws whichever
    # process fits the cell and whatever ran there before (bundled matchers use their own).
    torch.manual_seed(task.seed)
    with job_errors(cell, matcher.name):
        layer = matcher.fit(problem, job.plugin.params)
    return _payload(problem, boundary.stitching_layer(matcher, "fit()", layer, problem), target_accuracy, task, cache)


def _fit_row(task: MatrixTask, problems: list[StitchingProblem], target_accuracy: float,
             cache: ActivationCache) -> list[dict[str, Any]]:
    """The stitchers of several cells of one row, fitted together by the matcher's
    ``fit_many``, each evaluated, as cell-cache payloads."""
    job = task.job
    matcher = job.plugin.obj
    targets = ", ".join(p.target_layer for p in problems)
    cells = f"{job.label} cells ({problems[0].source_layer} -> {targets})"
    torch.manual_seed(task.seed)
    with job_errors(cells, matcher.name):
        layers = list(matcher.fit_many(problems, job.plugin.params))
    if len(layers) != len(problems):
        raise PluginError(matcher.name, f"fit_many() returned {len(layers)} stitchers for {len(problems)} problems "
                          f"({cells})")
    return [
        _payload(p, boundary.stitching_layer(matcher, "fit_many()", layer, p), target_accuracy, task, cache)
        for p, layer in zip(problems, layers)
    ]


def _payload(problem: StitchingProblem, layer: StitchingLayer, target_accuracy: float, task: MatrixTask,
             cache: ActivationCache) -> dict[str, Any]:
    acc = stitched_accuracy(problem, layer, cache, task.eval_batch_size)
    rel = acc / target_accuracy if target_accuracy > 0 else float("nan")
    return {"relative_accuracy": torch.tensor(rel, dtype=torch.float64),
            "accuracy": torch.tensor(acc, dtype=torch.float64),
            "state": {k: v.detach().cpu() for k, v in layer.state_dict().items()},
            # plain JSON types only: the cell cache is read with weights_only=True
            "fit_info": json.loads(artifacts.to_json(layer.fit_info))}


def compute_index_matrix(task: MatrixTask, data: Any, source: NetworkResult, target: NetworkResult) -> np.ndarray:
    """The job's similarity index for every (source layer, target layer) pair on the first
    ``n_examples`` test examples: an (n, n) float array. Writes nothing."""
    job = task.job
    index = job.plugin.obj
    state = worker.state()
    device = torch.device(task.device)
    src = state.network(task.architecture, source, data, device)
    tgt = state.network(task.architecture, target, data, device)

    def layer_list(net: Any, split: str, n: int | None) -> list[np.ndarray]:
        return state.cache.numpy_layers(net, split, n, data, task.seed, task.layers)

    sources = layer_list(src, "test", task.n_examples)
    targets = sources if job.scope == "intra" else layer_list(tgt, "test", task.n_examples)

    def train_sample(side: str, n: int) -> list[np.ndarray]:
        return layer_list(src if side == "source" else tgt, "train_sample", n)

    ctx = IndexContext(
        params=job.plugin.params,
        train_sample=train_sample if getattr(index, "needs_train_activations", False) else None,
        same_network=job.scope == "intra",
        shared=state.index_shared.setdefault(index.name, {}),
    )
    with job_errors(job.label, index.name):
        return boundary.index_matrix(index, sources, targets, ctx)


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




# -- the driver's side --------------------------------------------------------------------


def cell_dir(job: MatrixJob, workspace: Path) -> Path:
    return mlruns_dir(workspace) / "cache" / job.key


def discard_cells(job: MatrixJob, workspace: Path) -> None:
    """Forget the finished cells an interrupted run of ``job`` kept for resuming."""
    CellCache(cell_dir(job, workspace)).clear()


def submit_matrix(
    job: MatrixJob, plan: Plan, executor: Executor, data: Any, source: Any, target: Any,
    device: torch.device, workspace: Path, parts: int = 1,
) -> list[Future]:
    """Submit ``job``; ``data``, ``source`` and ``target`` are values, shared handles or
    futures (of the networks' training tasks). A stitching matrix goes as ``parts`` tasks
    of consecutive source layers (its cells are independent), an index matrix as one."""
    cfg = plan.config
    keep_cells = job.kind == "stitch_matrix" and executor.shares_disk
    task = MatrixTask(
        job, plan.architecture, list(plan.layers), cfg.seed, str(device), cfg.stitching.eval_batch_size,
        cfg.indices.n_examples, str(cell_dir(job, workspace)) if keep_cells else None,
    )
    if job.kind == "index_matrix":
        return [executor.submit(compute_index_matrix, task, data, source, target, label=job.label)]
    n = len(plan.layers)
    if parts <= 1:
        return [executor.submit(compute_stitch_matrix, task, data, source, target, None, label=job.label)]
    groups = [list(g) for g in np.array_split(np.arange(n), min(parts, n))]
    return [
        executor.submit(compute_stitch_matrix, task, data, source, target, [int(i) for i in rows],
                        label=f"{job.label} from {plan.layers[rows[0]]}..{plan.layers[rows[-1]]}")
        for rows in groups
    ]


def finish_matrix(job: MatrixJob, plan: Plan, futures: list[Future], workspace: Path) -> MatrixRecord:
    """In the driver: the job's nested run around its tasks' results (with the local
    executor the matrix is filled right here, inside the run), then its matrix, heat map
    and, for stitching, the stitchers and what the matcher reported of each fit."""
    params = {f"{job.plugin.name}.{k}": v for k, v in job.plugin.params_dict().items()}
    with job_run(job.label, kind=job.kind, plugin=job.plugin.name, key=job.key, tags=_tags(job)) as out:
        if job.kind == "stitch_matrix":
            out.log_params(params or {"params": "{}"})
            result = merge_rows(job, len(plan.layers), [f.result() for f in futures])
            out.log_metrics({"cells_resumed": result.resumed})
            if result.resumed:
                log.info("%s: resumed %d finished stitchers of an interrupted run", job.label, result.resumed)
            record = _record(job, plan, result.values, out.run_id, result.stitchers)
            _log_matrix(out, job, plan, result.values, record)
            out.log_state_dict(result.stitchers, STITCHERS_ARTIFACT)
            out.log_table(result.fit_info, "matrix/fit_info.json")
        else:
            out.log_params({"n_examples": plan.config.indices.n_examples, **params})
            (future,) = futures
            values = future.result()
            record = _record(job, plan, values, out.run_id)
            _log_matrix(out, job, plan, values, record)
    if job.kind == "stitch_matrix":
        CellCache(cell_dir(job, workspace)).clear()
    return record
