"""The run pipeline: networks -> stitching matrices -> index matrices -> evaluations,
all logged under one MLflow parent run.

What runs where: the networks' training and the matrices are tasks on the run's executor
(`stitchbench.execution.executors`: in this process, or Ray tasks); finding finished jobs by key,
every MLflow write, and the evaluations happen here, in the driver."""

from __future__ import annotations

import contextlib
import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError, job_errors
from ..plugin.manager import PluginSet
from ..plugin.types import EvaluationResult
from ..progress import progress_bar
from ..store import connection
from ..store.artifacts import to_json
from ..store.jobs import job_run
from ..store.report import REPORT_SECTION_ARTIFACT
from ..store.runs import parent_run
from ..store.tags import TAG_COMPLETE, TAG_KIND
from . import boundary
from .config import config_json, flat_params
from .context import MatrixRecord, RunContext
from .plan import NetworkSpec, Plan, PluginUse

if TYPE_CHECKING:
    from ..execution.executors import Executor, Future
    from .network_jobs import TrainedNetwork

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_id: str
    experiment_id: str
    metrics: dict[str, float]
    trained: list[str]
    reused_networks: list[str]
    computed_jobs: int
    reused_jobs: int
    report_texts: list[str]


def resolve_device(choice: str) -> Any:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible to torch here; use --device cpu or auto")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def execute(plan: Plan, plugins: PluginSet, workspace: Path, *, client: Any = None) -> RunResult:
    """Run ``plan``: networks and matrices as tasks on the configured executor (their
    MLflow runs written here, in the driver), then the evaluations here."""
    import mlflow
    import torch

    from ..execution import worker_state as worker
    from ..execution.executors import make_executor

    cfg = plan.config
    device = resolve_device(cfg.device)
    if "gpu" in cfg.requires and device.type == "cpu":
        log.warning("preset %s is sized for a GPU; on the CPU it will take very long", cfg.name)
    client = client or connection.connect(workspace)
    exp_id = connection.experiment_id(client, cfg.name, workspace)
    connection.end_stale_runs(client, exp_id)
    metrics: dict[str, float] = {}
    texts: list[str] = []
    run_name = f"{cfg.name} {time.strftime('%Y-%m-%d %H:%M:%S')}"
    state = worker.reset()
    try:
        # The executor starts first: a Ray cluster that cannot be reached is a usage error,
        # not a failed run.
        with (
            make_executor(cfg.executor, device.type) as executor,
            parent_run(exp_id, params=flat_params(cfg), config_json=config_json(cfg), run_name=run_name,
                       tags=_parent_tags(plan, executor)) as parent,
        ):
            mlflow.log_text(plan.describe(), "plan.txt")
            nets, records, reused, computed = _run_jobs(plan, executor, client, device, workspace)
            for name, t in nets.items():
                metrics[f"network.{name}.test_accuracy"] = t.test_accuracy
            mlflow.log_text(to_json(
                [{"job": j.label, "kind": j.kind, "key": j.key, "run_id": r.run_id} for j, r in zip(plan.jobs, records)]),
                "jobs.json",
            )
            context = RunContext(
                config=cfg, data=plan.data, networks={k: v.net for k, v in nets.items()},
                network_accuracy={k: v.test_accuracy for k, v in nets.items()}, layers=plan.layers,
                matrices=records, device=device, workspace=workspace, cache=state.cache, plugins=plugins,
                run_id=parent.info.run_id, network_keys={n.model_name: n.key for n in plan.networks},
                architecture=plan.architecture, executor=executor, data_key=plan.dataset_key,
                no_reuse=plan.no_reuse,
            )
            for ev in plan.evaluations:
                # Evaluations run here, in the driver (their tasks go to the executor through the
                # context). The seed makes one that draws from torch's global generator
                # independent of what ran here before.
                torch.manual_seed(cfg.seed)
                result = _evaluate(ev, context)
                if result.metrics:
                    for k, v in result.metrics.items():
                        client.log_metric(parent.info.run_id, k, float(v))
                    metrics.update(result.metrics)
                if result.report_text:
                    texts.append(result.report_text)
            mlflow.log_metrics({k: v for k, v in metrics.items() if k.startswith("network.")})
            mlflow.set_tag(TAG_COMPLETE, "1")
    finally:
        worker.clear()
    return RunResult(
        run_id=parent.info.run_id,
        experiment_id=exp_id,
        metrics=metrics,
        trained=[k for k, v in nets.items() if not v.reused],
        reused_networks=[k for k, v in nets.items() if v.reused],
        computed_jobs=computed,
        reused_jobs=reused,
        report_texts=texts,
    )


def _parent_tags(plan: Plan, executor: Executor) -> dict[str, str]:
    return {
        **connection.this_process_tags(),
        TAG_KIND: "parent",
        "stitchbench.command": shlex.join(["stitchbench", *sys.argv[1:]]) if sys.argv else "stitchbench run",
        "stitchbench.plan": ",".join(u.name for u in plan.matchers + plan.indices + plan.evaluations),
        "stitchbench.executor": executor.describe(),
        **({"stitchbench.no_reuse": ",".join(sorted(plan.no_reuse))} if plan.no_reuse else {}),
        "mlflow.note.content": plan.config.description or f"stitchbench run of {plan.config.name}",
    }


def _run_jobs(
    plan: Plan, executor: Executor, client: Any, device: Any, workspace: Path
) -> tuple[dict[str, TrainedNetwork], list[MatrixRecord], int, int]:
    """Every network and matrix job of ``plan``: a job whose key has a finished run is
    reused, every other one is submitted to ``executor``, a matrix job with the futures of
    its networks' training (so on Ray it starts as soon as they are trained, with no
    barrier); results are logged to MLflow here as they arrive. Returns the networks (in
    plan order), the matrix records (in job order), and how many matrix jobs were reused
    and computed."""
    from .matrix_jobs import discard_cells, finish_matrix, reuse_matrix, submit_matrix
    from .network_jobs import finish_training, reuse_network, submit_training

    data = executor.share(plan.dataset_key, plan.data)
    found: dict[str, TrainedNetwork] = {}
    inputs: dict[str, Any] = {}  # model name -> what matrix tasks take: a value, a shared handle or a future
    training: dict[Future, NetworkSpec] = {}
    for spec in plan.networks:
        with job_errors(f"network {spec.model_name}", plan.architecture.name):
            net = None if plan.recompute_networks() else reuse_network(plan, spec, client, device)
        if net is not None:
            found[spec.model_name] = net
            # In this process the network is in the worker state already; elsewhere it needs its weights.
            inputs[spec.model_name] = executor.share(spec.key, net.as_input(with_weights=not executor.in_process))
        else:
            fut = submit_training(plan, spec, executor, data, device)
            training[fut] = spec
            inputs[spec.model_name] = fut
    records: list[MatrixRecord | None] = [None] * len(plan.jobs)
    todo = []
    for i, job in enumerate(plan.jobs):
        rec = None if plan.recompute(job.plugin) else reuse_matrix(job, plan, client)
        if rec is None:
            todo.append(i)
            if plan.recompute(job.plugin):
                discard_cells(job, workspace)  # --no-reuse: nor the cells of an interrupted run
        records[i] = rec
    # Fewer jobs than the executor has slots: stitching matrices go in parts (by source layer).
    parts = math.ceil(executor.slots() / len(todo)) if todo else 1
    tasks_of: dict[int, list[Future]] = {}  # job index -> its tasks
    job_of: dict[Future, int] = {}
    for i in todo:
        job = plan.jobs[i]
        tasks_of[i] = submit_matrix(job, plan, executor, data, inputs[job.source.model_name],
                                    inputs[job.target.model_name], device, workspace, parts)
        job_of.update((f, i) for f in tasks_of[i])
    if training or tasks_of:
        log.info("%d network and %d matrix job(s) (%d tasks) on %s", len(training), len(tasks_of),
                 len(training) + len(job_of), executor.name)
    waiting = {i: len(fs) for i, fs in tasks_of.items()}
    # Tasks that run elsewhere show no progress of their own here: count them as they finish.
    counter = (contextlib.nullcontext() if executor.in_process else
               progress_bar(total=len(training) + len(job_of), desc=f"{executor.name} tasks", unit="task"))
    with counter as bar:
        for fut in executor.as_completed([*training, *job_of]):
            if bar is not None:
                bar.update(1)
            if fut in training:
                spec = training[fut]
                with job_errors(f"network {spec.model_name}", plan.architecture.name):
                    found[spec.model_name] = finish_training(plan, spec, fut, device, live=executor.in_process)
                continue
            i = job_of[fut]
            waiting[i] -= 1
            if waiting[i]:
                continue  # the job's other tasks are still running
            with job_errors(plan.jobs[i].label, plan.jobs[i].plugin.name):
                records[i] = finish_matrix(plan.jobs[i], plan, tasks_of[i], workspace)
    nets = {spec.model_name: found[spec.model_name] for spec in plan.networks}
    return nets, [r for r in records if r is not None], len(plan.jobs) - len(tasks_of), len(tasks_of)


def _evaluate(ev: PluginUse, context: RunContext) -> EvaluationResult:
    """Run one evaluation in its nested run and log what it returns there."""
    with job_run(f"evaluation {ev.name}", kind="evaluation", plugin=ev.name) as out:
        with job_errors(f"evaluation {ev.name}", ev.name):
            result = boundary.evaluation_result(ev.obj, ev.obj.run(context.for_evaluation(ev.name, out), ev.params))
        if result.metrics:
            out.log_metrics(result.metrics)
        for tname, table in result.tables.items():
            out.log_table(table, tname)
        for fname, fig in result.figures.items():
            out.log_figure(fig, fname)
        out.log_table({"key": result.report_key or ev.name, "data": result.report, "text": result.report_text},
                      REPORT_SECTION_ARTIFACT)
    return result
