"""The MLflow store: created safely, and an unreachable server is reported before any work."""

from __future__ import annotations

import socket
import time

from stitchbench.cli import main
from stitchbench.store.connection import connect, experiment_id


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_unreachable_tracking_server_fails_fast_before_any_work(workspace, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    start = time.time()
    code = main(["run", "--set", "networks.count=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot reach the MLflow tracking server" in err and "unset MLFLOW_TRACKING_URI" in err
    assert time.time() - start < 90
    assert not (workspace / "mlruns").exists()


def test_local_store_and_experiment_kind(workspace):
    client = connect(workspace)
    assert (workspace / "mlruns" / "mlflow.db").exists()
    exp_id = experiment_id(client, "some-config", workspace)
    exp = client.get_experiment(exp_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.artifact_location == (workspace / "mlruns" / "artifacts").as_uri()
    assert experiment_id(client, "some-config", workspace) == exp_id
