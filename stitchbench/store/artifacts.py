"""Writing and reading a run's artifacts: JSON tables, arrays (``.npy`` + ``.csv``),
figures, files and torch state dicts. Every function names the run it writes to or reads
from; nothing depends on MLflow's active run."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def client() -> Any:
    """An MLflow client of the store this process points at (`connection.connect`)."""
    import mlflow

    return mlflow.MlflowClient()


def to_json(obj: Any) -> str:
    """``obj`` as indented JSON; numpy scalars and arrays become numbers and lists."""
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default)


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def log_json(run_id: str, obj: Any, artifact_file: str) -> None:
    client().log_text(run_id, to_json(obj), artifact_file)


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    client().log_text(run_id, text, artifact_file)


def log_file(run_id: str, local_path: str | Path, artifact_dir: str | None = None) -> None:
    client().log_artifact(run_id, str(local_path), artifact_dir)


def log_figure(run_id: str, fig: Any, artifact_file: str) -> None:
    """Log a matplotlib figure as ``artifact_file`` (e.g. ``heatmap.png``) and close it."""
    import matplotlib.pyplot as plt

    try:
        client().log_figure(run_id, fig, artifact_file)
    finally:
        plt.close(fig)


def log_array(run_id: str, values: Any, stem: str, *, header: list[str] | None = None,
              index: list[str] | None = None) -> None:
    """Log ``values`` as ``<stem>.npy`` and ``<stem>.csv`` (a 2-D table; with column names
    ``header`` and row names ``index`` when given, e.g. target and source layers)."""
    import numpy as np

    folder = os.path.dirname(stem) or None
    with tempfile.TemporaryDirectory() as d:
        npy = Path(d) / (Path(stem).name + ".npy")
        np.save(npy, np.asarray(values))
        csv = Path(d) / (Path(stem).name + ".csv")
        with open(csv, "w") as f:
            if header is not None:
                f.write("source\\target," + ",".join(header) + "\n")
            for i, row in enumerate(np.atleast_2d(values)):
                lead = (index[i] + ",") if index is not None else ""
                f.write(lead + ",".join(f"{v:.10g}" for v in row) + "\n")
        log_file(run_id, npy, folder)
        log_file(run_id, csv, folder)


def log_state_dict(run_id: str, state: dict[str, Any], artifact_file: str) -> None:
    """Log a state dict of tensors (moved to the CPU) with ``torch.save``; read it back with
    `load_state_dict`, which runs no pickled code."""
    import torch

    folder = os.path.dirname(artifact_file) or None
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / Path(artifact_file).name
        torch.save({k: v.detach().cpu() if hasattr(v, "detach") else v for k, v in state.items()}, path)
        log_file(run_id, path, folder)


def download(run_id: str, artifact_path: str) -> Path:
    """A local path holding ``artifact_path`` of run ``run_id`` (a copy for remote stores)."""
    import mlflow

    dst = tempfile.mkdtemp(prefix="stitchbench-")
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=dst))


def read_json(run_id: str, artifact_path: str) -> Any:
    return json.loads(download(run_id, artifact_path).read_text())


def load_state_dict(run_id: str, artifact_path: str) -> dict[str, Any]:
    """A state dict logged by `log_state_dict`, read with ``weights_only=True``."""
    import torch

    return torch.load(download(run_id, artifact_path), map_location="cpu", weights_only=True)
