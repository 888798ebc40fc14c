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
