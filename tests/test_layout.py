"""The shape of the code: the core's layers import one way, bundled plugins use only the
public API (exactly what a third-party plugin has), and listing plugins stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import stitchbench

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "stitchbench"
PLUGINS = REPO / "plugins"

#: The core's layers, lowest first. A module may import from its own layer and from the
#: layers below; packages that share a layer (``store`` and ``execution``) are independent
#: of each other. The top-level modules of the first layer are the foundation everything
#: uses; ``stitchbench/__init__.py`` is the public facade above all of them.
LAYERS: list[set[str]] = [
    {"errors", "workspace", "progress", "figures"},
    {"plugin"},
    {"nn"},
    {"store", "execution"},
    {"run"},
    {"testing"},
    {"cli"},
]


def _layer_of(part: str) -> int:
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    raise AssertionError(f"stitchbench.{part} is in no layer: add it to LAYERS in {Path(__file__).name}")


def _module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, module: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) of every import in ``path`` that runs: at any depth,
    inside functions too, but not under ``if TYPE_CHECKING:`` (annotations only).
    Relative imports are resolved against ``module``."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found: list[tuple[int, str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # from . import x: each x is a module
                    found.extend((node.lineno, f"{target}.{n}", []) for n in names)
                    return
                found.append((node.lineno, target, names))
            else:
                found.append((node.lineno, node.module or "", names))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def core_modules() -> list[tuple[Path, str]]:
    return [(p, _module_name(p, CORE, "stitchbench")) for p in sorted(CORE.rglob("*.py"))]


def test_every_core_module_is_in_a_layer():
    for path, module in core_modules():
        parts = module.split(".")
        if len(parts) > 1:
            _layer_of(parts[1])


def test_core_imports_go_down_the_layers_only():
    bad = []
    for path, module in core_modules():
        parts = module.split(".")
        if len(parts) == 1:
            continue  # the public facade re-exports from every layer
        here = parts[1]
        for line, target, _ in imports(path, module):
            tparts = target.split(".")
            if tparts[0] != "stitchbench":
                continue
            where = f"{path.relative_to(REPO)}:{line} imports {target}"
            if len(tparts) == 1:
                bad.append(f"{where} (the public facade; import the module that defines the name)")
                continue
            there = tparts[1]
            if there == here:
                continue
            lo, hi = _layer_of(there), _layer_of(here)
            if lo > hi:
                bad.append(f"{where} (a higher layer)")
            elif lo == hi and lo > 0:
                bad.append(f"{where} (stitchbench.{here} and stitchbench.{there} are independent)")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_the_layer_test_sees_a_violation(tmp_path):
    """The checker itself: an upward import inside a function is found, one under
    TYPE_CHECKING is not."""
    f = tmp_path / "mod.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..run.context import RunContext\n"
                 "def g():\n    from ..run import plan\n")
    found = imports(f, "stitchbench.nn.mod")
    assert [(t, n) for _, t, n in found] == [("typing", ["TYPE_CHECKING"]), ("stitchbench.run", ["plan"])]


def test_bundled_plugins_import_only_the_public_api():
    """What a bundled plugin imports from the core is what any plugin can: names of
    ``stitchbench`` itself that are in ``stitchbench.__all__``, never a submodule. Plugins
    of one kind may share private helpers (``datasets/_common.py``); a plugin never
    imports the code of a plugin of another kind."""
    public = set(stitchbench.__all__)
    bad = []
    for path in sorted(PLUGINS.rglob("*.py")):
        module = _module_name(path, PLUGINS, "stitchbench_plugins")
        kind = module.split(".")[:2]
        for line, target, names in imports(path, module):
            where = f"{path.relative_to(REPO)}:{line}"
            if target.startswith("stitchbench."):
                bad.append(f"{where} imports {target}, which is not public (use names of `stitchbench`)")
            elif target == "stitchbench":
                bad += [f"{where} imports stitchbench.{n}, which is not public" for n in names if n not in public]
            elif target.startswith("stitchbench_plugins") and target.split(".")[:2] != kind:
                bad.append(f"{where} imports {target}, the code of a plugin of another kind")
    assert not bad, "bundled plugins reach past the public API:\n" + "\n".join(bad)


def test_every_public_name_resolves():
    for name in stitchbench.__all__:
        assert getattr(stitchbench, name) is not None, name


@pytest.mark.parametrize("argv", [["plugins", "list", "--json"], ["--help"]])
def test_listing_plugins_imports_neither_torch_nor_mlflow(argv):
    code = (
        "import sys\n"
        "from stitchbench.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'mlflow', 'timm', 'torchvision') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
