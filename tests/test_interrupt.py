"""Interrupted runs: SIGTERM ends a run as KILLED; after kill -9 the next identical run
marks the dead run KILLED and reuses every stitcher that was finished."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time

import mlflow
import numpy as np
import pytest

from .conftest import EXE

TINY_TLM = """
name: tiny-tlm
dataset: {name: digits}
networks:
  architecture: {name: resnet18, params: {width: 4}}
  count: 2
  training: {epochs: 2, batch_size: 128, lr: 0.003, augment: false}
stitching:
  layers: [0, 3, 7]
  params:
    tlm: {epochs: 3, batch_size: 128, dm: {k: 40}}
"""


def _start(ws, *args):
    env = dict(os.environ, STITCHBENCH_PROGRESS="off", STITCHBENCH_WORKSPACE=str(ws))
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([str(EXE), "run", "--config", "tiny.yaml", "--plugin", "tlm", *args], cwd=ws, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_cells(ws, n, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        cells = list((ws / "mlruns" / "cache").glob("*/cell_*.pt"))
        if len(cells) >= n:
            return cells
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {n} stitchers were done: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting for finished stitchers")


def _client(ws):
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}")


def _tlm_matrices(ws, parent_id=None):
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}")
    client = _client(ws)
    exp = client.get_experiment_by_name("tiny-tlm")
    runs = client.search_runs([exp.experiment_id], "tags.`stitchbench.kind` = 'stitch_matrix' and "
                              "attributes.status = 'FINISHED'")
    out = {}
    for r in runs:
        key = (r.data.tags["stitchbench.source"], r.data.tags["stitchbench.target"])
        path = mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path="matrix/values.npy")
        out[key] = (np.load(path), r.data.metrics.get("cells_resumed", 0.0))
    return out


def test_sigterm_marks_the_run_killed(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "tiny.yaml").write_text(textwrap.dedent(TINY_TLM))
    proc = _start(ws)
    _wait_for_cells(ws, 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    client = _client(ws)
    exp = client.get_experiment_by_name("tiny-tlm")
    runs = client.search_runs([exp.experiment_id])
    assert runs and all(r.info.status in ("KILLED", "FINISHED") for r in runs)
    parent = [r for r in runs if r.data.tags.get("stitchbench.kind") == "parent"]
    assert [p.info.status for p in parent] == ["KILLED"]
    assert any(r.data.tags.get("stitchbench.kind") == "stitch_matrix" and r.info.status == "KILLED" for r in runs)


# About 80 s through the installed command (TLM stitchers, three processes): in the slow set.
# The default run has the same guarantee from tests/test_reliability.py (kill -9 at three
# random moments, then a rerun equal to an uninterrupted run; SIGINT resuming stitchers).
@pytest.mark.slow
def test_kill_9_then_rerun_reuses_finished_stitchers_and_matches_an_uninterrupted_run(tmp_path):
    # The reference: the same config, never interrupted, in its own workspace.
    ref_ws = tmp_path / "ref"
    ref_ws.mkdir()
    (ref_ws / "tiny.yaml").write_text(textwrap.dedent(TINY_TLM))
    ref = _start(ref_ws)
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-2000:]

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "tiny.yaml").write_text(textwrap.dedent(TINY_TLM))
    proc = _start(ws)
    done_at_kill = _wait_for_cells(ws, 4, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    stamps = {p: p.stat().st_mtime_ns for p in (ws / "mlruns" / "cache").glob("*/cell_*.pt")}
    assert len(stamps) >= len(done_at_kill)

    rerun = _start(ws)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-2000:]
    assert "networks trained 0" in out
    client = _client(ws)
    exp = client.get_experiment_by_name("tiny-tlm")
    parents = sorted(client.search_runs([exp.experiment_id], "tags.`stitchbench.kind` = 'parent'"),
                     key=lambda r: r.info.start_time)
    assert [p.info.status for p in parents] == ["KILLED", "FINISHED"]
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")

    got = _tlm_matrices(ws)
    want = _tlm_matrices(ref_ws)
    assert set(got) == set(want) and len(got) == 3
    assert sum(resumed for _, resumed in got.values()) >= len(stamps)
    for key in want:
        np.testing.assert_allclose(got[key][0], want[key][0], atol=1e-9)
    # finished cells are cleaned up once their matrix is logged
    assert not list((ws / "mlruns" / "cache").glob("*/cell_*.pt"))
