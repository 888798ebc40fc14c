"""``stitchbench plugins new KIND NAME [--dir DIR]``: write a plugin package to start from.

The package is a complete, working plugin of the kind (not a stub): a pyproject whose
entry point registers it, the plugin module with a small real implementation, a test that
runs `stitchbench.testing.check_plugin` and checks what the plugin computes, and a README.
``cd DIR && pip install -e . && pytest`` passes as written; the user then edits the
module. Light at import time (no torch, no MLflow), as the rest of the command line.

The files' text lives in ``templates/`` (package data, read with `importlib.resources`):
the shared ``pyproject.toml.tmpl`` and ``README.md.tmpl``, and per kind a folder with
``plugin.py.tmpl`` (the package's ``__init__.py``), ``test.py.tmpl`` and, for
architectures, ``network.py.tmpl``. `template_files` says which a kind uses and where each
goes; ``<<placeholder>>``s are filled by `render`.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from importlib import resources
from pathlib import Path

from ..errors import StitchbenchError, UsageError

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

#: Per kind: the suffix of the class name, the hook, a one-line summary for the README.
_KIND = {
    "dataset": ("Dataset", "register_datasets", "synthetic stripe images, the class their orientation"),
    "architecture": ("Architecture", "register_architectures", "a small CNN with four stitchable conv blocks"),
    "matcher": ("Matcher", "register_matchers", "a least-squares affine stitching map"),
    "similarity_index": ("Index", "register_similarity_indices", "linear CKA"),
    "evaluation": ("Evaluation", "register_evaluations", "the mean diagonal of every similarity matrix"),
}


def new_plugin(args: argparse.Namespace) -> int:
    """Write the package for ``args.kind`` / ``args.name`` into ``args.dir`` (default
    ``./stitchbench-<name>``); print what was written and what to do next. Exit status 0;
    a bad name or a non-empty target directory is a `UsageError` (exit status 2)."""
    kind, name = args.kind, args.name
    if kind not in _KIND:
        raise UsageError(f"unknown plugin kind {kind!r}; the kinds are {', '.join(_KIND)}")
    _check_name(name)
    dist = "stitchbench-" + name.replace("_", "-")
    target = Path(args.dir).expanduser() if getattr(args, "dir", None) else Path.cwd() / dist
    if not target.is_absolute():
        target = Path.cwd() / target
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} exists and is not a directory; choose another with --dir")
    if target.is_dir() and any(target.iterdir()):
        raise UsageError(f"{target} exists and is not empty; choose another directory with --dir "
                         "(or remove it)")
    files = render(kind, name)
    for rel, text in files.items():
        path = target / rel
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8", newline="\n")
        except OSError as e:
            raise UsageError(f"cannot write {path}: {e.strerror or e}") from e
    print(f"wrote the {kind} plugin {name!r} (distribution {dist}) in {target}:")
    for rel in files:
        print(f"  {rel}")
    print("\nnext steps:")
    print(f"  cd {target} && pip install -e . && pytest")
    print(f"  stitchbench plugins list --kind {kind}    # lists {name}")
    print(f"then edit stitchbench_{name}/__init__.py (the class {class_name(kind, name)}).")
    return 0


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise UsageError(f"invalid plugin name {name!r}: use letters, digits and _, starting with a "
                         "letter (it names the package stitchbench_<name> too)")
    module = f"stitchbench_{name}"
    if importlib.util.find_spec(module) is not None:
        raise UsageError(f"a module called {module} is already importable here; choose another name")
    try:
        from ..plugin.manager import load_plugins

        known = load_plugins().infos.get(name)
    except StitchbenchError:  # a broken plugin set: the clash check is a courtesy, not a must
        known = None
    if known is not None:
        raise UsageError(f"a plugin called {name!r} already exists ({known.kind}, {known.origin}); "
                         "plugin names are unique across kinds: choose another")


def class_name(kind: str, name: str) -> str:
    """``my_index`` (similarity_index) -> ``MyIndex``; the kind's suffix is added unless
    the name already ends with it (``blobs`` (dataset) -> ``BlobsDataset``)."""
    camel = "".join(part[:1].upper() + part[1:] for part in name.split("_") if part)
    suffix = _KIND[kind][0]
    return camel if camel.endswith(suffix) else camel + suffix


def template_files(kind: str) -> dict[str, str]:
    """The templates a ``kind`` plugin is written from (path under ``templates/``, with
    ``/``) -> the file each becomes (relative path, placeholders unfilled), in writing order."""
    files = {
        "pyproject.toml.tmpl": "pyproject.toml",
        "README.md.tmpl": "README.md",
        f"{kind}/plugin.py.tmpl": "<<pkg>>/__init__.py",
        f"{kind}/test.py.tmpl": "tests/test_<<name>>.py",
    }
    if kind == "architecture":
        files["architecture/network.py.tmpl"] = "<<pkg>>/_network.py"
    return files


def read_template(rel: str) -> str:
    """The text of ``templates/<rel>`` (``rel`` with ``/``), from the installed package."""
    path = resources.files(__package__).joinpath("templates")
    for part in rel.split("/"):
        path = path.joinpath(part)
    return path.read_text(encoding="utf-8")


def render(kind: str, name: str) -> dict[str, str]:
    """The package's files (relative path -> text) for a ``kind`` plugin called ``name``."""
    subs = {
        "<<name>>": name,
        "<<pkg>>": f"stitchbench_{name}",
        "<<dist>>": "stitchbench-" + name.replace("_", "-"),
        "<<Class>>": class_name(kind, name),
        "<<Net>>": class_name(kind, name).removesuffix("Architecture") + "Net",
        "<<kind>>": kind,
        "<<hook>>": _KIND[kind][1],
        "<<summary>>": _KIND[kind][2],
    }
    return {_fill(out, subs): _fill(read_template(tmpl), subs) for tmpl, out in template_files(kind).items()}


def _fill(text: str, subs: dict[str, str]) -> str:
    for key, value in subs.items():
        text = text.replace(key, value)
    return text
