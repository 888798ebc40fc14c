"""`stitchbench report RUN --matrices`: every matrix of a run read back from MLflow, the
reused ones (children of an earlier run's parent) included."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stitchbench.store import report as report_module

from .conftest import RUN_TINY, client_of


def _jobs(client, run_id: str) -> list[dict]:
    path = client.download_artifacts(run_id, "jobs.json")
    return json.loads(open(path).read())


def _values(client, run_id: str) -> np.ndarray:
    return np.load(client.download_artifacts(run_id, "matrix/values.npy"), allow_pickle=False)


def _check(ws, cli_here, reused_from: str | None = None) -> dict:
    """The report JSON of the latest run, its matrices checked against the artifacts."""
    p = cli_here("report", "latest", "--matrices", "--json", cwd=ws)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert {"run_id", "layer_identification", "ood", "ding", "matrices"} <= set(r)
    client = client_of(ws)
    jobs = _jobs(client, r["run_id"])
    assert [(m["job"], m["kind"], m["run_id"]) for m in r["matrices"]] == [
        (j["job"], j["kind"], j["run_id"]) for j in jobs]
    for m in r["matrices"]:
        run = client.get_run(m["run_id"])
        assert run.data.tags["mlflow.parentRunId"] == (reused_from or r["run_id"])
        assert m["kind"] in ("stitch_matrix", "index_matrix")
        assert m["plugin"] == run.data.tags["stitchbench.plugin"]
        assert m["scope"] == run.data.tags["stitchbench.scope"]
        assert (m["source"], m["target"]) == (run.data.tags["stitchbench.source"], run.data.tags["stitchbench.target"])
        values = np.asarray(m["values"])
        assert values.shape == (len(m["layers"]),) * 2
        np.testing.assert_array_equal(values, _values(client, m["run_id"]))
    return r


def test_report_matrices_json_and_text(shared_ws, cli_here, monkeypatch):
    ws = shared_ws
    r = _check(ws, cli_here)
    kinds = {m["kind"] for m in r["matrices"]}
    assert kinds == {"stitch_matrix", "index_matrix"}
    assert {m["plugin"] for m in r["matrices"]} >= {"dm", "tlm", "lcka", "pwcca", "opd", "dm_struct", "mean_norm"}
    layers = r["matrices"][0]["layers"]
    assert len(layers) == 3 and all(m["layers"] == layers for m in r["matrices"])

    text = cli_here("report", "latest", "--matrices", cwd=ws)
    assert text.returncode == 0, text.stderr
    assert "Layer identification" in text.stdout  # the report itself, unchanged
    for layer in layers:
        assert layer in text.stdout
    m = r["matrices"][0]
    assert f"{m['plugin']} (stitching, relative accuracy), {m['scope']}: {m['source']} -> {m['target']}" in text.stdout
    assert text.stdout.count("source \\ target") == len(r["matrices"])

    # Without --matrices the report has no matrices.
    plain = json.loads(cli_here("report", "latest", "--json", cwd=ws).stdout)
    assert "matrices" not in plain and set(plain) == set(r) - {"matrices"}

    # A run without jobs.json (stopped before its matrices were done): its own child runs.
    real = report_module.read_json

    def no_jobs(run_id, artifact):
        if artifact == "jobs.json":
            raise FileNotFoundError(artifact)
        return real(run_id, artifact)

    monkeypatch.setattr(report_module, "read_json", no_jobs)
    fallback = json.loads(cli_here("report", "latest", "--matrices", "--json", cwd=ws).stdout)
    assert sorted(m["run_id"] for m in fallback["matrices"]) == sorted(m["run_id"] for m in r["matrices"])


def test_report_matrices_include_reused_matrices(shared_ws, cli_here):
    ws = shared_ws
    first = json.loads(cli_here("report", "latest", "--json", cwd=ws).stdout)["run_id"]
    run = cli_here(*RUN_TINY, "--plugin", "mean_norm", cwd=ws)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "matrix jobs computed 0, reused 3" in run.stdout
    r = _check(ws, cli_here, reused_from=first)
    assert r["run_id"] != first
    assert len(r["matrices"]) == 3 and {m["plugin"] for m in r["matrices"]} == {"mean_norm"}


@pytest.mark.parametrize("header, expected", [
    ("source\\target,layer1.0,layer2.1\nlayer1.0,1,2\n", ["layer1.0", "layer2.1"]),
    ("1,2\n3,4\n", None),
])
def test_layer_names_from_the_csv_header(header, expected):
    assert report_module._layer_names(header) == expected
