"""The documentation stays true (as datasette's tests/test_docs.py keeps its own): every
hook with its exact signature, every public `RunContext`, `JobRun` and `FinishedJob`
method and every public name is in docs/plugins.md; no doc cites a file outside the
repository; and the README's plugin example and docs/plugins.md's evaluation example run
as written."""

from __future__ import annotations

import inspect
import json
import re

import pytest

import stitchbench
from stitchbench.plugin import hookspecs
from stitchbench.plugin.types import HOOK_OF_KIND

from .conftest import REPO, RUN_TINY, client_of

PLUGINS_MD = (REPO / "docs" / "plugins.md").read_text()
README = (REPO / "README.md").read_text()


def _public_methods(cls: type) -> list[str]:
    return [n for n, v in vars(cls).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))]


@pytest.mark.parametrize("hook", sorted(HOOK_OF_KIND.values()))
def test_every_hook_is_documented_with_its_exact_signature(hook):
    fn = getattr(hookspecs, hook)
    signature = f"{hook}({', '.join(inspect.signature(fn).parameters)})"  # as the docs write it
    assert list(inspect.signature(fn).parameters) == ["register"]
    assert fn.__doc__ and "register(" in fn.__doc__
    assert f"`{signature}`" in PLUGINS_MD, f"docs/plugins.md lacks `{signature}`"


@pytest.mark.parametrize("method", _public_methods(stitchbench.RunContext))
def test_every_run_context_method_is_documented(method):
    assert f"`{method}(" in PLUGINS_MD or f"`{method}`" in PLUGINS_MD, f"docs/plugins.md lacks RunContext.{method}"


@pytest.mark.parametrize("method", _public_methods(stitchbench.JobRun) + _public_methods(stitchbench.FinishedJob))
def test_every_job_record_method_is_documented(method):
    assert f"`{method}`" in PLUGINS_MD or f"`{method}(" in PLUGINS_MD, f"docs/plugins.md lacks {method}"


@pytest.mark.parametrize("name", stitchbench.__all__)
def test_every_public_name_is_documented(name):
    assert re.search(rf"`(stitchbench\.)?{re.escape(name)}[`(]", PLUGINS_MD), f"docs/plugins.md lacks {name}"


def test_docs_cite_nothing_outside_the_repository():
    bad = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "stitchbench").rglob("*.py")),
                 *sorted((REPO / "plugins").rglob("*.py"))]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "REFERENCE.md" in line or "../shared" in line:
                bad.append(f"{path.relative_to(REPO)}:{n}")
    assert not bad, "cite the paper or the authors' repository instead: " + ", ".join(bad)


def _code_block(text: str, first_line: str) -> str:
    """The fenced Python block of ``text`` whose first line is ``first_line``."""
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL):
        if block.startswith(first_line):
            return block
    raise AssertionError(f"no ```python block starting with {first_line!r}")


def test_the_readme_plugin_example_runs_as_written(shared_ws, cli_here):
    ws = shared_ws
    (ws / "my_index.py").write_text(_code_block(README, "# my_index.py"))
    commands = re.search(r"```\n(stitchbench plugins register \./my_index\.py\n.*?)```", README, flags=re.DOTALL).group(1)
    register, run = commands.strip().splitlines()
    p = cli_here(*register.split()[1:], cwd=ws)
    assert p.returncode == 0, p.stderr
    name = re.search(r"--plugin (\S+)", run).group(1)
    p = cli_here(*run.split()[1:], "--config", "tiny.yaml", cwd=ws)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "networks trained 0, reused 2" in p.stdout
    report = json.loads(cli_here("report", "latest", "--json", cwd=ws).stdout)
    for scope in ("intra", "inter"):
        assert 0.0 <= report["layer_identification"][scope][name] <= 1.0


def test_the_plugins_md_evaluation_example_runs_as_written(shared_ws, cli_here):
    ws = shared_ws
    (ws / "my_eval.py").write_text(_code_block(PLUGINS_MD, "# my_eval.py"))
    commands = re.search(r"```\n(stitchbench plugins register \./my_eval\.py\n.*?)```", PLUGINS_MD,
                         flags=re.DOTALL).group(1)
    register, run, report = [c.split("#")[0].split() for c in commands.strip().splitlines()]
    assert cli_here(*register[1:], cwd=ws).returncode == 0
    runs = [cli_here(*run[1:], *RUN_TINY[1:], cwd=ws) for _ in range(2)]
    for p in runs:
        assert p.returncode == 0, p.stderr[-3000:]
    assert "matrix jobs computed 0" in runs[0].stdout  # the shared run's DM matrices
    r = cli_here(*report[1:], cwd=ws)
    gaps = json.loads(r.stdout)["diagonal_gap"]
    assert {"dm_func.intra.digits-resnet18-w4-seed0", "dm_func.inter.digits-resnet18-w4-seed0"} <= set(gaps)
    # DM self-stitching keeps each layer's accuracy best on the diagonal
    assert gaps["dm_func.intra.digits-resnet18-w4-seed0"] > 0
    # its own job ran once per network; the second run found both by key
    client = client_of(ws)
    jobs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                              "tags.`stitchbench.kind` = 'activation_norms'")
    assert len(jobs) == 2 and all(j.data.tags["stitchbench.plugin"] == "diagonal_gap" for j in jobs)
    evals = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                               "tags.`stitchbench.plugin` = 'diagonal_gap' and tags.`stitchbench.kind` = 'evaluation'")
    assert len(evals) == 2
