"""The workspace's plugin registry, ``registry/plugins.toml``.

Each entry is a third-party plugin given by a file path or an importable module name::

    [[plugin]]
    name = "my_index"
    path = "/home/me/my_index.py"

    [[plugin]]
    name = "mylab_indices"
    module = "mylab.indices"
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..workspace import registry_file


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    path: str | None = None
    module: str | None = None

    @property
    def origin(self) -> str:
        return f"registered path {self.path}" if self.path else f"registered module {self.module}"


def read_entries(workspace: Path | None = None) -> list[RegistryEntry]:
    f = registry_file(workspace)
    if not f.exists():
        return []
    try:
        data = tomllib.loads(f.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{f} is not valid TOML ({e}); fix or delete it") from None
    entries = []
    for i, item in enumerate(data.get("plugin", [])):
        if not isinstance(item, dict) or "name" not in item or not (item.get("path") or item.get("module")):
            raise UsageError(f"{f}: entry {i + 1} needs `name` and one of `path` or `module`")
        entries.append(RegistryEntry(str(item["name"]), item.get("path"), item.get("module")))
    return entries


def write_entries(entries: list[RegistryEntry], workspace: Path | None = None) -> Path:
    import tomli_w

    f = registry_file(workspace)
    f.parent.mkdir(parents=True, exist_ok=True)
    items = [{k: v for k, v in (("name", e.name), ("path", e.path), ("module", e.module)) if v} for e in entries]
    header = "# Third-party stitchbench plugins of this workspace; edit with `stitchbench plugins register/unregister`.\n"
    f.write_text(header + tomli_w.dumps({"plugin": items}))
    return f


_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def entry_for(target: str) -> RegistryEntry:
    """Turn the argument of ``plugins register`` into an entry, checking that it exists."""
    p = Path(target).expanduser()
    looks_like_path = "/" in target or "\\" in target or target.endswith(".py") or p.exists()
    if looks_like_path:
        if not p.exists():
            raise UsageError(
                f"plugin path {target!r} does not exist; give the path of a .py file or a package "
                "directory, or an importable module name"
            )
        p = p.resolve()
        if p.is_dir() and not (p / "__init__.py").exists():
            raise UsageError(f"{p} is a directory without __init__.py; give a .py file or a package directory")
        if p.is_file() and p.suffix != ".py":
            raise UsageError(f"{p} is not a .py file; give a Python file, a package directory or a module name")
        return RegistryEntry(name=p.stem if p.is_file() else p.name, path=str(p))
    if not _MODULE_RE.match(target):
        raise UsageError(f"{target!r} is neither an existing path nor a module name")
    try:
        spec = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise UsageError(
            f"module {target!r} cannot be found in this Python environment; install it, or register a file path"
        )
    return RegistryEntry(name=target.rsplit(".", 1)[-1], module=target)
