"""The identity of a plugin's code, part of the key of every job the plugin computes.

A job's result is a function of its key, so the key must change when the plugin's code
does. The identity is:

* ``<distribution>==<version>`` for a plugin installed from a distribution in the usual
  (non-editable) way, bundled plugins included: a different release is different code;
* ``src:<hash>`` for code that can change in place: a plugin registered by path, a
  registered module that belongs to no installed distribution, and any plugin of an
  editable install (``pip install -e``, how the bundled plugins are developed). The hash
  covers the source of the module that defines the plugin's class, the plugin module,
  and every module of the same package they import (relative imports, and absolute ones
  of the same top-level package), followed to the end. The source is parsed and its
  syntax tree hashed without docstrings, so editing a comment, a docstring or the layout
  keeps the identity, and any change to what the code does changes it.

Code outside that closure (a helper package of your own installed separately) counts by
its distribution's version only if it is the plugin's own distribution; bump your
plugin's version, or pass ``stitchbench run --no-reuse NAME``, when only such code changed.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any


def normalised_source(source: str) -> str:
    """The syntax tree of ``source`` without docstrings, as text: equal for sources that
    differ only in comments, docstrings or formatting."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)


def code_identity(obj: Any, origin: str, plugin_module: Any = None) -> str:
    """The identity (see the module docstring) of registered object ``obj`` whose plugin
    (the module or object that registered it) is ``plugin_module`` and came from
    ``origin`` (`PluginInfo.origin`)."""
    modules = [sys.modules.get(type(obj).__module__)]
    if plugin_module is not None:
        modules.append(plugin_module if hasattr(plugin_module, "__file__") else sys.modules.get(
            type(plugin_module).__module__))
    files = [Path(m.__file__).resolve() for m in modules if m is not None and getattr(m, "__file__", None)]
    names = [m.__name__ for m in modules if m is not None and getattr(m, "__file__", None)]
    if not origin.startswith("registered path") and files and _installed(files[0]):
        release = _release(origin, names[0])
        if release:
            return release
    if not files:
        return f"module:{type(obj).__module__}.{type(obj).__qualname__}"
    return "src:" + source_digest(tuple(zip(names, files)))


def source_digest(modules: tuple[tuple[str, Path], ...]) -> str:
    """A hash of the normalised source of ``modules`` ((name, file) pairs) and of every
    module of their packages they import, transitively."""
    closure = _closure(modules)
    stamp = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in closure)
    return _digest(stamp)


@lru_cache(maxsize=256)
def _digest(stamp: tuple[tuple[str, int, int], ...]) -> str:
    # Keyed by the files' paths, modification times and sizes: a file edited since is
    # hashed again.
    h = hashlib.sha256()
    roots = {Path(p).parent for p, _, _ in stamp}
    base = min(roots, key=lambda r: len(r.parts))
    for path, _, _ in stamp:
        p = Path(path)
        rel = str(p.relative_to(base)) if p.is_relative_to(base) else p.name
        try:
            text = normalised_source(p.read_text())
        except (SyntaxError, UnicodeDecodeError, OSError):
            text = p.read_bytes().hex() if p.exists() else ""
        h.update(json.dumps([rel, text]).encode())
    return h.hexdigest()[:16]


def _closure(modules: tuple[tuple[str, Path], ...]) -> list[Path]:
    seen: dict[Path, str] = {}
    todo = list(modules)
    while todo:
        name, path = todo.pop()
        if path in seen or not path.is_file() or path.suffix != ".py":
            continue
        seen[path] = name
        todo.extend(_local_imports(name, path))
    return sorted(seen)


def _local_imports(module: str, path: Path) -> list[tuple[str, Path]]:
    """(name, file) of the modules of ``module``'s own top-level package that ``path``
    imports (anywhere in the file, functions included)."""
    try:
        tree = ast.parse(path.read_text())
    except (SyntaxError, UnicodeDecodeError, OSError):
        return []
    is_package = path.name == "__init__.py"
    parts = module.split(".")
    package_parts = parts if is_package else parts[:-1]
    package_dir = path.parent
    top = parts[0]
    # the directory of the top-level package (None for a single-file module)
    top_dir: Path | None = package_dir
    for _ in range(len(package_parts) - 1):
        top_dir = top_dir.parent
    if not package_parts:
        top_dir = None
    found: list[tuple[str, Path]] = []

    def resolve(base_parts: list[str], base_dir: Path, rest: list[str]) -> None:
        target = base_dir.joinpath(*rest)
        for candidate in (target.with_suffix(".py") if rest else None, target / "__init__.py"):
            if candidate is not None and candidate.is_file():
                found.append((".".join(base_parts + rest), candidate))
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            up = node.level - 1
            if up > len(package_parts) - 1 and package_parts:
                continue
            base_parts = package_parts[: len(package_parts) - up] if package_parts else []
            base_dir = package_dir
            for _ in range(up):
                base_dir = base_dir.parent
            rest = node.module.split(".") if node.module else []
            resolve(base_parts, base_dir, rest)
            if not node.module:
                for alias in node.names:
                    resolve(base_parts, base_dir, [alias.name])
        elif top_dir is not None and isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for full in names:
                pieces = full.split(".")
                if pieces[0] == top:
                    resolve([top], top_dir, pieces[1:])
                    if isinstance(node, ast.ImportFrom):
                        for alias in node.names:
                            resolve([top], top_dir, [*pieces[1:], alias.name])
    return found


def _installed(path: Path) -> bool:
    """True for a file inside an installation directory (site-packages): code that changes
    only with its distribution's version. Editable installs and paths point elsewhere."""
    import sysconfig

    dirs = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    dirs |= {Path(p).resolve() for p in sys.path if p.endswith(("site-packages", "dist-packages"))}
    return any(path.is_relative_to(d) for d in dirs)


def _release(origin: str, module: str) -> str | None:
    """``name==version`` of the distribution a plugin came from, or None if unknown."""
    if origin == "bundled":
        return f"stitchbench=={importlib.metadata.version('stitchbench')}"
    if origin.startswith("entry point "):
        parts = origin.split()
        if len(parts) >= 4:
            return f"{parts[2]}=={parts[3]}"
    names = _distributions_of(module.split(".")[0])
    if names:
        return f"{names[0]}=={importlib.metadata.version(names[0])}"
    return None


@lru_cache(maxsize=64)
def _distributions_of(top: str) -> tuple[str, ...]:
    # slow (reads every installed distribution's file list): only for registered modules
    return tuple(importlib.metadata.packages_distributions().get(top) or ())
