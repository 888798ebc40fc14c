"""The documentation stays true (as datasette's tests/test_docs.py keeps its own): every
hook with its exact signature, every public `RunContext`, `JobRun` and `FinishedJob`
method and every public name is in docs/plugins.md; no doc cites a file outside the
repository; the README's plugin example runs as written; and docs/plugins.md's examples
(one plugin per kind, in docs/examples/) are shown as their files are, pass
`stitchbench plugins check`, and run together, with the doc's commands, as written."""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import stitchbench
from stitchbench.plugin import hookspecs
from stitchbench.plugin.types import HOOK_OF_KIND

from .conftest import REPO, RUN_TINY, client_of

PLUGINS_MD = (REPO / "docs" / "plugins.md").read_text()
README = (REPO / "README.md").read_text()
EXAMPLES = REPO / "docs" / "examples"
#: What `stitchbench plugins register` is given for each example -> the plugin it registers.
EXAMPLE_PLUGINS = {
    "blobs_dataset.py": "blobs",
    "tiny_cnn": "tiny_cnn",
    "ridge_matcher.py": "ridge",
    "rbf_cka.py": "rbf_cka",
    "diagonal_gap.py": "diagonal_gap",
}
EXAMPLE_KINDS = {"blobs": "dataset", "tiny_cnn": "architecture", "ridge": "matcher", "rbf_cka": "similarity_index",
                 "diagonal_gap": "evaluation"}


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


def test_dir_lists_every_public_name():
    """The lazily imported names too (they are module attributes only once used)."""
    assert set(stitchbench.__all__) <= set(dir(stitchbench))


def test_docs_cite_nothing_outside_the_repository():
    bad = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "stitchbench").rglob("*.py")),
                 *sorted((REPO / "plugins").rglob("*.py")), *sorted(EXAMPLES.rglob("*.py"))]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "REFERENCE.md" in line or "../shared" in line:
                bad.append(f"{path.relative_to(REPO)}:{n}")
    assert not bad, "cite the paper or the authors' repository instead: " + ", ".join(bad)


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """Every fenced block of a Markdown text: (its language, or "", its content)."""
    blocks: list[tuple[str, str]] = []
    language, lines = None, []
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            if language is None:
                language, lines = line[3:].strip(), []
            else:
                blocks.append((language, "".join(lines)))
                language = None
        elif language is not None:
            lines.append(line)
    return blocks


def _code_block(text: str, first_line: str, language: str = "python") -> str:
    """The fenced block (of ``language``) of ``text`` whose first line is ``first_line``."""
    for lang, block in _fenced_blocks(text):
        if lang == language and block.startswith(first_line):
            return block
    raise AssertionError(f"no ```{language} block starting with {first_line!r}")


def _commands(text: str, first: str) -> list[list[str]]:
    """The command lines (comments dropped, split as a shell does) of the plain fenced block
    of ``text`` whose first line is ``first``, with docs/examples/ made absolute (the
    commands are written to run from the repository root)."""
    block = _code_block(text, first + "\n", language="")
    lines = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    return [shlex.split(line.replace("docs/examples/", f"{EXAMPLES}/")) for line in lines if line]


def _register_examples(cli_here, ws) -> None:
    for target, name in EXAMPLE_PLUGINS.items():
        p = cli_here("plugins", "register", str(EXAMPLES / target), cwd=ws)
        assert p.returncode == 0 and f"{name} (" in p.stdout, p.stderr


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
    """diagonal_gap's own commands, on the networks and DM matrices of the shared tiny run."""
    ws = shared_ws
    register, run, report = _commands(PLUGINS_MD, "stitchbench plugins register docs/examples/diagonal_gap.py")
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


def _example_blocks() -> dict[str, str]:
    """docs/plugins.md's Python blocks that show a file of docs/examples/: path -> code."""
    shown: dict[str, str] = {}
    for language, block in _fenced_blocks(PLUGINS_MD):
        m = re.match(r"# (docs/examples/\S+\.py)\n", block)
        if language == "python" and m:
            assert m.group(1) not in shown, f"docs/plugins.md shows {m.group(1)} twice"
            shown[m.group(1)] = block
    return shown


def test_plugins_md_shows_every_example_file_as_it_is():
    shown = _example_blocks()
    assert sorted(shown) == sorted(str(p.relative_to(REPO)) for p in EXAMPLES.rglob("*.py"))
    for path, code in shown.items():
        assert code == (REPO / path).read_text(), f"docs/plugins.md shows {path} otherwise than the file is"


def test_there_is_an_example_of_every_kind():
    assert sorted(EXAMPLE_KINDS.values()) == sorted(stitchbench.KINDS)
    assert sorted(EXAMPLE_PLUGINS.values()) == sorted(EXAMPLE_KINDS)


@pytest.mark.parametrize("target", list(EXAMPLE_PLUGINS))
def test_each_example_registers_and_passes_plugins_check(workspace, cli_here, target):
    name = EXAMPLE_PLUGINS[target]
    p = cli_here("plugins", "register", str(EXAMPLES / target), cwd=workspace)
    assert p.returncode == 0, p.stderr
    p = cli_here("plugins", "check", name, "--json", cwd=workspace)
    assert p.returncode == 0, p.stdout + p.stderr
    (result,) = json.loads(p.stdout)
    assert result["ok"] and result["checks"], result
    assert (result["name"], result["kind"]) == (name, EXAMPLE_KINDS[name])


def test_the_example_plugin_modules_do_not_import_torch():
    """`stitchbench plugins list` imports every plugin module; the examples' modules import
    no torch (tiny_cnn's network module is imported by `build()` only)."""
    code = textwrap.dedent("""
        import sys
        from stitchbench.plugin.manager import load_single
        from stitchbench.plugin.registration import entry_for
        for target in sys.argv[1:]:
            load_single(entry_for(target))
        print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
    """)
    p = subprocess.run([sys.executable, "-c", code, *(str(EXAMPLES / t) for t in EXAMPLE_PLUGINS)],
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_the_plugins_md_test_file_passes(workspace, cli_here):
    """The "Testing your plugin" example, in a workspace where the examples are registered."""
    _register_examples(cli_here, workspace)
    path = workspace / "test_examples.py"
    path.write_text(_code_block(PLUGINS_MD, "# test_examples.py"))
    spec = importlib.util.spec_from_file_location("plugins_md_test_examples", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [fn for name, fn in vars(module).items() if name.startswith("test_")]
    assert len(tests) == 4
    for test in tests:
        test()


def test_the_plugins_md_config_file_is_valid(workspace, cli_here):
    _register_examples(cli_here, workspace)
    (workspace / "blobs.yaml").write_text(_code_block(PLUGINS_MD, "# blobs.yaml", language="yaml"))
    p = cli_here("run", "--config", "blobs.yaml", "--dry-run", cwd=workspace)
    assert p.returncode == 0, p.stderr
    for line in ("networks:   2 x tiny_cnn {'width': 8}", "matchers:   ridge", "indices:    rbf_cka",
                 "evaluations: diagonal_gap, layer_identification"):
        assert line + "\n" in p.stdout, p.stdout


#: What makes the doc's run of the five examples tiny: one epoch, fewer images.
TINY_EXAMPLES = ("--set", "networks.training.epochs=1", "--set", "dataset.params.n_train=500",
                 "--set", "dataset.params.n_test=100", "--set", "indices.n_examples=100")


def test_the_five_examples_run_together_as_written(workspace, cli_here):
    """docs/plugins.md's "All five together": register, check, run (made tiny), run again
    (everything reused), report; the architecture's --set width reaches the networks."""
    lines = _commands(PLUGINS_MD, "stitchbench plugins register docs/examples/blobs_dataset.py")
    assert all(c[0] == "stitchbench" for c in lines)
    registers = [c for c in lines if c[1:3] == ["plugins", "register"]]
    (check,) = [c for c in lines if c[1:3] == ["plugins", "check"]]
    (run,) = [c for c in lines if c[1] == "run"]
    (report,) = [c for c in lines if c[1] == "report"]
    assert len(registers) == 5 and len(lines) == 8
    for c in [*registers, check]:
        p = cli_here(*c[1:], cwd=workspace)
        assert p.returncode == 0, p.stdout + p.stderr
    assert "5 of 5 plugin(s) pass" in p.stdout
    first, second = (cli_here(*run[1:], *TINY_EXAMPLES, cwd=workspace) for _ in range(2))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "networks trained 2, reused 0; matrix jobs computed 6, reused 0" in first.stdout
    assert second.returncode == 0, second.stderr[-3000:]
    assert "networks trained 0, reused 2; matrix jobs computed 0, reused 6" in second.stdout

    out = json.loads(cli_here("report", "latest", "--json", cwd=workspace).stdout)
    nets = ["blobs-tiny_cnn-w8-seed0", "blobs-tiny_cnn-w8-seed1"]
    assert sorted(out["networks"]) == nets
    assert set(out["diagonal_gap"]) == {f"{m}.{scope}.{net}" for m in ("ridge", "rbf_cka")
                                        for scope, net in (("intra", nets[0]), ("intra", nets[1]), ("inter", nets[0]))}
    for scope in ("intra", "inter"):
        assert set(out["layer_identification"][scope]) == {"ridge", "rbf_cka"}
    p = cli_here(*report[1:], cwd=workspace)
    assert p.returncode == 0, p.stderr
    assert "ridge (stitching, relative accuracy), inter" in p.stdout and "rbf_cka" in p.stdout
    # what ridge put in fit_info is kept with each matrix, per cell
    client = client_of(workspace)
    (matrix,) = client.search_runs([client.get_experiment_by_name("quick").experiment_id],
                                   "tags.`stitchbench.plugin` = 'ridge' and tags.`stitchbench.scope` = 'inter'")
    fit_info = json.loads(Path(client.download_artifacts(matrix.info.run_id, "matrix/fit_info.json",
                                                         str(workspace))).read_text())
    assert len(fit_info) == 16 and fit_info["0_0"]["k"] == 100 and fit_info["0_0"]["lambda"] > 0
