"""Loading, validating and looking up plugins.

Plugins come from the entry-point group ``stitchbench`` (the bundled ones too) and from the
workspace's ``registry/plugins.toml``. Each plugin's registration hooks are called
separately with a ``register`` callback, so every registered object is recorded with the
plugin it came from. What is validated, with errors that name the plugin:

* the type of each registered object (it must be an instance of the kind's base class);
* its name (non-empty, unique across all kinds: a clash names both plugins);
* hook names (a misspelt hook fails at load, as pluggy's ``check_pending`` does).

A plugin whose module fails to import (or whose hook raises) is skipped with a warning;
a run that needs it fails naming the plugin and the cause.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import logging
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from ..errors import PluginError, UsageError
from ..workspace import current_workspace
from . import hookspecs
from .registration import RegistryEntry, read_entries
from .types import BASE_CLASSES, HOOK_OF_KIND, KINDS, Plugin

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "stitchbench"
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class PluginInfo:
    """One registered object: its ``name``, ``kind``, ``origin`` (``bundled``,
    ``entry point <dist> <version>`` or ``registered path|module ...``), a one-line
    ``description``, the ``plugin`` (module) that registered it and where its code lives."""

    name: str
    kind: str
    origin: str
    description: str
    plugin: str = ""
    location: str = ""

    def as_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "kind": self.kind,
            "origin": self.origin,
            "description": self.description,
            "plugin": self.plugin,
            "location": self.location,
        }


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that could not be loaded, and why."""

    plugin: str
    origin: str
    error: str


@dataclass
class PluginSet:
    """Everything loaded for one workspace."""

    infos: dict[str, PluginInfo] = field(default_factory=dict)
    objects: dict[str, Plugin] = field(default_factory=dict)
    broken: list[BrokenPlugin] = field(default_factory=list)
    #: plugin name -> the module (or object) that registered it
    modules: dict[str, Any] = field(default_factory=dict)
    _identities: dict[str, str] = field(default_factory=dict, repr=False)

    def code_identity(self, name: str) -> str:
        """The identity of the code of registered object ``name`` (see
        `stitchbench.plugin.identity`): part of the key of every job it computes."""
        if name not in self._identities:
            from .identity import code_identity

            info = self.infos[name]
            self._identities[name] = code_identity(self.objects[name], info.origin, self.modules.get(info.plugin))
        return self._identities[name]

    def names(self, kind: str) -> list[str]:
        return [n for n, i in self.infos.items() if i.kind == kind]

    def get(self, name: str, kind: str | None = None) -> Plugin:
        """The registered object called ``name`` (of ``kind`` if given), or a UsageError
        that lists the known names and any broken plugin that might have provided it."""
        info = self.infos.get(name)
        if info is not None and (kind is None or info.kind == kind):
            return self.objects[name]
        what = kind.replace("_", " ") if kind else "plugin"
        if info is not None:
            msg = f"{name!r} is a {info.kind.replace('_', ' ')}, not a {what}"
        else:
            msg = f"unknown {what} {name!r}"
        known = self.names(kind) if kind else sorted(self.infos)
        msg += f"; known {what}s: {', '.join(sorted(known)) or '(none)'}"
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
        for b in self.broken:
            if b.plugin == name or name in b.plugin:
                msg += f". Plugin {b.plugin} ({b.origin}) failed to load: {b.error}"
        if self.broken and "failed to load" not in msg:
            msg += ". Plugins that failed to load: " + ", ".join(f"{b.plugin} ({b.error})" for b in self.broken)
        raise UsageError(msg)


_CACHE: dict[Path, PluginSet] = {}


def clear_cache() -> None:
    _CACHE.clear()


def load_plugins(workspace: Path | None = None, *, refresh: bool = False) -> PluginSet:
    """Load (once per workspace, cached) every plugin: entry points, then the registry."""
    ws = (workspace or current_workspace()).resolve()
    if not refresh and ws in _CACHE:
        return _CACHE[ws]
    loader = _Loader()
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        loader.add_entry_point(ep)
    for entry in read_entries(ws):
        loader.add_registry_entry(entry)
    result = loader.finish()
    _CACHE[ws] = result
    return result


def load_single(entry: RegistryEntry) -> list[PluginInfo]:
    """Load one registry entry on its own (used by ``plugins register`` to check it first).

    Raises PluginError (usage) when it fails to import or registers nothing."""
    loader = _Loader()
    loader.add_registry_entry(entry)
    result = loader.finish()
    if result.broken:
        b = result.broken[0]
        raise PluginError(b.plugin, f"cannot be loaded ({b.origin}): {b.error}", usage=True)
    if not result.infos:
        raise PluginError(
            entry.name,
            "registers nothing: implement one of "
            + ", ".join(HOOK_OF_KIND.values())
            + " with @stitchbench.hookimpl",
            usage=True,
        )
    return list(result.infos.values())


class _Loader:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("stitchbench")
        self.pm.add_hookspecs(hookspecs)
        self.origins: dict[str, tuple[str, str]] = {}  # plugin name -> (origin, location)
        self.broken: list[BrokenPlugin] = []

    # -- collecting modules -------------------------------------------------------------
    def add_entry_point(self, ep: importlib.metadata.EntryPoint) -> None:
        dist = getattr(ep, "dist", None)
        dist_name = dist.name if dist is not None else "?"
        if dist_name.replace("_", "-").lower() == "stitchbench":
            origin = "bundled"
        else:
            origin = f"entry point {dist_name} {dist.version if dist is not None else ''}".strip()
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
            self._broken(ep.name, origin, e)
            return
        self._register(ep.name, obj, origin)

    def add_registry_entry(self, entry: RegistryEntry) -> None:
        try:
            if entry.path:
                obj = _import_path(Path(entry.path), entry.name)
            else:
                obj = importlib.import_module(str(entry.module))
        except Exception as e:  # noqa: BLE001
            self._broken(entry.name, entry.origin, e)
            return
        self._register(entry.name, obj, entry.origin)

    def _broken(self, name: str, origin: str, e: BaseException) -> None:
        err = f"{type(e).__name__}: {e}"
        self.broken.append(BrokenPlugin(name, origin, err))
        warnings.warn(f"stitchbench plugin {name} ({origin}) failed to load and is skipped: {err}", stacklevel=3)

    def _register(self, name: str, obj: Any, origin: str) -> None:
        if name in self.origins and _overrides(origin, self.origins[name][0]):
            prev = self.origins[name][0]
            warnings.warn(f"plugin {name}: the workspace's registration ({origin}) is used instead of the installed "
                          f"plugin of the same name ({prev}); `stitchbench plugins unregister {name}` to use the "
                          "installed one", stacklevel=3)
            self.pm.unregister(name=name)
            del self.origins[name]
        if name in self.origins:
            prev = self.origins[name][0]
            raise PluginError(
                name,
                f"two plugins are called {name!r} ({prev}, and {origin}); unregister one of them",
                usage=True,
            )
        if isinstance(obj, type):
            raise PluginError(
                name,
                f"{origin} names the class {obj.__name__}; plugins are modules or instances. "
                "Have you forgotten the `()`?",
                usage=True,
            )
        self._check_hook_names(name, obj, origin)
        try:
            self.pm.register(obj, name=name)
        except pluggy.PluginValidationError as e:
            raise PluginError(name, f"({origin}) {e}", usage=True) from None
        location = getattr(obj, "__file__", None) or getattr(type(obj), "__module__", "")
        self.origins[name] = (origin, str(location or ""))

    def _check_hook_names(self, name: str, obj: Any, origin: str) -> None:
        known = list(HOOK_OF_KIND.values())
        for attr in dir(obj):
            fn = getattr(obj, attr, None)
            if fn is None or not hasattr(fn, "stitchbench_impl"):
                continue
            if attr not in known:
                close = difflib.get_close_matches(attr, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else f"; the hooks are {', '.join(known)}"
                raise PluginError(name, f"({origin}) implements unknown hook {attr!r}{hint}", usage=True)

    # -- calling the registration hooks -------------------------------------------------
    def finish(self) -> PluginSet:
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as e:  # pragma: no cover - caught by _check_hook_names first
            raise PluginError(getattr(e, "plugin", "?"), str(e), usage=True) from None
        result = PluginSet(broken=self.broken)
        failed: set[str] = set()
        for kind in KINDS:
            hook = getattr(self.pm.hook, HOOK_OF_KIND[kind])
            for impl in hook.get_hookimpls():  # registration order
                plugin_name = impl.plugin_name
                if plugin_name in failed:
                    continue
                origin, _location = self.origins.get(plugin_name, ("?", ""))
                staged: list[PluginInfo] = []

                def register(obj: Any, *, _kind=kind, _plugin=plugin_name, _origin=origin, _staged=staged) -> None:
                    _validate(obj, _kind, _plugin, _origin)
                    _staged.append(
                        PluginInfo(
                            name=obj.name,
                            kind=_kind,
                            origin=_origin,
                            description=obj.describe(),
                            plugin=_plugin,
                            location=_code_location(obj),
                        )
                    )
                    result.objects.setdefault(f"\0{_plugin}\0{obj.name}", obj)

                try:
                    impl.function(register=register)
                except PluginError:
                    raise
                except Exception as e:  # noqa: BLE001
                    failed.add(plugin_name)
                    self._broken(plugin_name, origin, e)
                    continue
                for info in staged:
                    other = result.infos.get(info.name)
                    if other is not None and _overrides(info.origin, other.origin):
                        warnings.warn(
                            f"{info.kind.replace('_', ' ')} {info.name!r}: the one of plugin {info.plugin} "
                            f"({info.origin}) is used instead of the one of plugin {other.plugin} ({other.origin}): "
                            "a workspace's registration wins over an installed plugin", stacklevel=2)
                        del result.infos[info.name]
                    elif other is not None and _overrides(other.origin, info.origin):
                        warnings.warn(
                            f"{info.kind.replace('_', ' ')} {info.name!r}: the one of plugin {other.plugin} "
                            f"({other.origin}) is used instead of the one of plugin {info.plugin} ({info.origin}): "
                            "a workspace's registration wins over an installed plugin", stacklevel=2)
                        result.objects.pop(f"\0{info.plugin}\0{info.name}", None)
                        continue
                    if info.name in result.infos:
                        other = result.infos[info.name]
                        raise PluginError(
                            info.plugin,
                            f"registers the name {info.name!r} (a {info.kind}), which plugin {other.plugin} "
                            f"({other.origin}) already registers (a {other.kind}); names are unique across "
                            f"kinds: rename one, or `stitchbench plugins unregister` one of them",
                            usage=True,
                        )
                    result.infos[info.name] = info
                    result.objects[info.name] = result.objects.pop(f"\0{info.plugin}\0{info.name}")
        result.broken = self.broken
        result.modules = {name: self.pm.get_plugin(name) for name in self.origins}
        for k in [k for k in result.objects if k.startswith("\0")]:
            del result.objects[k]
        return result


def _overrides(origin: str, other: str) -> bool:
    """True when a plugin from ``origin`` replaces one of the same name from ``other``: a
    workspace's registration (path or module) wins over an installed (entry-point or
    bundled) plugin, so installing a package never breaks a workspace that registered its
    code by path first."""
    return origin.startswith("registered") and not other.startswith("registered")


def _validate(obj: Any, kind: str, plugin: str, origin: str) -> None:
    base = BASE_CLASSES[kind]
    hook = HOOK_OF_KIND[kind]
    if isinstance(obj, type):
        raise PluginError(
            plugin,
            f"({origin}) {hook} registered the class {obj.__name__} instead of an instance. "
            f"Have you forgotten the `()`: register({obj.__name__}())?",
            usage=True,
        )
    if not isinstance(obj, base):
        actual = getattr(obj, "kind", None)
        hint = f" (it is a {actual}: register it through {HOOK_OF_KIND[actual]})" if actual in HOOK_OF_KIND else ""
        raise PluginError(
            plugin,
            f"({origin}) {hook} registered {obj!r} of type {type(obj).__name__}; expected an instance of "
            f"stitchbench.{base.__name__}{hint}",
            usage=True,
        )
    name = getattr(obj, "name", "")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PluginError(
            plugin,
            f"({origin}) registered a {type(obj).__name__} with the invalid name {name!r}; set the class "
            "attribute `name` to letters, digits, '_' or '-', starting with a letter",
            usage=True,
        )
    if kind == "similarity_index" and not isinstance(getattr(obj, "higher_is_more_similar", None), bool):
        raise PluginError(plugin, f"({origin}) index {name!r}: higher_is_more_similar must be a bool", usage=True)


def _code_location(obj: Any) -> str:
    mod = sys.modules.get(type(obj).__module__)
    return str(getattr(mod, "__file__", "") or type(obj).__module__)


def _import_path(path: Path, name: str) -> ModuleType:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (registered in registry/plugins.toml)")
    modname = f"stitchbench_registered.{re.sub(r'[^A-Za-z0-9_]', '_', name)}"
    stamp = _source_stamp(path)
    if modname in sys.modules:
        if getattr(sys.modules[modname], "__stitchbench_stamp__", None) == stamp:
            return sys.modules[modname]
        # edited since this process imported it: import the new code (and its submodules)
        for m in [m for m in sys.modules if m == modname or m.startswith(modname + ".")]:
            del sys.modules[m]
    if path.is_dir():
        spec = importlib.util.spec_from_file_location(
            modname, path / "__init__.py", submodule_search_locations=[str(path)]
        )
    else:
        spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(modname, None)
        raise
    module.__stitchbench_stamp__ = stamp
    return module


def _source_stamp(path: Path) -> tuple[tuple[str, int, int], ...]:
    """Modification times and sizes of a path plugin's source files."""
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)


def list_plugins(kind: str | None = None, workspace: Path | None = None) -> list[PluginInfo]:
    """Every registered plugin object (of ``kind`` if given), sorted by kind then name."""
    if kind is not None and kind not in KINDS:
        raise UsageError(f"unknown plugin kind {kind!r}; the kinds are {', '.join(KINDS)}")
    infos = load_plugins(workspace).infos.values()
    return sorted((i for i in infos if kind is None or i.kind == kind), key=lambda i: (KINDS.index(i.kind), i.name))


def get_plugin(name: str, kind: str | None = None, workspace: Path | None = None) -> Any:
    """The registered object called ``name``; UsageError listing the known names if none."""
    return load_plugins(workspace).get(name, kind)
