"""``stitchbench report``: the paper-style tables of a finished run, read back from MLflow.

The JSON has the top-level keys ``run_id``, ``experiment``, ``status``, ``start_time``,
``layer_identification``, ``ood``, ``ding`` (null until a run has them) and one key per
other evaluation section. Each evaluation's nested run holds a ``report.json`` artifact:
``{"key": section, "data": ..., "text": ...}``. With ``--matrices`` it has ``matrices`` too:
every matrix of the run (`build_matrices`).
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import UsageError
from .artifacts import read_json
from .jobs import all_experiment_ids
from .tags import TAG_KIND, TAG_PLUGIN

log = logging.getLogger(__name__)
STANDARD_SECTIONS = ("layer_identification", "ood", "ding")
#: What each evaluation's run holds of its report: ``{"key": section, "data": ..., "text": ...}``.
REPORT_SECTION_ARTIFACT = "report.json"
#: What the parent run lists its matrix jobs in, reused ones included: ``[{job, kind, key, run_id}]``.
JOBS_ARTIFACT = "jobs.json"
MATRIX_KINDS = ("stitch_matrix", "index_matrix")
#: What a matrix job's run holds (`run.matrix_jobs`): the values, and the same as a table
#: whose header row names the target layers and whose first column the source layers.
MATRIX_VALUES = "matrix/values.npy"
MATRIX_TABLE = "matrix/values.csv"


def resolve_run(client: Any, ref: str) -> Any:
    """The parent run ``ref`` (a run id, or ``latest``: the newest finished parent run)."""
    ids = all_experiment_ids(client)
    if ref == "latest":
        runs = client.search_runs(
            ids,
            filter_string=f"tags.`{TAG_KIND}` = 'parent' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        ) if ids else []
        if not runs:
            raise UsageError("no finished `stitchbench run` in this workspace's MLflow store; run `stitchbench run` first")
        return runs[0]
    try:
        run = client.get_run(ref)
    except Exception:  # noqa: BLE001 - MLflow raises its own not-found exception
        raise UsageError(f"no run with id {ref!r} in {client.tracking_uri}; use `stitchbench report latest`") from None
    if run.data.tags.get(TAG_KIND) != "parent":
        parent = run.data.tags.get("mlflow.parentRunId")
        hint = f" (its parent run is {parent})" if parent else ""
        raise UsageError(f"run {ref} is not the parent run of a `stitchbench run`{hint}")
    return run


def build_report(client: Any, run: Any) -> dict[str, Any]:
    rid = run.info.run_id
    children = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{rid}' and tags.`{TAG_KIND}` = 'evaluation'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )
    report: dict[str, Any] = {
        "run_id": rid,
        "experiment": client.get_experiment(run.info.experiment_id).name,
        "status": run.info.status,
        "start_time": run.info.start_time,
        **{k: None for k in STANDARD_SECTIONS},
    }
    texts = []
    for child in children:
        try:
            section = read_json(child.info.run_id, REPORT_SECTION_ARTIFACT)
        except Exception as e:  # noqa: BLE001 - an evaluation without a report section
            log.debug("evaluation run %s has no report.json: %s", child.info.run_id, e)
            continue
        key = section.get("key")
        if key and section.get("data") is not None:
            if isinstance(report.get(key), dict) and isinstance(section["data"], dict):
                report[key].update(section["data"])
            else:
                report[key] = section["data"]
        if section.get("text"):
            texts.append(section["text"])
    report["_text"] = texts
    report["networks"] = {
        k[len("network."):-len(".test_accuracy")]: v
        for k, v in run.data.metrics.items() if k.startswith("network.") and k.endswith(".test_accuracy")
    }
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"run {report['run_id']}  (experiment {report['experiment']}, {report['status']})"]
    if report.get("networks"):
        lines.append("networks (test accuracy): " + ", ".join(f"{k} {v:.4f}" for k, v in report["networks"].items()))
    lines.append("")
    for text in report.get("_text", []):
        lines.append(text.rstrip())
        lines.append("")
    if not report.get("_text"):
        lines.append("(this run has no evaluation results)")
    return "\n".join(lines).rstrip() + "\n"


def build_matrices(client: Any, run: Any) -> list[dict[str, Any]]:
    """Every matrix of the parent run ``run``, in the order of its jobs: ``{job, kind,
    plugin, scope, source, target, layers, values, run_id}``, ``values`` a nested list (rows
    the source network's layers, columns the target's, both in the order of ``layers``).

    The parent's ``jobs.json`` lists every matrix job, also those reused from an earlier
    run (whose runs are children of that run's parent, not of this one); a run without it
    (stopped before its matrices were done) falls back to its own child runs. A matrix
    whose artifacts cannot be read has ``values`` null and an ``error``."""
    rid = run.info.run_id
    try:
        jobs = [j for j in read_json(rid, JOBS_ARTIFACT) if j.get("kind") in MATRIX_KINDS]
    except Exception as e:  # noqa: BLE001 - an older or unfinished run: its own children
        log.debug("run %s has no readable %s (%s); listing its child runs", rid, JOBS_ARTIFACT, e)
        children = client.search_runs(
            [run.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{rid}'",
            order_by=["attributes.start_time ASC"],
            max_results=10000,
        )
        jobs = [{"job": c.info.run_name, "kind": c.data.tags.get(TAG_KIND), "run_id": c.info.run_id}
                for c in children if c.data.tags.get(TAG_KIND) in MATRIX_KINDS]
    return [_matrix_entry(client, job) for job in jobs]


def _matrix_entry(client: Any, job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from .artifacts import download

    run_id = job.get("run_id")
    entry: dict[str, Any] = {"job": job.get("job"), "kind": job.get("kind"), "plugin": None, "scope": None,
                             "source": None, "target": None, "layers": None, "values": None, "run_id": run_id}
    try:
        tags = client.get_run(run_id).data.tags
        entry.update(plugin=tags.get(TAG_PLUGIN), scope=tags.get("stitchbench.scope"),
                     source=tags.get("stitchbench.source"), target=tags.get("stitchbench.target"))
        values = np.load(download(run_id, MATRIX_VALUES), allow_pickle=False)
        layers = _layer_names(download(run_id, MATRIX_TABLE).read_text())
    except Exception as e:  # noqa: BLE001 - one unreadable matrix does not hide the others
        log.warning("matrix %s (run %s) could not be read: %s", job.get("job"), run_id, e)
        entry["error"] = f"{type(e).__name__}: {e}"
        return entry
    if values.ndim != 2 or (layers is not None and values.shape != (len(layers), len(layers))):
        entry["error"] = f"{MATRIX_VALUES} has shape {values.shape}, not one row and column per layer"
        return entry
    entry["layers"] = layers if layers is not None else [str(i) for i in range(values.shape[0])]
    entry["values"] = [[float(v) if np.isfinite(v) else None for v in row] for row in values.astype(float)]
    return entry


def _layer_names(csv_text: str) -> list[str] | None:
    """The target layers a matrix's ``values.csv`` header row names (None without one)."""
    header = csv_text.split("\n", 1)[0].rstrip("\r").split(",")
    if not header or not header[0].startswith("source"):
        return None
    return header[1:]


def format_matrices(matrices: list[dict[str, Any]]) -> str:
    """Each matrix as a title line and a table: source layers down, target layers across."""
    if not matrices:
        return "(this run has no matrices)\n"
    blocks = []
    for m in matrices:
        what = "stitching, relative accuracy" if m["kind"] == "stitch_matrix" else "similarity index"
        arrow = f"{m['source']} -> {m['target']}"
        lines = [f"{m['plugin'] or m['job']} ({what}), {m['scope']}: {arrow}   [run {m['run_id']}]"]
        if m["values"] is None:
            lines.append(f"  (not readable: {m.get('error')})")
            blocks.append("\n".join(lines))
            continue
        corner = "source \\ target"
        w0 = max([len(corner), *(len(name) for name in m["layers"])])
        w = max([8, *(len(name) for name in m["layers"])])
        lines.append(f"{corner:<{w0}}  " + "  ".join(f"{name:>{w}}" for name in m["layers"]))
        for name, row in zip(m["layers"], m["values"]):
            cells = ("nan" if v is None else f"{v + 0.0:.4f}".replace("-0.0000", "0.0000") for v in row)
            lines.append(f"{name:<{w0}}  " + "  ".join(f"{c:>{w}}" for c in cells))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"
