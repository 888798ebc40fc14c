"""Exceptions with messages meant for users.

`UsageError` (exit status 2) is raised for anything the user can fix by changing the
command line, the configuration, the workspace or the data on disk. `PluginError` and
`JobError` name the plugin (and the job) whose code failed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class StitchbenchError(Exception):
    """Base class: the message is complete and is printed without a traceback."""

    exit_code = 1


class UsageError(StitchbenchError):
    """Bad input: a wrong name, a wrong config value, missing data. Exit status 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration that does not validate; the message lists `dotted.path: problem` lines."""


class PluginError(StitchbenchError):
    """A plugin misbehaved (failed to import, registered something invalid, raised)."""

    def __init__(self, plugin: str, message: str, *, usage: bool = False):
        super().__init__(f"plugin {plugin}: {message}")
        self.plugin = plugin
        if usage:
            self.exit_code = 2


class JobError(StitchbenchError):
    """A job of the run pipeline failed; names the job and the plugin whose code raised."""

    def __init__(self, job: str, plugin: str | None, cause: BaseException):
        where = f"job {job}" + (f" (plugin {plugin})" if plugin else "")
        what = str(cause) if isinstance(cause, PluginError) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"{where} failed: {what}")
        self.job = job
        self.plugin = plugin
        self.cause = cause


@contextmanager
def job_errors(job: str, plugin: str | None) -> Iterator[None]:
    """Within the block, an exception that is not a `StitchbenchError` comes out as a
    `JobError` naming ``job`` and ``plugin`` (the original is its ``cause``), and so does a
    `PluginError` (what a plugin returned was refused: the job says where); any other
    `StitchbenchError` passes unchanged (its message is already complete)."""
    try:
        yield
    except PluginError as e:
        if e.exit_code == 2:  # a usage error (a plugin that cannot be loaded or used): as it is
            raise
        raise JobError(job, plugin, e) from e
    except StitchbenchError:
        raise
    except Exception as e:
        raise JobError(job, plugin, e) from e


class DivergenceError(StitchbenchError):
    """Training produced a non-finite loss."""


class StorageError(StitchbenchError):
    """The outputs of a job could not be written: the disk (or quota) is full, or read-only.

    The job's run ends FAILED and is not marked complete, so nothing half-written is reused;
    the jobs finished before it are kept."""

    def __init__(self, job: str | None, cause: BaseException):
        what = f"job {job}" if job else "stitchbench"
        reason = getattr(cause, "strerror", None) or str(cause)
        where = getattr(cause, "filename", None)
        super().__init__(
            f"{what} could not write its outputs: {reason}" + (f" ({where})" if where else "") + "; nothing of "
            "it is marked done. Free some space and run the same command again: finished jobs are reused"
        )
        self.job = job
        self.cause = cause
