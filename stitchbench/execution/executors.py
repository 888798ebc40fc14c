"""Executors: where the jobs of a run compute.

The pipeline hands an executor *tasks*: a module-level function and its arguments, which
are plain data (plan pieces, state dicts, tensors) or the futures of earlier tasks. The
executor runs them and returns their results; it never touches MLflow. Two executors:

``local`` (the default)
    Runs each task in this process, lazily: a task runs when the driver asks for its
    result, so tasks run one at a time in the order the driver consumes them (exactly the
    order of a plain loop), may take callbacks (live progress metrics) and share this
    process's in-memory caches.
``ray``
    Runs each task as a Ray task with a resource request (CPUs, a GPU fraction) on a Ray
    cluster: a local one started for the run (``ray.init(num_cpus=...)``) or a running one
    (``ray_address``, e.g. ``auto``). A task that takes the future of another task waits
    for it inside Ray, so dependencies between jobs need no barrier in the driver.

``import ray`` happens only inside `RayExecutor`: Ray is the optional extra ``[ray]``.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Self

from ..errors import StitchbenchError, UsageError

log = logging.getLogger(__name__)

RAY_INSTALL_HINT = 'pip install -e ".[ray]"'
#: The Ray release the ``[ray]`` extra pins (and the Ray test is run against).
RAY_VERSION = "2.60.0"


@dataclass(frozen=True)
class Resources:
    """What one task asks the cluster for: ``cpus`` logical CPUs (also its torch thread
    count, floored, at least 1) and ``gpus`` GPUs (a fraction shares a GPU)."""

    cpus: float = 1.0
    gpus: float = 0.0

    @property
    def threads(self) -> int:
        return max(1, math.floor(self.cpus))


class Future(ABC):
    """The result of a submitted task, named by ``label`` (the job it computes)."""

    label: str

    @abstractmethod
    def result(self) -> Any:
        """The task's return value; raises what the task raised."""


class Executor(ABC):
    """Runs tasks; see the module docstring.

    ``in_process``: tasks run in the driver's process (they may take callbacks and share
    its in-memory caches). ``shares_disk``: tasks see the driver's file system, so a job may
    keep resumable per-cell results under the workspace.
    """

    name: str = ""
    in_process: bool = False
    shares_disk: bool = False

    @abstractmethod
    def share(self, key: str, value: Any) -> Any:
        """A handle to a large read-only input (a data set, a state dict) that many tasks
        take: stored once, not once per task. Pass the handle as a task argument; the task
        function receives ``value``. ``key`` identifies the value (a job key)."""

    @abstractmethod
    def submit(self, fn: Callable[..., Any], *args: Any, label: str, resources: Resources | None = None) -> Future:
        """Run ``fn(*args)``, where futures and shared handles among ``args`` are replaced
        by their values. ``fn`` must be a module-level function (it is pickled by name)."""

    @abstractmethod
    def as_completed(self, futures: Iterable[Future]) -> Iterator[Future]:
        """Yield each of ``futures`` once, as its result becomes available."""

    def slots(self) -> int:
        """How many tasks can run at once (the pipeline splits big jobs to fill them)."""
        return 1

    def close(self) -> None:
        """Release what the executor holds (a Ray connection, its workers)."""

    def describe(self) -> str:
        return self.name

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- local --------------------------------------------------------------------------------


class LocalFuture(Future):
    """A task that runs, once, in this process when its result is first asked for."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], label: str):
        self.label = label
        self._fn: Callable[..., Any] | None = fn
        self._args = args
        self._value: Any = None

    def result(self) -> Any:
        if self._fn is not None:
            fn, self._fn = self._fn, None
            args = tuple(a.result() if isinstance(a, Future) else a for a in self._args)
            self._args = ()
            self._value = fn(*args)
        return self._value


class LocalExecutor(Executor):
    """Every task in this process, one at a time, in the order the driver consumes them."""

    name = "local"
    in_process = True
    shares_disk = True

    def share(self, key: str, value: Any) -> Any:
        return value

    def submit(self, fn: Callable[..., Any], *args: Any, label: str, resources: Resources | None = None) -> Future:
        return LocalFuture(fn, args, label)

    def as_completed(self, futures: Iterable[Future]) -> Iterator[Future]:
        # In submission order: the driver's loop then reads exactly like a sequential one.
        yield from futures


# -- ray ----------------------------------------------------------------------------------


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def require_ray() -> None:
    """UsageError (exit 2) when Ray is not installed."""
    if not ray_available():
        raise UsageError(
            f"the ray executor needs Ray, which is not installed here: {RAY_INSTALL_HINT} "
            f'(or pip install "ray=={RAY_VERSION}"), or run with --executor local'
        )


class _Shared:
    """A value in the Ray object store, fetched at most once per worker process.

    The reference sits inside a list so that Ray does not resolve it itself (it would
    deserialise the value for every task)."""

    def __init__(self, key: str, ref: Any):
        self.key = key
        self.refs = [ref]


#: Per worker process: shared values already fetched, by key.
_WORKER_SHARED: dict[str, Any] = {}


class _RemoteError(StitchbenchError):
    """A StitchbenchError raised in a Ray worker, carried back as its class, message and
    simple attributes (the originals' constructors take other arguments than their message,
    so they do not survive pickling themselves)."""

    def __init__(self, module: str, qualname: str, message: str, attrs: dict[str, Any]):
        super().__init__(message)
        self.origin = (module, qualname, message, attrs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_RemoteError, self.origin)

    def rebuild(self) -> StitchbenchError:
        """The original error class with the original message (when it can be imported)."""
        module, qualname, message, attrs = self.origin
        try:
            cls: Any = sys.modules.get(module) or importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
            err = cls.__new__(cls)
            Exception.__init__(err, message)
            err.__dict__.update(attrs)
            return err
        except Exception:  # noqa: BLE001 - fall back to a plain error with the same text
            err = StitchbenchError(message)
            err.exit_code = attrs.get("exit_code", 1)
            return err


def _run_task(fn: Callable[..., Any], threads: int, *args: Any) -> Any:
    """The body of every Ray task, in a worker: resolve shared handles, use the task's CPU
    share for torch's threads, run ``fn``."""
    import ray
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    resolved = []
    for a in args:
        if isinstance(a, _Shared):
            if a.key not in _WORKER_SHARED:
                _WORKER_SHARED[a.key] = ray.get(a.refs[0])
            a = _WORKER_SHARED[a.key]
        resolved.append(a)
    try:
        return fn(*resolved)
    except StitchbenchError as e:
        simple = {k: v for k, v in vars(e).items() if isinstance(v, (str, int, float, bool, type(None)))}
        simple["exit_code"] = e.exit_code
        raise _RemoteError(type(e).__module__, type(e).__qualname__, str(e), simple) from None


class RayFuture(Future):
    def __init__(self, ref: Any, label: str):
        self.ref = ref
        self.label = label

    def result(self) -> Any:
        import ray

        try:
            return ray.get(self.ref)
        except ray.exceptions.RayTaskError as e:
            # The worker's traceback, for `stitchbench -v`; the error itself says what failed.
            log.info("%s failed in a Ray worker:\n%s", self.label, e)
            cause = getattr(e, "cause", None)
            if isinstance(cause, _RemoteError):
                raise cause.rebuild() from None
            if isinstance(cause, BaseException):
                raise cause from None
            raise


class RayExecutor(Executor):
    """Tasks on a Ray cluster; see the module docstring.

    ``address`` None starts a local cluster of ``num_cpus`` CPUs (default: this machine's)
    for the run and stops it at the end; otherwise connects to a running cluster (``auto``,
    ``ray://host:10001``, ``host:6379``). The local cluster listens on 127.0.0.1 only and
    starts no dashboard; Ray's usage statistics are off unless the user turned them on."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, resources: Resources | None = None):
        require_ray()
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if address is None:
            # Token authentication is what Ray gives a new local cluster anyway; saying so
            # explicitly only keeps Ray from printing a notice about it on every run.
            os.environ.setdefault("RAY_AUTH_MODE", "token")
        import ray
        import ray.cloudpickle

        self.address = address
        self.resources = resources or Resources()
        self.shares_disk = address is None
        self._owns_connection = not ray.is_initialized()
        if self._owns_connection:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "configure_logging": False}
            if address is None:
                kwargs.update(num_cpus=num_cpus or os.cpu_count() or 1, _node_ip_address="127.0.0.1")
            try:
                ray.init(address=address, **kwargs)
            except Exception as e:  # noqa: BLE001 - a cluster that cannot be reached or started
                where = f"the Ray cluster at {address!r}" if address else "a local Ray cluster"
                raise UsageError(f"cannot connect to {where} ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:300] if str(e) else ''})") from None
        # Plugins registered by path live in modules no worker can import: ship their code.
        for modname, module in list(sys.modules.items()):
            if modname.startswith("stitchbench_registered.") and module is not None:
                ray.cloudpickle.register_pickle_by_value(module)
        self._remote = ray.remote(_run_task)
        self._shared: dict[str, _Shared] = {}
        log.info("ray executor: %s", self.describe())

    def describe(self) -> str:
        import ray

        cpus = ray.cluster_resources().get("CPU", 0)
        gpus = ray.cluster_resources().get("GPU", 0)
        where = f"cluster at {self.address}" if self.address else "local cluster"
        return (f"ray ({where}: {cpus:g} CPUs, {gpus:g} GPUs; per task {self.resources.cpus:g} CPU, "
                f"{self.resources.gpus:g} GPU)")

    def slots(self) -> int:
        import ray

        have = ray.cluster_resources()
        n = have.get("CPU", 1) / self.resources.cpus
        if self.resources.gpus:
            n = min(n, have.get("GPU", 0) / self.resources.gpus)
        return max(1, math.floor(n))

    def share(self, key: str, value: Any) -> Any:
        import ray

        if key not in self._shared:
            self._shared[key] = _Shared(key, ray.put(value))
        return self._shared[key]

    def submit(self, fn: Callable[..., Any], *args: Any, label: str, resources: Resources | None = None) -> Future:
        r = resources or self.resources
        # A future among the arguments is passed as its object reference: Ray starts the
        # task once that result exists and hands the task the value.
        refs = [a.ref if isinstance(a, RayFuture) else a for a in args]
        task = self._remote.options(num_cpus=r.cpus, num_gpus=r.gpus, name=label[:100], max_retries=0)
        return RayFuture(task.remote(fn, r.threads, *refs), label)

    def as_completed(self, futures: Iterable[Future]) -> Iterator[Future]:
        import ray

        pending = {f.ref: f for f in futures if isinstance(f, RayFuture)}
        while pending:
            # A short timeout keeps Ctrl-C and SIGTERM responsive while tasks run.
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                yield pending.pop(ref)

    def close(self) -> None:
        import ray

        if self._owns_connection and ray.is_initialized():
            ray.shutdown()


# -- choosing one -------------------------------------------------------------------------


def make_executor(cfg: Any, device_type: str = "cpu") -> Executor:
    """The executor an `ExecutorConfig` asks for; ``device_type`` is the run's resolved
    device (``cpu`` or ``cuda``): with ``cuda``, Ray tasks ask for a GPU by default."""
    if cfg.name == "local":
        return LocalExecutor()
    if cfg.name == "ray":
        gpus = cfg.gpus_per_task
        if gpus is None:
            gpus = 1.0 if device_type == "cuda" else 0.0
        if device_type == "cuda" and gpus == 0:
            raise UsageError("executor.gpus_per_task is 0 but the device is cuda: Ray hides GPUs from tasks that "
                             "ask for none; set executor.gpus_per_task (e.g. 0.5 to share a GPU) or --device cpu")
        return RayExecutor(cfg.ray_address, cfg.num_cpus, Resources(cfg.cpus_per_task, gpus))
    raise UsageError(f"unknown executor {cfg.name!r}; executors are local, ray")
