"""``stitchbench report``: the paper-style tables of a finished run, read back from MLflow.

The JSON has the top-level keys ``run_id``, ``experiment``, ``status``, ``start_time``,
``layer_identification``, ``ood``, ``ding`` (null until a run has them) and one key per
other evaluation section. Each evaluation's nested run holds a ``report.json`` artifact:
``{"key": section, "data": ..., "text": ...}``.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import UsageError
from .artifacts import read_json
from .jobs import all_experiment_ids
from .tags import TAG_KIND

log = logging.getLogger(__name__)
STANDARD_SECTIONS = ("layer_identification", "ood", "ding")
#: What each evaluation's run holds of its report: ``{"key": section, "data": ..., "text": ...}``.
REPORT_SECTION_ARTIFACT = "report.json"


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
