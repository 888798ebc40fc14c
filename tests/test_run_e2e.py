"""The command line end to end on a tiny config, read back from MLflow as a user would."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

from .conftest import RUN_TINY, cli, client_of

# Under pytest-xdist the modules that read the shared run's rerun go to one process: it is made once.
pytestmark = pytest.mark.xdist_group("rerun")

# The shared tiny run (tests/conftest.py): two width-4 ResNet-18s on digits, layers 0, 3, 7,
# every matcher, index and evaluation and the registered third-party index `mean_norm`.
MEASURES = ("dm", "tlm", "lcka", "pwcca", "opd", "dm_struct", "mean_norm")


def test_run_logs_parent_nested_runs_and_registered_models(trained_workspace):
    ws, first = trained_workspace.path, trained_workspace.result
    client = client_of(ws)
    exp = client.get_experiment_by_name("tiny")
    assert exp is not None and exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    parents = client.search_runs([exp.experiment_id], "tags.`stitchbench.kind` = 'parent'")
    assert len(parents) == 1 and all(r.info.status == "FINISHED" for r in parents)
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    kinds = sorted({c.data.tags["stitchbench.kind"] for c in children})
    assert kinds == ["evaluation", "index_matrix", "network", "stitch_matrix"]
    assert all(c.info.status == "FINISHED" and c.data.tags["stitchbench.complete"] == "1" for c in children)
    # 2 networks; per measure 2 intra + 1 inter matrices
    by_plugin = {}
    for c in children:
        by_plugin.setdefault(c.data.tags.get("stitchbench.plugin"), []).append(c)
    for measure in MEASURES:
        assert len(by_plugin[measure]) == 3, measure
    models = {m.name for m in client.search_registered_models()}
    assert {"digits-resnet18-w4-seed0", "digits-resnet18-w4-seed1"} <= models
    # A DM self-stitch of a layer to itself keeps the network's accuracy: diagonal 1.00 +- 0.01.
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}")
    for run in by_plugin["dm"]:
        if run.data.tags["stitchbench.scope"] == "intra":
            values = np.load(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                 artifact_path="matrix/values.npy"))
            assert values.shape == (3, 3)
            np.testing.assert_allclose(np.diag(values), 1.0, atol=0.01)
    tlm = next(r for r in by_plugin["tlm"] if r.data.tags["stitchbench.scope"] == "intra")
    artifacts = {a.path for a in client.list_artifacts(tlm.info.run_id, "matrix")}
    assert {"matrix/values.npy", "matrix/values.csv", "matrix/heatmap.png", "matrix/stitchers.pt",
            "matrix/fit_info.json"} <= artifacts
    # what the matcher reported of each of the 3 x 3 fits is kept with the matrix
    fit_info = json.loads(Path(client.download_artifacts(tlm.info.run_id, "matrix/fit_info.json")).read_text())
    assert sorted(fit_info) == sorted(f"{i}_{j}" for i in range(3) for j in range(3))
    assert all(info["matcher"] == "tlm" and len(info["loss_per_epoch"]) == 1 for info in fit_info.values())
    assert "networks trained 2" in first.stdout


def test_second_identical_run_trains_nothing(rerun_workspace):
    ws, second = rerun_workspace.path, rerun_workspace.result
    assert "networks trained 0, reused 2" in second.stdout
    assert "matrix jobs computed 0" in second.stdout
    client = client_of(ws)
    for name in ("digits-resnet18-w4-seed0", "digits-resnet18-w4-seed1"):
        assert len(client.search_model_versions(f"name = '{name}'")) == 1
    exp = client.get_experiment_by_name("tiny")
    nets = client.search_runs([exp.experiment_id], "tags.`stitchbench.kind` = 'network'")
    assert len(nets) == 2


def test_report_reads_table1_back_from_mlflow(trained_workspace, cli_here):
    ws = trained_workspace.path
    p = cli("report", "latest", "--json", cwd=ws)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert {"run_id", "layer_identification", "ood", "ding"} <= set(r)
    li = r["layer_identification"]
    for scope in ("intra", "inter"):
        for measure in ("dm_func", "tlm", "lcka", "pwcca", "opd", "dm_struct", "mean_norm"):
            assert 0.0 <= li[scope][measure] <= 1.0
    # Self-stitching through DM reproduces each layer, and CKA of a layer with itself is maximal.
    assert li["intra"]["lcka"] == 1.0
    client = client_of(ws)
    parent = client.get_run(r["run_id"])
    assert parent.data.metrics["layer_id.intra.lcka"] == li["intra"]["lcka"]
    text = cli_here("report", "latest", cwd=ws)
    assert text.returncode == 0 and "Layer identification" in text.stdout and "dm_func" in text.stdout
    bad = cli_here("report", "0123456789abcdef", cwd=ws)
    assert bad.returncode == 2 and "no run with id" in bad.stderr


def test_a_run_of_one_plugin_reuses_the_networks_and_runs_only_that_plugin(shared_ws, cli_here):
    ws = shared_ws
    listing = json.loads(cli_here("plugins", "list", "--json", cwd=ws).stdout)
    assert {"name": "mean_norm", "kind": "similarity_index"}.items() <= next(
        d for d in listing if d["name"] == "mean_norm").items()
    run = cli_here(*RUN_TINY, "--plugin", "mean_norm", "--set", "indices.n_examples=90", cwd=ws)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "networks trained 0, reused 2" in run.stdout and "matrix jobs computed 3, reused 0" in run.stdout
    client = client_of(ws)
    exp = client.get_experiment_by_name("tiny")
    r = json.loads(cli_here("report", "latest", "--json", cwd=ws).stdout)
    assert set(r["layer_identification"]["intra"]) == {"mean_norm"}
    # the other measures did not run again in that run
    kids = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{r['run_id']}'")
    assert {k.data.tags.get("stitchbench.plugin") for k in kids} == {"mean_norm", "layer_identification"}
    assert all(k.info.status == "FINISHED" for k in kids)


FAILING = '''
import stitchbench

class Exploding(stitchbench.SimilarityIndex):
    """An index that always raises (a test plugin)."""
    name = "exploding"
    higher_is_more_similar = True

    def compute(self, A, B):
        if len(A) > 60:  # passes the load-time checks (48 examples), fails in the run's job
            raise RuntimeError("kaboom in compute")
        return 1.0 if A is B else 0.5

@stitchbench.hookimpl
def register_similarity_indices(register):
    register(Exploding())
'''


def test_a_plugin_failing_in_a_job_names_the_plugin_and_the_job(shared_ws, tmp_path, cli_here):
    ws = shared_ws
    f = tmp_path / "exploding.py"
    f.write_text(FAILING)
    assert cli_here("plugins", "register", str(f), cwd=ws).returncode == 0
    p = cli_here(*RUN_TINY, "--plugin", "exploding", cwd=ws)
    assert p.returncode == 1
    assert "exploding [intra] digits-resnet18-w4-seed0" in p.stderr and "plugin exploding" in p.stderr
    assert "kaboom in compute" in p.stderr and "Traceback" not in p.stderr
    client = client_of(ws)
    exp = client.get_experiment_by_name("tiny")
    newest = client.search_runs([exp.experiment_id], "tags.`stitchbench.kind` = 'parent'",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert newest.info.status == "FAILED"
    failed_jobs = client.search_runs([exp.experiment_id], "tags.`stitchbench.plugin` = 'exploding'")
    assert [r.info.status for r in failed_jobs] == ["FAILED"]
