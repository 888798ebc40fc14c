"""``stitchbench clean``: delete a workspace's results, safely.

What goes: the local MLflow store (``mlruns/mlflow.db`` and SQLite's side files), its
artifacts (``mlruns/artifacts``: matrices, stitchers, networks, detectors) and the cell
cache of interrupted runs (``mlruns/cache``). What stays: ``registry/plugins.toml`` (the
workspace's plugins), ``mlruns/.gitkeep`` and anything else a user put there.

Safety: only the workspace's own local store is touched (never a server that
``MLFLOW_TRACKING_URI`` names); nothing outside ``mlruns/`` is deleted and links are
removed, not followed; a run of this workspace that is still running (its process alive
on this machine) stops the command unless ``--force``; the store lock is held while
deleting, so a run that starts meanwhile waits and then starts on an empty store.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sqlite3
from pathlib import Path

from ..errors import UsageError
from ..workspace import current_workspace, mlruns_dir

STORE_FILES = ("mlflow.db", "mlflow.db-journal", "mlflow.db-wal", "mlflow.db-shm")
STORE_DIRS = ("artifacts", "cache")


def cmd_clean(args: argparse.Namespace) -> int:
    from ..store.connection import local_store_uri, store_lock

    ws = current_workspace()
    root = mlruns_dir(ws)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and env != local_store_uri(ws):
        raise UsageError(f"MLFLOW_TRACKING_URI={env} points at another store; `stitchbench clean` deletes only this "
                         f"workspace's local store in {root}. Unset MLFLOW_TRACKING_URI to clean it, and delete "
                         "runs on a server with MLflow's own tools (the UI, or `mlflow gc`)")
    targets = _targets(root)
    if not targets:
        print(f"nothing to delete: {root} holds no results")
        return 0
    if not args.force:
        live = _live_runs(root / "mlflow.db")
        if live:
            raise UsageError(f"a run of this workspace is still running (process {', '.join(live)} on this machine); "
                             "wait for it or stop it, or pass --force")
    total = sum(_size(p) for p in targets)
    verb = "would delete" if args.dry_run else "deleting"
    for p in targets:
        print(f"{verb} {p.relative_to(ws)}{'/' if p.is_dir() and not p.is_symlink() else ''}  ({_human(_size(p))})")
    if args.dry_run:
        print(f"{_human(total)} in all; nothing deleted (--dry-run). Kept: registry/plugins.toml")
        return 0
    with store_lock(ws):
        for p in targets:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    print(f"deleted {_human(total)}; kept registry/ (this workspace's plugins). The next run starts from scratch.")
    return 0


def _targets(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [root / n for n in (*STORE_FILES, *STORE_DIRS) if (root / n).exists() or (root / n).is_symlink()]
    found += sorted(root.glob("mlflow.db.creating-*"))
    real = root.resolve()
    return [p for p in found if p.is_symlink() or p.resolve().is_relative_to(real)]


def _live_runs(db: Path) -> list[str]:
    """Process ids of RUNNING stitchbench runs in ``db`` whose process is alive here."""
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            rows = con.execute(
                "SELECT p.value, h.value FROM runs r "
                "JOIN tags p ON p.run_uuid = r.run_uuid AND p.key = 'stitchbench.pid' "
                "JOIN tags h ON h.run_uuid = r.run_uuid AND h.key = 'stitchbench.host' "
                "WHERE r.status = 'RUNNING'").fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return []  # not a store we can read: nothing we know to be running
    from ..store.connection import process_alive

    host = socket.gethostname()
    live = []
    for pid, run_host in rows:
        if run_host == host and str(pid).isdigit() and int(pid) != os.getpid() and process_alive(int(pid)):
            live.append(str(pid))
    return sorted(set(live))


def _size(p: Path) -> int:
    if p.is_symlink() or p.is_file():
        return p.lstat().st_size
    return sum(f.lstat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
