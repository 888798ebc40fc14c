"""The workspace: the directory a user runs in, holding ``mlruns/`` and ``registry/``."""

from __future__ import annotations

import os
from pathlib import Path

ENV_WORKSPACE = "STITCHBENCH_WORKSPACE"


def current_workspace() -> Path:
    """``$STITCHBENCH_WORKSPACE`` when set, else the current directory."""
    return Path(os.environ.get(ENV_WORKSPACE) or os.getcwd()).resolve()


def registry_file(workspace: Path | None = None) -> Path:
    return (workspace or current_workspace()) / "registry" / "plugins.toml"


def mlruns_dir(workspace: Path | None = None) -> Path:
    return (workspace or current_workspace()) / "mlruns"
