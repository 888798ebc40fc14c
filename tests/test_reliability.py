"""Reliability (issue #8): concurrent runs on one fresh store, interruption (SIGINT, kill -9
at random moments), damaged artifacts, a full disk, diverging training, a raising plugin
hook, and what `stitchbench ui` binds to. docs/reliability.md names these tests.

Most runs here call `stitchbench.cli.main` in this process (a CLI start costs seconds).
Where a real process is the point, the CLI runs as a subprocess (concurrency), or as a child
forked from a forkserver that has imported torch and MLflow once (kill -9, racing store
creation): a real process, killed for real, without paying the imports each time.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
import pytest
import torch

import stitchbench.plugin.manager

# Under pytest-xdist this module goes to one process: its module fixtures (a trained workspace, a
# forkserver) are made once.
pytestmark = pytest.mark.xdist_group("reliability")

NET = "digits-resnet18-w4-seed0"
TINY = """
name: rel
dataset: {name: digits}
networks:
  architecture: {name: resnet18, params: {width: 4}}
  count: 1
  training: {epochs: 1, batch_size: 128, lr: 0.003, augment: false}
stitching:
  layers: [0, 7]
  params:
    dm: {k: 40}
"""
RUN = ["run", "--config", "tiny.yaml", "--plugin", "dm"]
CELLS = 4  # 2 x 2 stitchers in the one (intra) DM matrix


# -- helpers ------------------------------------------------------------------------------


def _new_workspace(path: Path, monkeypatch=None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "tiny.yaml").write_text(textwrap.dedent(TINY))
    if monkeypatch is not None:
        monkeypatch.chdir(path)
        monkeypatch.setenv("STITCHBENCH_WORKSPACE", str(path))
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        stitchbench.plugin.manager.clear_cache()
    return path


def _main(*args: str) -> int:
    from stitchbench.cli import main

    try:
        return main(list(args))
    except KeyboardInterrupt:  # must never reach pytest: it would end the whole session
        pytest.fail("a KeyboardInterrupt escaped stitchbench.cli.main")


def _client(ws: Path):
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}")


def _runs(ws: Path, kind: str | None = None, parent: str | None = None, experiment: str = "rel") -> list:
    client = _client(ws)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    filters = []
    if kind:
        filters.append(f"tags.`stitchbench.kind` = '{kind}'")
    if parent:
        filters.append(f"tags.`mlflow.parentRunId` = '{parent}'")
    runs = client.search_runs([exp.experiment_id], " and ".join(filters), max_results=1000)
    return sorted(runs, key=lambda r: r.info.start_time)


def _artifact(run, path: str) -> Path:
    return Path(unquote(urlparse(run.info.artifact_uri).path)) / path


def _matrix(run) -> np.ndarray:
    return np.load(_artifact(run, "matrix/values.npy"), allow_pickle=False)


def _done(run) -> bool:
    return run.info.status == "FINISHED" and run.data.tags.get("stitchbench.complete") == "1"


def _cells(ws: Path, key: str = "*") -> list[Path]:
    return sorted((ws / "mlruns" / "cache").glob(f"{key}/cell_*.pt"))


def _own(name: str, k: int) -> list[str]:
    """The run of a test sharing the `trained` workspace: its own experiment and its own
    DM matrix (another K, so another job key); the network is the shared one."""
    return [*RUN, "--set", f"name={name}", "--set", f"stitching.params.dm.k={k}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workspace whose network is trained and registered once, for the in-process tests."""
    ws = _new_workspace(tmp_path_factory.mktemp("trained"))
    with pytest.MonkeyPatch.context() as m:
        _new_workspace(ws, m)
        assert _main(*RUN, "--set", "name=setup", "--set", "stitching.layers=[0]") == 0
    return ws


def _plain_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _interrupt_dm_after(monkeypatch, n_fits: int, how: str) -> None:
    """Make the DM matcher's fit interrupt the run when it is called the (n_fits+1)-th time:
    by a real SIGINT to this process (``how="sigint"``) or by raising KeyboardInterrupt."""
    dm_cls = type(stitchbench.get_plugin("dm"))
    real_fit = dm_cls.fit
    calls = {"n": 0}

    def fit(self, problem, params):
        if calls["n"] == n_fits:
            if how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(30)  # the handler raises KeyboardInterrupt here
                pytest.fail("SIGINT was not delivered")
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_fit(self, problem, params)

    monkeypatch.setattr(dm_cls, "fit", fit)


# -- forked children (real processes that skip the interpreter start) ----------------------

PRELOAD = [
    "torch", "torch._dynamo", "torch.export", "sqlalchemy", "alembic", "mlflow", "mlflow.pytorch", "mlflow.pyfunc",
    "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store", "matplotlib.pyplot",
    "sklearn.datasets", "sklearn.model_selection", "stitchbench.cli", "stitchbench.run.pipeline", "stitchbench.store.connection",
    "stitchbench_plugins.datasets.digits", "stitchbench_plugins.architectures.resnet18",
    "stitchbench_plugins.matchers.dm", "stitchbench_plugins.evaluations.layer_identification",
]


@pytest.fixture(scope="module")
def forked():
    """``start(target, *args)``: run a function of this module in a new process, forked from a
    forkserver that imported torch, MLflow and stitchbench once."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)

    def start(target, *args):
        p = ctx.Process(target=target, args=args, daemon=True)
        p.start()
        return p

    start.ctx = ctx
    return start


def _child_setup(ws: str, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["STITCHBENCH_WORKSPACE"] = ws
    os.environ["STITCHBENCH_PROGRESS"] = "off"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(ws)


def _child_cli(ws: str, args: list[str], log: str, barrier=None, threads: int | None = None) -> None:
    """`stitchbench <args>` in workspace ``ws`` (after ``barrier``, if given)."""
    _child_setup(ws, log)
    from stitchbench.cli import main

    if threads:
        torch.set_num_threads(threads)
    if barrier is not None:
        barrier.wait(timeout=120)
    code = main(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _child_store(ws: str, barrier, log: str) -> None:
    """Open the workspace's store (creating it), its experiment, and log one run."""
    _child_setup(ws, log)
    if barrier is not None:
        barrier.wait(timeout=120)
    from stitchbench.store import connection as tracking

    client = tracking.connect(Path(ws))
    exp = tracking.experiment_id(client, "rel", Path(ws))
    run = client.create_run(exp, tags={"stitchbench.kind": "probe", "pid": str(os.getpid())})
    client.set_terminated(run.info.run_id, "FINISHED")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _log(path: Path) -> str:
    return path.read_text()[-3000:] if path.exists() else ""


# -- 1. concurrent runs -------------------------------------------------------------------


def test_concurrent_runs_on_a_fresh_workspace_all_finish(tmp_path, forked, monkeypatch, capsys):
    """Three `stitchbench run` processes released at the same instant in one fresh workspace
    all finish, each with its parent and nested runs. Each may train the network (one
    registry version per training, all with the job's key and the same weights); a later
    run trains nothing."""
    ws = _new_workspace(tmp_path / "ws")
    barrier = forked.ctx.Barrier(3)
    logs = [tmp_path / f"p{i}.log" for i in range(3)]
    procs = [forked(_child_cli, str(ws), RUN, str(log), barrier, 1) for log in logs]
    for p in procs:
        p.join(600)
    assert [p.exitcode for p in procs] == [0, 0, 0], "".join(_log(log) for log in logs)
    for log in logs:
        assert "finished" in _log(log) and "Traceback" not in _log(log)

    parents = _runs(ws, "parent")
    assert len(parents) == 3 and all(_done(r) for r in parents)
    assert {r.info.status for r in _runs(ws)} == {"FINISHED"}  # nothing FAILED, nothing left RUNNING
    for parent in parents:
        kinds = sorted(r.data.tags["stitchbench.kind"] for r in _runs(ws, parent=parent.info.run_id))
        # a run whose jobs another process finished first reuses them
        assert "evaluation" in kinds and set(kinds) <= {"evaluation", "network", "stitch_matrix"}
    matrices = [r for r in _runs(ws, "stitch_matrix") if _done(r)]
    assert matrices and all(np.array_equal(_matrix(m), _matrix(matrices[0])) for m in matrices)

    client = _client(ws)
    versions = client.search_model_versions(f"name = '{NET}'")
    print(f"{len(versions)} registry version(s) of {NET} after 3 concurrent runs")
    assert 1 <= len(versions) <= 3
    assert len({v.tags["stitchbench.job_key"] for v in versions}) == 1
    weights = [_plain_state(_artifact(client.get_run(v.run_id), "network/state_dict.pt")) for v in versions]
    for w in weights[1:]:
        assert all(torch.equal(w[k], weights[0][k]) for k in weights[0])

    _new_workspace(ws, monkeypatch)
    capsys.readouterr()
    assert _main(*RUN) == 0
    assert "networks trained 0, reused 1; matrix jobs computed 0, reused 1" in capsys.readouterr().out
    assert len(client.search_model_versions(f"name = '{NET}'")) == len(versions)


def test_processes_creating_one_store_at_the_same_moment(tmp_path, forked):
    """The failure measured in issue #8: four processes open a fresh SQLite store at the same
    instant (released together by a barrier). All succeed, into one experiment."""
    ws = tmp_path / "ws"
    ws.mkdir()
    barrier = forked.ctx.Barrier(4)
    procs = [forked(_child_store, str(ws), barrier, str(tmp_path / f"p{i}.log")) for i in range(4)]
    for p in procs:
        p.join(180)
    logs = "".join(_log(tmp_path / f"p{i}.log") for i in range(4))
    assert [p.exitcode for p in procs] == [0, 0, 0, 0], logs
    client = _client(ws)
    assert [e.name for e in client.search_experiments() if e.name == "rel"] == ["rel"]
    assert len(_runs(ws, "probe")) == 4


def test_kill_9_while_the_store_is_created_leaves_no_half_made_store(tmp_path, forked):
    """SQLite commits MLflow's schema creation statement by statement: a process killed in
    the middle must not leave a store that every later command refuses."""
    rng = random.Random(8)
    for attempt in range(3):
        ws = tmp_path / f"ws{attempt}"
        ws.mkdir()
        p = forked(_child_store, str(ws), None, str(tmp_path / f"create{attempt}.log"))
        deadline = time.time() + 120
        while time.time() < deadline and p.exitcode is None:
            if (ws / "mlruns").is_dir() and any(f.name.startswith("mlflow.db") for f in (ws / "mlruns").iterdir()):
                break
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.5))  # a random moment of the creation
        if p.exitcode is None:
            os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        again = forked(_child_store, str(ws), None, str(tmp_path / f"after{attempt}.log"))
        again.join(180)
        assert again.exitcode == 0, _log(tmp_path / f"after{attempt}.log")
        assert _runs(ws, "probe")[-1].info.status == "FINISHED"


# -- 2. interruption ----------------------------------------------------------------------


def test_sigint_marks_the_runs_killed_and_the_rerun_resumes(trained, monkeypatch, capsys):
    """Ctrl-C (a real SIGINT) in the middle of a stitching matrix: exit status 130, the
    parent and the matrix run KILLED, the finished stitchers kept; the same command then
    trains nothing and resumes those stitchers."""
    _new_workspace(trained, monkeypatch)
    args, exp = _own("rel-sigint", 41), "rel-sigint"
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # CI may start us with SIGINT ignored
    try:
        with monkeypatch.context() as m:
            _interrupt_dm_after(m, 2, "sigint")
            capsys.readouterr()
            code = _main(*args)
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert code == 130, err
    assert "interrupted; finished jobs are kept" in err and "Traceback" not in err
    (parent,) = _runs(trained, "parent", experiment=exp)
    assert parent.info.status == "KILLED"
    (matrix,) = _runs(trained, parent=parent.info.run_id, experiment=exp)
    assert matrix.data.tags["stitchbench.kind"] == "stitch_matrix" and matrix.info.status == "KILLED"
    assert "stitchbench.complete" not in matrix.data.tags
    key = matrix.data.tags["stitchbench.job_key"]
    assert len(_cells(trained, key)) == 2

    assert _main(*args) == 0
    assert "networks trained 0, reused 1" in capsys.readouterr().out
    parents = _runs(trained, "parent", experiment=exp)
    assert [p.info.status for p in parents] == ["KILLED", "FINISHED"]
    (matrix,) = _runs(trained, "stitch_matrix", parent=parents[1].info.run_id, experiment=exp)
    assert _done(matrix) and matrix.data.metrics["cells_resumed"] == 2
    assert not _cells(trained, key)  # the cell cache goes once the matrix is logged


# Moments of a run, in order, each seen on disk: the store exists; the parent run has
# started (its config.json); the network's weights are logged; a stitcher is cached; the
# matrix is logged. A kill lands at a random offset after a randomly drawn one of them.
PHASES = {
    "store": "mlflow.db",
    "parent": "artifacts/**/config.json",
    "network": "artifacts/**/network/state_dict.pt",
    "stitcher": "cache/*/cell_*.pt",
    "matrix": "artifacts/**/matrix/values.npy",
}


def _phase_files(ws: Path, phase: str) -> dict[Path, int]:
    return {f: f.stat().st_mtime_ns for f in (ws / "mlruns").glob(PHASES[phase])}


def _reached(ws: Path, phase: str, before: dict[Path, int]) -> bool:
    """Whether a file of ``phase`` was written since the snapshot ``before`` (a new file, or
    one written again): what the process started after the snapshot wrote, never what an
    earlier, killed process left behind (it may have reached later phases than its kill)."""
    return any(before.get(f) != t for f, t in _phase_files(ws, phase).items())


def test_kill_9_at_random_moments_then_a_rerun_equals_an_uninterrupted_run(trained, tmp_path, forked, monkeypatch):
    """A run killed with SIGKILL three times at seeded random moments, then run to the end:
    its matrix and network equal those of a run never interrupted (the reference: the same
    config, in-process, on the `trained` workspace), and no run is left RUNNING."""
    ws = _new_workspace(tmp_path / "ws")
    rng = random.Random(20250808)
    moments = sorted(rng.sample(list(PHASES), 3), key=list(PHASES).index)
    killed = []
    for k, phase in enumerate(moments):
        before = _phase_files(ws, phase)
        offset = rng.uniform(0.0, 0.5)
        p = forked(_child_cli, str(ws), RUN, str(tmp_path / f"killed{k}.log"), None, 1)
        deadline = time.time() + 300
        while p.exitcode is None and time.time() < deadline and not _reached(ws, phase, before):
            time.sleep(0.01)
        time.sleep(offset)
        if p.exitcode is None:
            os.kill(p.pid, signal.SIGKILL)
            killed.append(f"{phase}+{offset:.2f}s")
        p.join(60)
        assert p.exitcode in (-signal.SIGKILL, 0), _log(tmp_path / f"killed{k}.log")
    print(f"kill -9 moments: {killed}")
    assert len(killed) >= 2, f"the kills came too late to interrupt anything: {killed}"

    p = forked(_child_cli, str(ws), RUN, str(tmp_path / "rerun.log"), None, 1)
    p.join(600)
    assert p.exitcode == 0, _log(tmp_path / "rerun.log")
    assert not [r for r in _runs(ws) if r.info.status == "RUNNING"]
    parents = _runs(ws, "parent")
    assert _done(parents[-1]) and {r.info.status for r in parents[:-1]} <= {"KILLED", "FINISHED"}
    assert sum(r.info.status == "KILLED" for r in parents) >= len(killed) - 1  # (one kill may precede its parent)

    # The reference: the same command never interrupted, in a fresh workspace, with the same
    # torch thread count (float results depend on it; the suite's process may have changed its own).
    ref = _new_workspace(tmp_path / "reference")
    p = forked(_child_cli, str(ref), RUN, str(tmp_path / "reference.log"), None, 1)
    p.join(600)
    assert p.exitcode == 0, _log(tmp_path / "reference.log")
    got = [r for r in _runs(ws, "stitch_matrix") if _done(r)][-1]
    (want,) = [r for r in _runs(ref, "stitch_matrix") if _done(r)]
    np.testing.assert_allclose(_matrix(got), _matrix(want), rtol=0, atol=1e-9)
    got_net = [r for r in _runs(ws, "network") if _done(r)][-1]
    (want_net,) = [r for r in _runs(ref, "network") if _done(r)]
    a, b = (_plain_state(_artifact(r, "network/state_dict.pt")) for r in (got_net, want_net))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for v in _client(ws).search_model_versions(f"name = '{NET}'"):
        assert v.tags["stitchbench.job_key"] == got_net.data.tags["stitchbench.job_key"]


# -- damaged artifacts --------------------------------------------------------------------


class _Payload:
    """Unpickling this runs code (creates a file): what weights_only loading must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_damaged_cells_and_artifacts_are_recomputed_never_trusted(trained, monkeypatch, capsys, caplog):
    """Cached stitchers that are truncated, garbage or empty, and a truncated matrix artifact
    of a finished job, are detected and recomputed (to the same values); a stored network
    that holds pickled code never runs it."""
    _new_workspace(trained, monkeypatch)
    args, exp = _own("rel-damaged", 42), "rel-damaged"
    with monkeypatch.context() as m:
        _interrupt_dm_after(m, 3, "raise")
        assert _main(*args) == 130
    (killed,) = _runs(trained, "stitch_matrix", experiment=exp)
    cells = _cells(trained, killed.data.tags["stitchbench.job_key"])
    assert len(cells) == 3
    cells[0].write_bytes(cells[0].read_bytes()[: cells[0].stat().st_size // 2])  # truncated
    cells[1].write_bytes(os.urandom(cells[1].stat().st_size))  # garbage

    capsys.readouterr()
    assert _main(*args) == 0, capsys.readouterr().err
    second = _runs(trained, "parent", experiment=exp)[-1]
    (m2,) = _runs(trained, "stitch_matrix", parent=second.info.run_id, experiment=exp)
    assert _done(m2) and m2.data.metrics["cells_resumed"] == 1  # of 3 kept, the 2 damaged ones recomputed
    values = _matrix(m2)
    assert values.shape == (2, 2) and np.all(np.isfinite(values))

    # a finished job whose matrix artifact was cut short is recomputed, not reused
    npy = _artifact(m2, "matrix/values.npy")
    npy.write_bytes(npy.read_bytes()[:60])
    caplog.clear()
    assert _main(*args) == 0, capsys.readouterr().err
    third = _runs(trained, "parent", experiment=exp)[-1]
    (m3,) = _runs(trained, "stitch_matrix", parent=third.info.run_id, experiment=exp)
    assert _done(m3) and m3.data.metrics["cells_resumed"] == 0
    assert "no readable matrix" in caplog.text
    np.testing.assert_array_equal(_matrix(m3), values)

    # the stored network replaced by a pickle that runs code: loaded with weights_only, never run
    net = [r for r in _runs(trained, "network", experiment="setup") if _done(r)][-1]
    weights = _artifact(net, "network/state_dict.pt")
    original = weights.read_bytes()
    marker = trained / "pwned"
    try:
        torch.save({"conv.weight": _Payload(marker)}, weights)
        capsys.readouterr()
        code = _main(*args)
        out, err = capsys.readouterr()
    finally:
        weights.write_bytes(original)  # the other tests share this network
    assert not marker.exists()
    assert "Traceback" not in err
    # refused (never run), reported, and the network trained again
    assert code == 0, err
    assert "networks trained 1" in out


# -- 3. faults inside the pipeline --------------------------------------------------------


def test_a_full_disk_fails_the_job_cleanly_and_nothing_partial_is_reused(trained, monkeypatch, capsys):
    """ENOSPC while a stitcher is cached, then while the matrix's artifacts are written:
    each run ends FAILED with a message naming the job and the cause (exit status 1, no
    traceback), no half-written file is taken as done, and once there is space the same
    command finishes from what was complete."""
    _new_workspace(trained, monkeypatch)
    args, exp = _own("rel-disk", 43), "rel-disk"
    real_save = torch.save
    saves = {"n": 0}

    def save_until_full(obj, f, *a, **kw):
        if isinstance(f, (str, os.PathLike)) and "cache" in Path(f).parts:
            saves["n"] += 1
            if saves["n"] == 3:
                Path(f).write_bytes(b"PK\x03\x04" + bytes(64))  # what a full disk leaves: a stub
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **kw)

    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(torch, "save", save_until_full)
        assert _main(*args) == 1
    err = capsys.readouterr().err
    assert f"job dm [intra] {NET} could not write its outputs: No space left on device" in err
    assert "Traceback" not in err
    first = _runs(trained, "parent", experiment=exp)[-1]
    assert first.info.status == "FAILED"
    (m1,) = _runs(trained, parent=first.info.run_id, experiment=exp)
    assert m1.info.status == "FAILED" and "stitchbench.complete" not in m1.data.tags
    key = m1.data.tags["stitchbench.job_key"]
    assert len(_cells(trained, key)) == 2 and all(_plain_state(c) for c in _cells(trained, key))

    real_copy = shutil.copyfileobj

    def copy_until_full(src, dst, *a, **kw):
        if getattr(src, "name", "").endswith("stitchers.pt"):
            dst.write(src.read()[:1000])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_copy(src, dst, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(shutil, "copyfileobj", copy_until_full)
        assert _main(*args) == 1
    err = capsys.readouterr().err
    assert f"job dm [intra] {NET} could not write its outputs: No space left on device" in err
    second = _runs(trained, "parent", experiment=exp)[-1]
    assert second.info.status == "FAILED"
    (m2,) = _runs(trained, parent=second.info.run_id, experiment=exp)
    assert m2.info.status == "FAILED" and "stitchbench.complete" not in m2.data.tags
    assert not _artifact(m2, "matrix/stitchers.pt").exists()
    assert len(_cells(trained, key)) == CELLS

    assert _main(*args) == 0
    assert "networks trained 0, reused 1" in capsys.readouterr().out
    third = _runs(trained, "parent", experiment=exp)[-1]
    (m3,) = _runs(trained, "stitch_matrix", parent=third.info.run_id, experiment=exp)
    assert _done(m3) and m3.data.metrics["cells_resumed"] == CELLS
    stitchers = _plain_state(_artifact(m3, "matrix/stitchers.pt"))
    assert {k.split(".", 1)[0] for k in stitchers} == {f"{i}_{j}" for i in range(2) for j in range(2)}


def test_diverging_training_stops_the_run_with_a_clear_message(workspace, monkeypatch, capsys):
    _new_workspace(workspace, monkeypatch)
    code = _main(*RUN, "--set", "networks.training.optimizer=sgd", "--set", "networks.training.lr=1e6")
    err = capsys.readouterr().err
    assert code == 1
    assert f"train {NET}: the training loss became nan in epoch 1" in err and "networks.training.lr" in err
    assert "Traceback" not in err
    (parent,) = _runs(workspace, "parent")
    assert parent.info.status == "FAILED" and not parent.data.metrics
    kids = _runs(workspace, parent=parent.info.run_id)
    assert [(r.data.tags["stitchbench.kind"], r.info.status) for r in kids] == [("network", "FAILED")]
    assert not _client(workspace).search_registered_models()
    assert not _cells(workspace)


HOOK_RAISES = """
import stitchbench

@stitchbench.hookimpl
def register_similarity_indices(register):
    raise RuntimeError("cannot reach the licence server")
"""


def test_a_plugin_whose_registration_hook_raises_is_named(workspace, tmp_path, capsys):
    f = tmp_path / "licensed_index.py"
    f.write_text(HOOK_RAISES)
    (workspace / "registry").mkdir()
    (workspace / "registry" / "plugins.toml").write_text(f'[[plugin]]\nname = "licensed_index"\npath = "{f}"\n')
    assert _main("plugins", "list") == 0
    out, err = capsys.readouterr()
    assert "licensed_index" in err and "cannot reach the licence server" in err
    assert "lcka" in out  # the other plugins still load
    assert _main("run", "--plugin", "licensed_index", "--dry-run") == 2
    err = capsys.readouterr().err
    assert "licensed_index" in err and "RuntimeError: cannot reach the licence server" in err
    assert "Traceback" not in err


# -- 4. what is served --------------------------------------------------------------------


def test_ui_on_another_interface_warns_that_it_has_no_authentication(workspace, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, **kw: started.append(cmd) or 0)
    assert _main("ui", "--port", "5999") == 0
    assert "no authentication" not in capsys.readouterr().err
    assert _main("ui", "--host", "0.0.0.0", "--port", "5999") == 0
    assert "the MLflow UI has no authentication" in capsys.readouterr().err
    hosts = [cmd[cmd.index("--host") + 1] for cmd in started]
    assert hosts == ["127.0.0.1", "0.0.0.0"]
    # one server worker unless asked: MLflow's four take twice as long to start on two cores
    assert [cmd[cmd.index("--workers") + 1] for cmd in started] == ["1", "1"]
    assert _main("ui", "--workers", "3", "--port", "5999") == 0
    assert started[-1][started[-1].index("--workers") + 1] == "3"
    assert _main("ui", "--workers", "0") == 2 and "--workers 0" in capsys.readouterr().err


# -- the store a process writes to --------------------------------------------------------


def test_each_workspace_in_one_process_gets_its_own_store(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; stitchbench must not then
    take it for the user's choice and write a second workspace into the first one's store."""
    from stitchbench.store import connection as tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    tracking.connect(a)
    client = tracking.connect(b)
    assert (b / "mlruns" / "mlflow.db").exists()
    assert tracking.tracking_uri(b) == f"sqlite:///{b / 'mlruns' / 'mlflow.db'}"
    assert "MLFLOW_TRACKING_URI" not in os.environ
    tracking.experiment_id(client, "only-in-b", b)
    assert _client(b).get_experiment_by_name("only-in-b") is not None
    assert _client(a).get_experiment_by_name("only-in-b") is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")  # the user's choice wins
    assert tracking.tracking_uri(b) == "http://127.0.0.1:1"
