"""Run lifecycle: a parent run per ``stitchbench run`` and nested runs for its jobs, each
ending FINISHED, FAILED or KILLED (never left RUNNING by a process that ends normally or
by a signal it can catch; what ``kill -9`` leaves RUNNING, the next run marks KILLED).

A job's nested run is its unit of failure: whatever its code raises ends that run FAILED
and reaches the user as a `JobError` naming the job and the plugin (a `StorageError` when
the disk is full), while the jobs finished before it stay complete and reusable."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import JobError, StitchbenchError, StorageError
from .tags import TAG_PLUGIN

log = logging.getLogger(__name__)

# errno values that mean "the outputs cannot be written here", not "the code is wrong"
STORAGE_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG") if hasattr(errno, n))


def _status_for(exc: BaseException | None) -> str:
    if exc is None:
        return "FINISHED"
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return "KILLED"
    return "FAILED"


def is_storage_error(exc: BaseException) -> bool:
    """True for an OSError that says the disk cannot take the write (full, quota, read-only),
    also when MLflow or SQLite wrapped it ("database or disk is full")."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            return True
        if "database or disk is full" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _end(status: str) -> None:
    """End the active run; a store that cannot take the write (a full disk) leaves it
    RUNNING, which the next run marks KILLED once this process is gone."""
    import mlflow

    try:
        mlflow.end_run(status=status)
    except Exception as e:  # noqa: BLE001 - never hide the error that ended the run
        log.warning("could not mark the run %s: %s", status, e)


@contextmanager
def parent_run(experiment_id: str, *, params: dict[str, str], config_json: str, run_name: str | None,
               tags: dict[str, str]) -> Iterator[Any]:
    """The parent run of one ``stitchbench run``, with the resolved config as flat
    ``params`` and as ``config.json``; ends FINISHED, FAILED or KILLED with everything
    nested in it still active."""
    import mlflow

    # Nested runs take the active experiment, not their parent's: make it this one.
    mlflow.set_experiment(experiment_id=experiment_id)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
    try:
        items = [(k[:250], v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            mlflow.log_params(dict(items[start : start + 100]))
        mlflow.log_text(config_json, "config.json")
        yield run
    except BaseException as e:
        _end_all(_status_for(e))
        raise
    _end_all("FINISHED")


def _end_all(status: str) -> None:
    import mlflow

    while mlflow.active_run() is not None:  # end_run pops the run even when the write fails
        _end(status)


@contextmanager
def child_run(name: str, tags: dict[str, str]) -> Iterator[Any]:
    """A nested run for job ``name``. An exception inside ends it FAILED (KILLED for Ctrl-C
    or SIGTERM) and comes out as a `StitchbenchError` naming the job and its plugin (the
    ``stitchbench.plugin`` tag)."""
    import mlflow

    parent = mlflow.active_run()
    experiment_id = parent.info.experiment_id if parent is not None else None
    run = mlflow.start_run(run_name=name, nested=True, tags=tags, experiment_id=experiment_id)
    try:
        yield run
    except StitchbenchError:
        _end("FAILED")
        raise
    except Exception as e:
        _end("FAILED")
        if is_storage_error(e):
            raise StorageError(name, e) from e
        raise JobError(name, tags.get(TAG_PLUGIN), e) from e
    except BaseException:
        _end("KILLED")
        raise
    _end("FINISHED")
