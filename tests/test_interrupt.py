"""Interrupted runs: SIGTERM ends a run as KILLED; after kill -9 the next identical run
marks the dead run KILLED and reuses every stitcher that was finished."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import mlflow
import numpy as np
import pytest

from .conftest import EXE, ONE_THREAD, RUN_TINY, copy_workspace

# TLM matrices of the shared tiny run's networks (reused), trained longer than there: a
# new job key, so the stitchers are fitted here, one cell at a time.
TLM = ("--plugin", "tlm", "--set", "name=tiny-tlm", "--set", "stitching.params.tlm.epochs=2",
       "--set", "stitching.params.tlm.batch_size=128", "--set", "stitching.layers=[0,7]")


def _start(ws, *args):
    env = dict(os.environ, STITCHBENCH_PROGRESS="off", STITCHBENCH_WORKSPACE=str(ws), **ONE_THREAD)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([str(EXE), *RUN_TINY, *TLM, *args], cwd=ws, env=env,
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


def test_sigterm_marks_the_run_killed(shared_ws):
    ws = shared_ws
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


# Three processes of the installed command (about 20 s): in the slow set. The default run has
# the same guarantee from tests/test_reliability.py (kill -9 at three random moments of
# `stitchbench run` in forked processes, then a rerun equal to an uninterrupted run).
@pytest.mark.slow
def test_kill_9_then_rerun_reuses_finished_stitchers_and_matches_an_uninterrupted_run(trained_workspace, tmp_path):
    """Through the installed command: kill -9 in the middle of the TLM matrices, then the
    same command again resumes from the finished stitchers and ends where a run never
    interrupted ends."""
    # The reference: the same command, never interrupted, in its own copy of the workspace,
    # running beside the one to be killed (one torch thread each: the same bits).
    ref_ws = copy_workspace(trained_workspace.path, tmp_path / "ref")
    ws = copy_workspace(trained_workspace.path, tmp_path / "ws")
    ref = _start(ref_ws)
    proc = _start(ws)
    done_at_kill = _wait_for_cells(ws, 4, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    stamps = {p: p.stat().st_mtime_ns for p in (ws / "mlruns" / "cache").glob("*/cell_*.pt")}
    assert len(stamps) >= len(done_at_kill)
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-2000:]

    rerun = _start(ws)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-2000:]
    assert "networks trained 0, reused 2" in out
    client = _client(ws)
    exp = client.get_experiment_by_name("tiny-tlm")
    parents = sorted(client.search_runs([exp.experiment_id], "tags.`stitchbench.kind` = 'parent'"),
                     key=lambda r: r.info.start_time)
    assert [p.info.status for p in parents] == ["KILLED", "FINISHED"]
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")

    got = _tlm_matrices(ws)
    want = _tlm_matrices(ref_ws)
    assert set(got) == set(want) and len(got) == 3 and all(v.shape == (2, 2) for v, _ in got.values())
    assert sum(resumed for _, resumed in got.values()) >= len(stamps)
    for key in want:
        np.testing.assert_allclose(got[key][0], want[key][0], atol=1e-9)
    # finished cells are cleaned up once their matrix is logged
    assert not list((ws / "mlruns" / "cache").glob("*/cell_*.pt"))
