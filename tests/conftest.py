"""Shared fixtures.

Every test that touches a workspace gets one of its own. Most end-to-end tests share the
networks and matrices of one real run: the tiny config below, run once per test session
through the installed command (a fresh run, end to end). It starts in the background when
the session starts (once, also under pytest-xdist); `trained_workspace` waits for it (its
users run last), `rerun_workspace` is a copy in which the same command ran again, and
`shared_ws` hands each test a private copy, in which the networks are reused by key
instead of trained again. `cli` runs the installed command, `cli_here` the same command
line in this process, for tests whose point is not the process.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

import stitchbench.plugin.manager

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ["STITCHBENCH_PROGRESS"] = "off"

REPO = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).with_name("stitchbench")


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """An empty workspace as the current directory; the local MLflow store is used."""
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)
    monkeypatch.setenv("STITCHBENCH_WORKSPACE", str(ws))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    stitchbench.plugin.manager.clear_cache()
    yield ws
    stitchbench.plugin.manager.clear_cache()


def cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed ``stitchbench`` command as a user would."""
    full_env = dict(os.environ, STITCHBENCH_PROGRESS="off", PYTHONWARNINGS="ignore::DeprecationWarning")
    full_env.pop("MLFLOW_TRACKING_URI", None)
    if cwd is not None:
        full_env["STITCHBENCH_WORKSPACE"] = str(cwd)
    full_env.update(env or {})
    return subprocess.run([str(EXE), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def cli_here(monkeypatch, capsys):
    """The command line run in this process (no interpreter start, torch and MLflow already
    imported): ``cli_here(*args, cwd=ws)`` -> a CompletedProcess with the exit status and
    the captured output, as `cli` returns. For tests whose point is not the process."""
    from stitchbench.cli import main

    def call(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        monkeypatch.setenv("STITCHBENCH_WORKSPACE", str(cwd))
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        stitchbench.plugin.manager.clear_cache()
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)

    yield call
    stitchbench.plugin.manager.clear_cache()


def client_of(ws: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}")


# A third-party similarity index, as a user would write it in a file and register by path
# (the shared tiny run uses it; on Ray its code has to be shipped to the workers).
MEAN_NORM_PLUGIN = '''
import numpy as np
import stitchbench

class MeanNorm(stitchbench.SimilarityIndex):
    """Negative distance between mean activation norms (a third-party test plugin)."""
    name = "mean_norm"
    higher_is_more_similar = True

    def compute(self, A, B):
        a = np.linalg.norm(np.asarray(A, float).reshape(len(A), -1), axis=1).mean()
        b = np.linalg.norm(np.asarray(B, float).reshape(len(B), -1), axis=1).mean()
        return float(-abs(a - b))

@stitchbench.hookimpl
def register_similarity_indices(register):
    register(MeanNorm())
'''

#: Tiny detectors for the tiny run (the paper's are ResNet-18s trained for 100 + 20 epochs).
OOD_PARAMS = {
    "auxiliary": {"name": "noise", "params": {"n_train": 400, "n_test": 200}},
    "pretrain": {"epochs": 3, "batch_size": 128, "lr": 0.003},
    "finetune": {"epochs": 3, "batch_size": 128, "optimizer": "sgd", "lr": 0.03},
    "resnet": {"width": 4, "stages": 1, "blocks": 1, "upsample_to": None},
    "heatmaps": False,
}

#: The tiny config every shared end-to-end test uses: two width-4 ResNet-18s on digits,
#: three stitched layers, every bundled matcher, index and evaluation (and the registered
#: `mean_norm`), each sized to take seconds.
TINY = textwrap.dedent(f"""
    name: tiny
    dataset: {{name: digits}}
    networks:
      architecture: {{name: resnet18, params: {{width: 4}}}}
      count: 2
      training: {{epochs: 2, batch_size: 128, lr: 0.003, augment: false}}
    stitching:
      layers: [0, 3, 7]
      params:
        dm: {{k: 40}}
        tlm: {{epochs: 1, batch_size: 256}}
    indices: {{n_examples: 100, params: {{dm_struct: {{k: 40}}}}}}
    evaluations:
      params:
        energy_ood: {json.dumps(OOD_PARAMS)}
        ding_sensitivity: {{layers: [6, 7], ranks: [4, 2, 1], n_permutations: 100, probe: {{epochs: 2}}}}
        ding_specificity: {{n_permutations: 100, probe: {{epochs: 2}}}}
""")
#: One torch thread, as in each 1-CPU Ray task: CPU kernels then reduce in the same order,
#: so the local run and a Ray run give the same bits.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
RUN_TINY = ("run", "--config", "tiny.yaml")


def new_tiny_workspace(ws: Path) -> Path:
    """A fresh workspace holding tiny.yaml and mean_norm.py, the plugin registered."""
    ws.mkdir(parents=True, exist_ok=True)
    (ws / "tiny.yaml").write_text(TINY)
    (ws / "mean_norm.py").write_text(MEAN_NORM_PLUGIN)
    p = cli("plugins", "register", str(ws / "mean_norm.py"), cwd=ws)
    assert p.returncode == 0, p.stderr
    return ws


@dataclass
class FinishedRun:
    """A workspace and the ``stitchbench run`` that ran in it."""

    path: Path
    result: subprocess.CompletedProcess

    @property
    def run_id(self) -> str:
        return self.result.stdout.split("run ", 1)[1].split()[0]


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected what will not run
def pytest_collection_modifyitems(session, config, items):
    """Tests that use the shared trained workspace run last: the run that trains it starts
    in the background with the session (one torch thread, so it takes one core) while the
    other tests run."""
    shared = [item for item in items if "trained_workspace" in getattr(item, "fixturenames", ())]
    if shared or any("shared_run_waiter" in getattr(item, "fixturenames", ()) for item in items):
        config.stash[_SHARED_RUN_NEEDED] = True
    items[:] = [item for item in items if item not in shared] + shared


_SHARED_RUN_NEEDED = pytest.StashKey[bool]()


@pytest.fixture(scope="session", autouse=True)
def _shared_run(request, tmp_path_factory, worker_id):
    """The background `stitchbench run` of the tiny config (see `trained_workspace`): started
    once per test session, also when pytest-xdist runs the tests in several processes (the
    first to take the lock starts it; its result lands in files every process reads)."""
    if not request.config.stash.get(_SHARED_RUN_NEEDED, False):
        yield None
        return
    import threading

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent  # shared by the xdist workers of this session
    shared = root / "shared-run"
    with FileLock(str(root / "shared-run.lock")):
        starter = not shared.exists()
        if starter:
            shared.mkdir()
    waiter = None
    if starter:
        ws = new_tiny_workspace(shared / "ws")
        env = dict(os.environ, STITCHBENCH_PROGRESS="off", PYTHONWARNINGS="ignore::DeprecationWarning",
                   STITCHBENCH_WORKSPACE=str(ws), **ONE_THREAD)
        env.pop("MLFLOW_TRACKING_URI", None)
        proc = subprocess.Popen([str(EXE), *RUN_TINY], cwd=ws, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

        def wait() -> None:
            out, err = proc.communicate()
            tmp = shared / "result.json.tmp"
            tmp.write_text(json.dumps({"returncode": proc.returncode, "stdout": out, "stderr": err}))
            os.replace(tmp, shared / "result.json")  # whole or absent for the readers

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
    yield shared
    if waiter is not None:
        waiter.join()  # other processes may still be waiting for it


@pytest.fixture(scope="session")
def worker_id(request) -> str:
    """pytest-xdist's worker id (``gw0``, ...), or ``master`` without it."""
    return getattr(request.config, "workerinput", {}).get("workerid", "master")


@pytest.fixture(scope="session")
def shared_run_waiter(_shared_run):
    """A callable that waits for the shared tiny run and returns it as a `FinishedRun`: for
    a test that has work of its own to do first (it is not moved to the end of the session
    as the users of `trained_workspace` are)."""
    import time

    def wait() -> FinishedRun:
        result_file = _shared_run / "result.json"
        deadline = time.time() + 900
        while not result_file.exists():
            assert time.time() < deadline, "the shared tiny run did not finish in 15 minutes"
            time.sleep(0.2)
        result = json.loads(result_file.read_text())
        assert result["returncode"] == 0, result["stderr"][-4000:]
        return FinishedRun(_shared_run / "ws", subprocess.CompletedProcess(RUN_TINY, result["returncode"],
                                                                           result["stdout"], result["stderr"]))

    return wait


@pytest.fixture(scope="session")
def trained_workspace(shared_run_waiter) -> FinishedRun:
    """The tiny config run once, fresh, through the installed command (one torch thread).
    Read-only: tests that write take a `shared_ws` copy."""
    return shared_run_waiter()


@pytest.fixture(scope="session")
def rerun_workspace(trained_workspace, tmp_path_factory) -> FinishedRun:
    """A copy of the trained workspace in which the same command ran a second time (in this
    process, with one torch thread as the first run had)."""
    import contextlib
    import io

    import torch

    from stitchbench.cli import main

    ws = copy_workspace(trained_workspace.path, tmp_path_factory.mktemp("rerun") / "ws")
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as m, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        m.chdir(ws)
        m.setenv("STITCHBENCH_WORKSPACE", str(ws))
        m.delenv("MLFLOW_TRACKING_URI", raising=False)
        stitchbench.plugin.manager.clear_cache()
        torch.set_num_threads(1)
        try:
            code = main(list(RUN_TINY))
        finally:
            torch.set_num_threads(threads)
            stitchbench.plugin.manager.clear_cache()
    assert code == 0, err.getvalue()[-4000:]
    return FinishedRun(ws, subprocess.CompletedProcess(list(RUN_TINY), code, out.getvalue(), err.getvalue()))


@pytest.fixture
def shared_ws(trained_workspace, tmp_path) -> Path:
    """A private copy of the trained workspace: its networks and matrices are reused by key."""
    return copy_workspace(trained_workspace.path, tmp_path / "ws")


def copy_workspace(src: Path, dst: Path) -> Path:
    """Copy a workspace to ``dst``, its MLflow store pointed at the copy's own artifacts.

    The store records absolute paths (the experiment's artifact location, every run's
    artifact URI, registered model sources); they are rewritten, so the copy reads and
    writes only its own files. The registry entry of a plugin inside the workspace is
    rewritten too."""
    shutil.copytree(src, dst)
    old, new = str(src), str(dst)
    with sqlite3.connect(dst / "mlruns" / "mlflow.db") as db:
        for (table,) in db.execute("select name from sqlite_master where type = 'table'").fetchall():
            cols = [c[1] for c in db.execute(f"pragma table_info('{table}')") if "CHAR" in c[2].upper()
                    or "TEXT" in c[2].upper()]
            for col in cols:
                db.execute(f'update "{table}" set "{col}" = replace("{col}", ?, ?) where "{col}" like ?',
                           (old, new, f"%{old}%"))
    reg = dst / "registry" / "plugins.toml"
    if reg.exists():
        reg.write_text(reg.read_text().replace(old, new))
    return dst
