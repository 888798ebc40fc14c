"""The command line end to end on a tiny config, read back from MLflow as a user would."""

from __future__ import annotations

import json
import textwrap

import mlflow
import numpy as np
import pytest

from .conftest import MEAN_NORM_PLUGIN, cli

TINY = """
name: tiny
dataset: {name: digits}
networks:
  architecture: {name: resnet18, params: {width: 4}}
  count: 2
  training: {epochs: 2, batch_size: 128, lr: 0.003, augment: false}
stitching:
  layers: [0, 3, 7]
  params:
    dm: {k: 40}
    tlm: {epochs: 1, batch_size: 256}
indices: {n_examples: 120, params: {dm_struct: {k: 40}}}
"""

PLUGIN = MEAN_NORM_PLUGIN


def _client(ws):
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One workspace with the tiny config run twice."""
    ws = tmp_path_factory.mktemp("e2e")
    (ws / "tiny.yaml").write_text(textwrap.dedent(TINY))
    first = cli("run", "--config", "tiny.yaml", cwd=ws)
    assert first.returncode == 0, first.stderr[-3000:]
    second = cli("run", "--config", "tiny.yaml", cwd=ws)
    assert second.returncode == 0, second.stderr[-3000:]
    return ws, first, second


def test_run_logs_parent_nested_runs_and_registered_models(finished):
    ws, first, _ = finished
    client = _client(ws)
    exp = client.get_experiment_by_name("tiny")
    assert exp is not None and exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    parents = client.search_runs([exp.experiment_id], "tags.`stitchbench.kind` = 'parent'")
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)
    first_parent = min(parents, key=lambda r: r.info.start_time)
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{first_parent.info.run_id}'")
    kinds = sorted({c.data.tags["stitchbench.kind"] for c in children})
    assert kinds == ["evaluation", "index_matrix", "network", "stitch_matrix"]
    assert all(c.info.status == "FINISHED" for c in children)
    # 2 networks; per measure 2 intra + 1 inter matrices
    by_plugin = {}
    for c in children:
        by_plugin.setdefault(c.data.tags.get("stitchbench.plugin"), []).append(c)
    for measure in ("dm", "tlm", "lcka", "pwcca", "opd", "dm_struct"):
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
    artifacts = {a.path for a in client.list_artifacts(by_plugin["tlm"][0].info.run_id, "matrix")}
    assert {"matrix/values.npy", "matrix/values.csv", "matrix/heatmap.png", "matrix/stitchers.pt"} <= artifacts
    assert "networks trained 2" in first.stdout


def test_second_identical_run_trains_nothing(finished):
    ws, _, second = finished
    assert "networks trained 0, reused 2" in second.stdout
    assert "matrix jobs computed 0" in second.stdout
    client = _client(ws)
    for name in ("digits-resnet18-w4-seed0", "digits-resnet18-w4-seed1"):
        assert len(client.search_model_versions(f"name = '{name}'")) == 1
    exp = client.get_experiment_by_name("tiny")
    nets = client.search_runs([exp.experiment_id], "tags.`stitchbench.kind` = 'network'")
    assert len(nets) == 2


def test_report_reads_table1_back_from_mlflow(finished):
    ws, _, _ = finished
    p = cli("report", "latest", "--json", cwd=ws)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert {"run_id", "layer_identification", "ood", "ding"} <= set(r)
    li = r["layer_identification"]
    for scope in ("intra", "inter"):
        for measure in ("dm_func", "tlm", "lcka", "pwcca", "opd", "dm_struct"):
            assert 0.0 <= li[scope][measure] <= 1.0
    # Self-stitching through DM reproduces each layer, and CKA of a layer with itself is maximal.
    assert li["intra"]["lcka"] == 1.0
    client = _client(ws)
    parent = client.get_run(r["run_id"])
    assert parent.data.metrics["layer_id.intra.lcka"] == li["intra"]["lcka"]
    text = cli("report", "latest", cwd=ws)
    assert text.returncode == 0 and "Layer identification" in text.stdout and "dm_func" in text.stdout
    bad = cli("report", "0123456789abcdef", cwd=ws)
    assert bad.returncode == 2 and "no run with id" in bad.stderr


def test_registered_third_party_plugin_is_used_by_a_run(finished, tmp_path):
    ws, _, _ = finished
    f = tmp_path / "mean_norm.py"
    f.write_text(PLUGIN)
    p = cli("plugins", "register", str(f), cwd=ws)
    assert p.returncode == 0, p.stderr
    listing = json.loads(cli("plugins", "list", "--json", cwd=ws).stdout)
    assert {"name": "mean_norm", "kind": "similarity_index"}.items() <= next(
        d for d in listing if d["name"] == "mean_norm").items()
    run = cli("run", "--config", "tiny.yaml", "--plugin", "mean_norm", cwd=ws)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "networks trained 0" in run.stdout
    client = _client(ws)
    exp = client.get_experiment_by_name("tiny")
    mats = client.search_runs([exp.experiment_id], "tags.`stitchbench.plugin` = 'mean_norm'")
    assert len(mats) == 3 and all(m.info.status == "FINISHED" for m in mats)
    r = json.loads(cli("report", "latest", "--json", cwd=ws).stdout)
    assert set(r["layer_identification"]["intra"]) == {"mean_norm"}
    # the other measures did not run again in that run
    parent_id = r["run_id"]
    kids = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert {k.data.tags.get("stitchbench.plugin") for k in kids} == {"mean_norm", "layer_identification"}


FAILING = '''
import stitchbench

class Exploding(stitchbench.SimilarityIndex):
    """An index that always raises (a test plugin)."""
    name = "exploding"
    higher_is_more_similar = True

    def compute(self, A, B):
        raise RuntimeError("kaboom in compute")

@stitchbench.hookimpl
def register_similarity_indices(register):
    register(Exploding())
'''


def test_a_plugin_failing_in_a_job_names_the_plugin_and_the_job(finished, tmp_path):
    ws, _, _ = finished
    f = tmp_path / "exploding.py"
    f.write_text(FAILING)
    assert cli("plugins", "register", str(f), cwd=ws).returncode == 0
    try:
        p = cli("run", "--config", "tiny.yaml", "--plugin", "exploding", cwd=ws)
    finally:
        cli("plugins", "unregister", "exploding", cwd=ws)
    assert p.returncode == 1
    assert "exploding [intra] digits-resnet18-w4-seed0" in p.stderr and "plugin exploding" in p.stderr
    assert "kaboom in compute" in p.stderr and "Traceback" not in p.stderr
    client = _client(ws)
    exp = client.get_experiment_by_name("tiny")
    newest = client.search_runs([exp.experiment_id], "tags.`stitchbench.kind` = 'parent'",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert newest.info.status == "FAILED"
    failed_jobs = client.search_runs([exp.experiment_id], "tags.`stitchbench.plugin` = 'exploding'")
    assert [r.info.status for r in failed_jobs] == ["FAILED"]
