"""``stitchbench plugins new KIND NAME``: the package it writes installs, registers its
plugin through its entry point and passes its own tests, for every kind.

The generated packages are installed into a throwaway virtual environment (never into the
project's: the other tests would see the extra entry points). It has no pip and nothing
installed of its own; a ``.pth`` file makes the project environment's packages (stitchbench,
torch, pytest, setuptools) importable in it, and the project's pip installs into it offline
(``--python``, ``--no-index``, ``--no-build-isolation``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

KINDS = ("dataset", "architecture", "matcher", "similarity_index", "evaluation")
#: One plugin name per kind (names are unique across kinds and with the bundled ones).
NAMES = {kind: f"scaffolded_{kind}" for kind in KINDS}
REPO = Path(__file__).resolve().parents[1]


def new(cli_here, cwd: Path, kind: str, name: str, *extra: str):
    return cli_here("plugins", "new", kind, name, *extra, cwd=cwd)


def test_writes_a_package_with_an_entry_point_for_the_plugin(cli_here, workspace):
    p = new(cli_here, workspace, "similarity_index", "my_index")
    assert p.returncode == 0, p.stderr
    root = workspace / "stitchbench-my-index"  # the default directory, under the current one
    files = sorted(str(f.relative_to(root)) for f in root.rglob("*") if f.is_file())
    assert files == ["README.md", "pyproject.toml", "stitchbench_my_index/__init__.py", "tests/test_my_index.py"]
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "stitchbench-my-index"
    assert meta["project"]["version"] == "0.1.0"
    assert meta["project"]["dependencies"] == ["stitchbench"]
    assert meta["project"]["entry-points"]["stitchbench"] == {"my_index": "stitchbench_my_index"}
    assert meta["tool"]["setuptools"]["packages"] == ["stitchbench_my_index"]
    assert meta["build-system"]["build-backend"] == "setuptools.build_meta"
    module = (root / "stitchbench_my_index" / "__init__.py").read_text()
    assert 'name = "my_index"' in module and "class MyIndex(stitchbench.SimilarityIndex)" in module
    assert "def register_similarity_indices(register)" in module
    assert str(root) in p.stdout and "pip install -e ." in p.stdout


def test_dir_option_and_an_existing_empty_directory(cli_here, workspace):
    (workspace / "empty").mkdir()
    p = new(cli_here, workspace, "architecture", "small_cnn", "--dir", "empty")
    assert p.returncode == 0, p.stderr
    assert (workspace / "empty" / "stitchbench_small_cnn" / "_network.py").is_file()
    assert not (workspace / "stitchbench-small-cnn").exists()


@pytest.mark.parametrize("name", ["1abc", "my-plugin", "has space", "_private", "dm", "plugins"])
def test_invalid_or_taken_name_is_a_usage_error(cli_here, workspace, name):
    p = new(cli_here, workspace, "matcher", name)
    assert p.returncode == 2
    assert "stitchbench: error:" in p.stderr and "Traceback" not in p.stderr
    assert list(workspace.iterdir()) == []  # nothing written


def test_non_empty_directory_is_a_usage_error(cli_here, workspace):
    target = workspace / "stitchbench-mine"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    p = new(cli_here, workspace, "dataset", "mine")
    assert p.returncode == 2
    assert "not empty" in p.stderr
    assert [f.name for f in target.iterdir()] == ["keep.txt"]
    p = new(cli_here, workspace, "dataset", "mine", "--dir", str(target / "keep.txt"))
    assert p.returncode == 2


def test_scaffold_module_is_light():
    code = ("import json, sys; import stitchbench.cli.scaffold; "
            "print(json.dumps([m for m in ('torch', 'mlflow') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_every_template_file_is_used_and_every_used_one_exists():
    from stitchbench.cli.scaffold import template_files

    root = REPO / "stitchbench" / "cli" / "templates"
    on_disk = {f.relative_to(root).as_posix() for f in root.rglob("*") if f.is_file()}
    used = {rel for kind in KINDS for rel in template_files(kind)}
    assert on_disk == used  # no orphan template, no missing one
    # ... and each is shipped as package data (the globs in pyproject.toml), not as a module.
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {f.relative_to(root.parent).as_posix() for g in globs["stitchbench.cli"] for f in root.parent.glob(g)}
    assert {f"templates/{rel}" for rel in used} <= shipped
    assert all(rel.endswith(".tmpl") for rel in used)

def _generate_all(cli_here, where: Path) -> dict[str, Path]:
    dirs = {}
    for kind, name in NAMES.items():
        p = new(cli_here, where, kind, name)
        assert p.returncode == 0, p.stderr
        dirs[kind] = where / ("stitchbench-" + name.replace("_", "-"))
    return dirs


def test_generated_code_passes_ruff_with_the_repository_config(cli_here, workspace):
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    for kind, root in _generate_all(cli_here, workspace).items():
        # From the package's root, as its author lints it.
        p = subprocess.run([ruff, "check", "--config", str(REPO / "pyproject.toml"), "--no-cache", "."], cwd=root,
                           capture_output=True, text=True, check=False)
        assert p.returncode == 0, f"{kind}:\n{p.stdout}{p.stderr}"


def _throwaway_venv(path: Path) -> Path:
    """A venv without pip whose interpreter also sees the project environment's packages."""
    base = Path(getattr(sys, "_base_executable", None) or sys.executable).resolve()
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(path)], check=True, capture_output=True)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    project_site = sysconfig.get_paths()["purelib"]
    # addsitedir (not a bare path line) so the project's own .pth files (its editable
    # install of stitchbench) are processed too.
    (Path(site) / "_project_env.pth").write_text(f"import site; site.addsitedir({project_site!r})\n")
    return python


@pytest.mark.xdist_group("scaffold")
def test_generated_packages_install_and_pass_their_own_tests(cli_here, workspace, tmp_path):
    pytest.importorskip("pip")
    dirs = _generate_all(cli_here, workspace)
    python = _throwaway_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1", STITCHBENCH_WORKSPACE=str(workspace),
               STITCHBENCH_PROGRESS="off", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PYTHONWARNINGS="ignore::DeprecationWarning")

    def run(*cmd: str, cwd: Path = workspace) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)

    editables = [arg for root in dirs.values() for arg in ("-e", str(root))]
    p = run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-build-isolation",
            "--no-index", "-q", *editables)
    assert p.returncode == 0, p.stdout + p.stderr

    # Each package's own tests (conformance checks, what it computes, its registration).
    p = run(str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "--rootdir", str(workspace), *(str(root / "tests") for root in dirs.values()))
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    assert "15 passed" in p.stdout, p.stdout[-3000:]

    # `plugins list` sees them, with their kinds and distributions, and imports no torch.
    code = ("import io, json, sys, contextlib\n"
            "from stitchbench.cli.main import main\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    rc = main(['plugins', 'list', '--json'])\n"
            "print(json.dumps({'rc': rc, 'plugins': json.loads(out.getvalue()),\n"
            "                  'heavy': [m for m in ('torch', 'mlflow') if m in sys.modules]}))\n")
    p = run(str(python), "-c", code)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0 and result["heavy"] == []
    listed = {i["name"]: i for i in result["plugins"]}
    for kind, name in NAMES.items():
        assert listed[name]["kind"] == kind
        origin = listed[name]["origin"].replace("_", "-").lower()  # however the backend spells the name
        assert origin == f"entry point stitchbench-{name.replace('_', '-')} 0.1.0", listed[name]
    assert {"dm", "lcka", "resnet18"} <= set(listed)  # the bundled ones still load there
