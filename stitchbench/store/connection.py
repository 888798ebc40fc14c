"""The MLflow store of a workspace: connecting (safely, also from several processes at
once), experiments, and the runs that dead processes left RUNNING.

The default store is ``sqlite:///<workspace>/mlruns/mlflow.db`` with artifacts under
``<workspace>/mlruns/artifacts``; ``MLFLOW_TRACKING_URI`` wins when set. MLflow's telemetry
is off unless the user set ``MLFLOW_DISABLE_TELEMETRY`` themselves.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..workspace import mlruns_dir
from .tags import TAG_KIND

log = logging.getLogger(__name__)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # open as a model-training experiment in the UI


def quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # alembic prints every migration step at INFO when a store is created
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


def tracking_uri(workspace: Path) -> str:
    """``$MLFLOW_TRACKING_URI`` when the user set it, else the workspace's SQLite store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return local_store_uri(workspace)


def local_store_uri(workspace: Path) -> str:
    return f"sqlite:///{mlruns_dir(workspace) / 'mlflow.db'}"


def _point_mlflow_at(uri: str) -> None:
    """``mlflow.set_tracking_uri(uri)`` without its side effect on the environment.

    MLflow also exports the URI as ``MLFLOW_TRACKING_URI``; left there, it would read as the
    user's choice, and every later workspace in this process (a notebook, the tests) would
    silently write into the first one's store."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:///")


def connect(workspace: Path) -> Any:
    """Point MLflow at the workspace's store (creating it safely) and return a client.

    Store creation runs under a file lock, so several processes starting at once on a fresh
    workspace do not race on the schema migration, and is atomic, so a process killed while
    creating it leaves no half-made store behind. A remote store is checked for
    reachability before any heavy work."""
    quiet_mlflow()
    import mlflow

    uri = tracking_uri(workspace)
    _point_mlflow_at(uri)
    if is_local_store(uri):
        with store_lock(workspace):
            _create_store_atomically(uri)
            client = mlflow.MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)  # checks (or migrates) the schema
        return client
    client = mlflow.MlflowClient(tracking_uri=uri)
    # One quick try: MLflow's default retries with backoff take minutes on a dead server.
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    try:
        client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot use this store"
        raise UsageError(
            f"cannot reach the MLflow tracking server MLFLOW_TRACKING_URI={uri} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); start it, fix the URI, or unset MLFLOW_TRACKING_URI to use "
            "the local store in mlruns/"
        ) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return client


def experiment_id(client: Any, name: str, workspace: Path) -> str:
    """The id of experiment ``name``, created if needed, tagged to open as model training."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        uri = tracking_uri(workspace)
        location = (mlruns_dir(workspace) / "artifacts").as_uri() if is_local_store(uri) else None
        with store_lock(workspace) if is_local_store(uri) else _null():
            exp = client.get_experiment_by_name(name)
            if exp is None:
                client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
                exp = client.get_experiment_by_name(name)
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


@contextmanager
def _null() -> Iterator[None]:
    yield


STORE_LOCK_TIMEOUT_S = 300


@contextmanager
def store_lock(workspace: Path) -> Iterator[None]:
    """An exclusive lock on the workspace's local store (``mlruns/.store.lock``), held while
    the store or an experiment is created. An flock: the OS releases it when its holder
    dies, even by ``kill -9``."""
    from filelock import FileLock, Timeout

    d = mlruns_dir(workspace)
    d.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(d / ".store.lock"), timeout=STORE_LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout:
        raise UsageError(
            f"another process has held the lock on the MLflow store in {d} for {STORE_LOCK_TIMEOUT_S} s; "
            "is a stitchbench process stuck? (the lock file is mlruns/.store.lock)"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _create_store_atomically(uri: str) -> None:
    """Create a missing SQLite store in a temporary file beside it and move it into place.

    SQLite commits MLflow's schema creation statement by statement, so a process killed
    half-way through would leave a store that every later command refuses. Built aside and
    renamed, the store is either absent or complete. Call with the store lock held."""
    import mlflow

    db = Path(uri[len("sqlite:///"):].split("?", 1)[0])
    if db.name in ("", ":memory:") or db.exists():
        return
    partial = db.with_name(f"{db.name}.creating-{os.getpid()}")
    for stale in db.parent.glob(f"{db.name}.creating-*"):  # left by a killed creator
        stale.unlink(missing_ok=True)
    tmp_uri = f"sqlite:///{partial}"
    client = mlflow.MlflowClient(tracking_uri=tmp_uri)
    client.search_experiments(max_results=1)  # creates and migrates the schema
    _dispose_store(client)
    for suffix in ("-journal", "-wal", "-shm"):
        if Path(f"{partial}{suffix}").exists():  # pragma: no cover - only after a crash inside SQLite
            raise UsageError(f"creating the MLflow store {db} left {partial}{suffix}; remove both and retry")
    os.replace(partial, db)
    _fsync_dir(db.parent)


def _dispose_store(client: Any) -> None:
    """Close the connections a client's SQLAlchemy store holds (best effort)."""
    try:
        client._tracking_client.store.engine.dispose()
    except Exception as e:  # noqa: BLE001 - private MLflow attributes; the connections close at exit anyway
        log.debug("could not dispose of the store's connections: %s", e)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - not on every platform
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def this_process_tags() -> dict[str, str]:
    """Tags that let a later run tell whether this process is still alive."""
    import socket

    return {"stitchbench.host": socket.gethostname(), "stitchbench.pid": str(os.getpid())}


def process_alive(pid: int) -> bool:
    """True when process ``pid`` exists on this machine (also when it belongs to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def end_stale_runs(client: Any, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING parent runs (and their RUNNING nested runs) whose process,
    on this host, no longer exists: what a ``kill -9`` or a crash leaves behind."""
    import socket

    host = socket.gethostname()
    stale = []
    running = client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'parent' and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    for run in running:
        tags = run.data.tags
        pid = tags.get("stitchbench.pid")
        if tags.get("stitchbench.host") != host or not pid or not pid.isdigit() or process_alive(int(pid)):
            continue
        children = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and attributes.status = 'RUNNING'",
            max_results=10000,
        )
        for child in children:
            client.set_terminated(child.info.run_id, status="KILLED")
        client.set_terminated(run.info.run_id, status="KILLED")
        stale.append(run.info.run_id)
        log.warning("run %s was left RUNNING by a process that no longer exists; marked KILLED", run.info.run_id)
    return stale
