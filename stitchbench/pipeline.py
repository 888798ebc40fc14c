"""The run pipeline: networks -> stitching matrices -> index matrices -> evaluations,
all logged under one MLflow parent run."""

from __future__ import annotations

import logging
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import tracking
from .context import MatrixRecord, RunContext
from .errors import JobError, StitchbenchError, UsageError
from .plan import Plan
from .plugins import PluginSet
from .runs import child_run, log_figure, parent_run

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
    import mlflow

    from .activations import ActivationCache
    from .matrices import run_index_matrix, run_stitch_matrix
    from .networks import ensure_network

    cfg = plan.config
    device = resolve_device(cfg.device)
    if "gpu" in cfg.requires and device.type == "cpu":
        log.warning("preset %s is sized for a GPU; on the CPU it will take very long", cfg.name)
    client = client or tracking.connect(workspace)
    exp_id = tracking.experiment_id(client, cfg.name, workspace)
    tracking.end_stale_runs(client, exp_id)
    tags = {
        **tracking.this_process_tags(),
        tracking.TAG_KIND: "parent",
        "stitchbench.command": shlex.join(["stitchbench", *sys.argv[1:]]) if sys.argv else "stitchbench run",
        "stitchbench.plan": ",".join(u.name for u in plan.matchers + plan.indices + plan.evaluations),
        "mlflow.note.content": cfg.description or f"stitchbench run of {cfg.name}",
    }
    metrics: dict[str, float] = {}
    texts: list[str] = []
    run_name = f"{cfg.name} {time.strftime('%Y-%m-%d %H:%M:%S')}"
    with parent_run(exp_id, cfg, run_name=run_name, tags=tags) as parent:
        mlflow.log_text(plan.describe(), "plan.txt")
        nets = {}
        for spec in plan.networks:
            try:
                nets[spec.model_name] = ensure_network(plan, spec, client, device)
            except StitchbenchError:
                raise
            except Exception as e:
                raise JobError(f"network {spec.model_name}", plan.architecture.name, e) from e
        for name, t in nets.items():
            metrics[f"network.{name}.test_accuracy"] = t.test_accuracy
        cache = ActivationCache()
        records: list[MatrixRecord] = []
        index_shared: dict[str, dict] = {}  # per index: statistics shared by its matrices
        reused = computed = 0
        for job in plan.jobs:
            before = tracking.find_finished_job(client, job.key) is not None
            if job.kind == "stitch_matrix":
                rec = run_stitch_matrix(job, plan, nets, cache, client, device, workspace)
            else:
                rec = run_index_matrix(job, plan, nets, cache, client, index_shared.setdefault(job.plugin.name, {}))
            records.append(rec)
            reused += before
            computed += not before
        tracking.log_json(
            [{"job": j.label, "kind": j.kind, "key": j.key, "run_id": r.run_id} for j, r in zip(plan.jobs, records)],
            "jobs.json",
        )
        context = RunContext(
            config=cfg, data=plan.data, networks={k: v.net for k, v in nets.items()},
            network_accuracy={k: v.test_accuracy for k, v in nets.items()}, layers=plan.layers,
            matrices=records, device=device, workspace=workspace, cache=cache, plugins=plugins,
            run_id=parent.info.run_id,
        )
        for ev in plan.evaluations:
            with child_run(f"evaluation {ev.name}", {tracking.TAG_KIND: "evaluation", tracking.TAG_PLUGIN: ev.name}):
                try:
                    result = ev.obj.run(context, ev.params)
                except StitchbenchError:
                    raise
                except Exception as e:
                    raise JobError(f"evaluation {ev.name}", ev.name, e) from e
                if result.metrics:
                    mlflow.log_metrics(result.metrics)
                for tname, table in result.tables.items():
                    tracking.log_json(table, f"{tname}.json")
                for fname, fig in result.figures.items():
                    log_figure(fig, f"{fname}.png")
                tracking.log_json(
                    {"key": result.report_key or ev.name, "data": result.report, "text": result.report_text},
                    "report.json",
                )
            if result.metrics:
                for k, v in result.metrics.items():
                    client.log_metric(parent.info.run_id, k, float(v))
                metrics.update(result.metrics)
            if result.report_text:
                texts.append(result.report_text)
        mlflow.log_metrics({k: v for k, v in metrics.items() if k.startswith("network.")})
        mlflow.set_tag(tracking.TAG_COMPLETE, "1")
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
