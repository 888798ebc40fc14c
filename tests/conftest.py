"""Shared fixtures: every test that touches a workspace gets a fresh temporary one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import stitchbench.plugins

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
    stitchbench.plugins.clear_cache()
    yield ws
    stitchbench.plugins.clear_cache()


def cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed ``stitchbench`` command as a user would."""
    full_env = dict(os.environ, STITCHBENCH_PROGRESS="off", PYTHONWARNINGS="ignore::DeprecationWarning")
    full_env.pop("MLFLOW_TRACKING_URI", None)
    if cwd is not None:
        full_env["STITCHBENCH_WORKSPACE"] = str(cwd)
    full_env.update(env or {})
    return subprocess.run([str(EXE), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False)


# A third-party similarity index, as a user would write it in a file and register by path
# (tests/test_run_e2e.py; tests/test_executors.py ships it to Ray workers).
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
