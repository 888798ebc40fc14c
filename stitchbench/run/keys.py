"""Job keys: a hash of a job's resolved configuration, its inputs' keys and, where it is
given, the identity of the code that computes it.

A job's result is a function of its key, so a finished job found under a key is reused
(`stitchbench.store.jobs`). Everything that changes the result belongs in the key: the
settings, the keys of the jobs it reads (a network's key, not its name), and the code
(`code_version`)."""

from __future__ import annotations

import hashlib
import inspect
import json
import textwrap
from typing import Any

from ..plugin.identity import normalised_source

#: Bump when a change to the core would change what a finished job contains.
CORE_JOB_VERSION = 1


def job_key(kind: str, **parts: Any) -> str:
    """A 20-hex-digit hash of ``kind`` and ``parts`` (JSON-able values; others by ``str``).

    Equal for equal arguments in any process, on any machine."""
    payload = {"job": kind, "v": CORE_JOB_VERSION, **parts}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def code_version(*objects: Any) -> str:
    """A hash of the code of ``objects`` (classes, functions or modules), for job keys.

    The source is parsed and its syntax tree hashed without docstrings, so editing a
    comment, a docstring or the formatting keeps the version, while any change to what the
    code does changes it. Objects whose source cannot be read (built-ins, code from a
    compiled extension) count by their qualified name and, for installed packages, the
    package version; any other value (a version number) by its ``repr``."""
    h = hashlib.sha256()
    for obj in objects:
        h.update(_code_identity(obj).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _code_identity(obj: Any) -> str:
    if not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)):
        return repr(obj)
    name = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', repr(obj)))}"
    try:
        source = textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError):
        return f"{name}@{_package_version(obj)}"
    return f"{name}:{normalised_source(source)}"


def _package_version(obj: Any) -> str:
    from importlib import metadata

    top = (getattr(obj, "__module__", None) or getattr(obj, "__name__", "") or "").split(".")[0]
    try:
        return metadata.version(top)
    except (metadata.PackageNotFoundError, ValueError):
        return "?"
