"""A plugin's life in a workspace, as its author meets it: results that follow its code,
recomputing on demand, nothing invalid stored, params that arrive, broken plugins refused
before a run, and cleaning a workspace."""

from __future__ import annotations

import json
import os
import re
import socket

import numpy as np
import pytest

import stitchbench
from stitchbench.errors import PluginError
from stitchbench.plugin.identity import code_identity
from stitchbench.run import boundary
from stitchbench.run.config import build_config

from .conftest import RUN_TINY, cli, client_of

SCALED = '''
import numpy as np
import stitchbench

class ScaledNorms(stitchbench.SimilarityIndex):
    """scale x (1 - relative gap of the mean activation norms) (a test plugin)."""
    name = "scaled_norms"
    higher_is_more_similar = True

    class Params(stitchbench.Params):
        scale: float = 1.0

    def compute(self, A, B, params=None):
        scale = (params or self.Params()).scale
        a = np.linalg.norm(np.asarray(A, float).reshape(len(A), -1), axis=1).mean()
        b = np.linalg.norm(np.asarray(B, float).reshape(len(B), -1), axis=1).mean()
        return float(scale * (1.0 - OFFSET * abs(a - b) / (a + b)))

OFFSET = 1.0

@stitchbench.hookimpl
def register_similarity_indices(register):
    register(ScaledNorms())
'''

COUNTS = re.compile(r"networks trained (\d+), reused (\d+); matrix jobs computed (\d+), reused (\d+)")


def counts(p) -> tuple[int, int, int, int]:
    assert p.returncode == 0, p.stderr
    m = COUNTS.search(p.stdout)
    assert m, p.stdout
    return tuple(int(g) for g in m.groups())


def test_editing_a_registered_plugin_recomputes_its_jobs_and_reuses_the_rest(shared_ws, tmp_path, cli_here):
    ws = shared_ws
    f = tmp_path / "scaled_norms.py"
    f.write_text(SCALED)
    assert cli_here("plugins", "register", str(f), cwd=ws).returncode == 0
    run = (*RUN_TINY, "--plugin", "scaled_norms", "--plugin", "lcka")
    # lcka's 3 matrices come from the shared run; the new index's 3 are computed
    assert counts(cli_here(*run, cwd=ws)) == (0, 2, 3, 3)
    assert counts(cli_here(*run, cwd=ws)) == (0, 2, 0, 6)
    # a comment or a docstring is not code: still reused
    f.write_text(SCALED.replace('"""scale x', '"""Scale times').replace("OFFSET = 1.0", "OFFSET = 1.0  # the gap's weight"))
    assert counts(cli_here(*run, cwd=ws)) == (0, 2, 0, 6)
    # what the code does changed: its jobs are computed again (by the new code), lcka's reused
    f.write_text(SCALED.replace("OFFSET = 1.0", "OFFSET = 0.5"))
    assert counts(cli_here(*run, cwd=ws)) == (0, 2, 3, 3)
    report = json.loads(cli_here("report", "latest", "--matrices", "--json", cwd=ws).stdout)
    (intra,) = [m for m in report["matrices"] if m["plugin"] == "scaled_norms" and m["scope"] == "intra"][:1]
    assert np.allclose(np.diag(intra["values"]), 1.0)
    client = client_of(ws)
    codes = {r.data.tags["stitchbench.code"] for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`stitchbench.plugin` = 'scaled_norms'")}
    assert len(codes) == 2 and all(c.startswith("src:") for c in codes)


def test_params_reach_compute_in_a_run(shared_ws, tmp_path, cli_here):
    ws = shared_ws
    f = tmp_path / "scaled_norms.py"
    f.write_text(SCALED)
    assert cli_here("plugins", "register", str(f), cwd=ws).returncode == 0
    p = cli_here(*RUN_TINY, "--plugin", "scaled_norms", "--set", "indices.params.scaled_norms.scale=3", cwd=ws)
    assert p.returncode == 0, p.stderr
    report = json.loads(cli_here("report", "latest", "--matrices", "--json", cwd=ws).stdout)
    for m in report["matrices"]:
        assert m["plugin"] == "scaled_norms"
        assert np.max(m["values"]) <= 3.0 + 1e-12
        if m["scope"] == "intra":
            assert np.allclose(np.diag(m["values"]), 3.0)
    # and through the API: compute(A, B, params=...)
    idx = stitchbench.get_plugin("scaled_norms", workspace=ws)
    a = np.random.RandomState(0).randn(20, 4)
    assert idx.compute(a, a, params=idx.Params(scale=2.5)) == pytest.approx(2.5)


def test_no_reuse_recomputes_what_it_names(shared_ws, cli_here):
    ws = shared_ws
    assert counts(cli_here(*RUN_TINY, "--plugin", "lcka", "--plugin", "opd", "--no-reuse", "lcka", cwd=ws)) == (0, 2, 3, 3)
    assert counts(cli_here(*RUN_TINY, "--plugin", "lcka", "--plugin", "opd", "--no-reuse", "similarity_index",
                           cwd=ws)) == (0, 2, 6, 0)
    assert counts(cli_here(*RUN_TINY, "--plugin", "lcka", "--plugin", "opd", cwd=ws)) == (0, 2, 0, 6)
    # retrained networks: everything computed from them is computed again too
    assert counts(cli_here(*RUN_TINY, "--plugin", "lcka", "--no-reuse", "resnet18", cwd=ws)) == (2, 0, 3, 0)
    p = cli_here(*RUN_TINY, "--plugin", "lcka", "--no-reuse", "nope", cwd=ws)
    assert p.returncode == 2 and "--no-reuse nope" in p.stderr and "similarity_index" in p.stderr
    p = cli_here(*RUN_TINY, "--plugin", "lcka", "--no-reuse", "opd", cwd=ws)
    assert p.returncode == 2 and "opd is not in this run" in p.stderr


def test_an_evaluation_named_by_no_reuse_finds_no_jobs(tmp_path):
    from stitchbench.testing import fake_context

    ctx = fake_context()
    with ctx.job_run("a job", key="k1", kind="test") as job:
        job.log_table({"x": 1}, "out")
    assert ctx.find_job("k1").read_json("out.json") == {"x": 1}
    # the real RunContext's rule, on a context of the layer_identification evaluation
    real = stitchbench.RunContext.find_job
    forced = ctx.for_evaluation("layer_identification", None)
    forced.no_reuse = frozenset({"layer_identification"})
    assert real(forced, "k1") is None
    other = ctx.for_evaluation("energy_ood", None)
    assert other.stored_key("k1") != forced.stored_key("k1") != "k1"


NAN_INDEX = '''
import numpy as np
import stitchbench

class Nanny(stitchbench.SimilarityIndex):
    """An index that returns NaN on run-sized inputs (a test plugin)."""
    name = "nanny"
    higher_is_more_similar = False

    def compute(self, A, B):
        a = np.asarray(A, float).reshape(len(A), -1)
        b = np.asarray(B, float).reshape(len(B), -1)
        return float("nan") if len(A) > 60 and BROKEN else float(abs(a.std() - b.std()))

BROKEN = True

@stitchbench.hookimpl
def register_similarity_indices(register):
    register(Nanny())
'''


def test_a_nan_index_fails_its_job_and_a_fixed_rerun_reuses_nothing_of_it(shared_ws, tmp_path, cli_here):
    ws = shared_ws
    f = tmp_path / "nanny.py"
    f.write_text(NAN_INDEX)
    assert cli_here("plugins", "register", str(f), cwd=ws).returncode == 0
    p = cli_here(*RUN_TINY, "--plugin", "nanny", cwd=ws)
    assert p.returncode == 1
    assert "plugin nanny: compute() returned nan" in p.stderr and "Traceback" not in p.stderr
    assert "job nanny [intra] digits-resnet18-w4-seed0 (plugin nanny) failed" in p.stderr
    assert "layer_identification" not in p.stderr
    client = client_of(ws)
    ids = [e.experiment_id for e in client.search_experiments()]
    jobs = client.search_runs(ids, "tags.`stitchbench.plugin` = 'nanny'")
    assert [r.info.status for r in jobs] == ["FAILED"]
    assert all(r.data.tags.get("stitchbench.complete") != "1" for r in jobs)
    f.write_text(NAN_INDEX.replace("BROKEN = True", "BROKEN = False"))
    assert counts(cli_here(*RUN_TINY, "--plugin", "nanny", cwd=ws)) == (0, 2, 3, 0)
    jobs = client.search_runs(ids, "tags.`stitchbench.plugin` = 'nanny'")
    assert sorted(r.info.status for r in jobs) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]


class _Fixed(stitchbench.SimilarityIndex):
    name = "fixed_test_index"

    def __init__(self, out):
        self.out = out

    def matrix(self, sources, targets, context):
        return self.out


@pytest.mark.parametrize(("out", "message"), [
    (np.array([[0.1, np.nan], [0.2, 0.3]]), r"matrix\(\) returned 1 non-finite value\(s\), at cells \(0, 1\)=nan"),
    (np.zeros((3, 2)), r"matrix\(\) returned shape \(3, 2\); expected \(2, 2\)"),
    ("a string", r"matrix\(\) returned str 'a string'; expected a \(2, 2\) array of floats"),
])
def test_a_bad_matrix_is_rejected_naming_the_plugin_and_method(out, message):
    with pytest.raises(PluginError, match=r"plugin fixed_test_index: " + message):
        boundary.index_matrix(_Fixed(out), [1, 2], [1, 2], None)


def test_a_bad_stitching_layer_is_rejected_naming_the_plugin_and_method():
    import torch

    from stitchbench.testing import fake_problem

    problem = fake_problem("b0", "b2")
    matcher = stitchbench.get_plugin("dm")
    with pytest.raises(PluginError, match=r"plugin dm: fit\(\) returned Linear"):
        boundary.stitching_layer(matcher, "fit()", torch.nn.Linear(2, 2), problem)
    wrong = stitchbench.StitchingLayer(problem.target_shape, problem.source_shape)
    with pytest.raises(PluginError, match=r"fit\(\) returned a stitching layer for shapes \(8, 4, 4\) -> \(4, 8, 8\)"):
        boundary.stitching_layer(matcher, "fit()", wrong, problem)
    layer = problem.new_layer()
    with torch.no_grad():
        layer.affine.weight[0, 0] = float("inf")
    with pytest.raises(PluginError, match="affine.weight has non-finite values"):
        boundary.stitching_layer(matcher, "fit()", layer, problem)


def test_nan_evaluation_metrics_are_left_out_with_a_warning(caplog):
    ev = stitchbench.get_plugin("layer_identification")
    result = stitchbench.EvaluationResult(metrics={"a": 1.0, "b": float("nan")})
    out = boundary.evaluation_result(ev, result)
    assert out.metrics == {"a": 1.0}
    assert "metric b is undefined" in caplog.text and "layer_identification" in caplog.text
    with pytest.raises(PluginError, match=r"run\(\) returned dict"):
        boundary.evaluation_result(ev, {"a": 1.0})


# -- code identity -------------------------------------------------------------------------


def test_code_identity_follows_the_source_of_the_plugin_and_its_package(tmp_path):
    import importlib.util
    import sys

    pkg = tmp_path / "idpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .core import Index\n")
    (pkg / "core.py").write_text("import stitchbench\nfrom ._helper import K\n\nclass Index(stitchbench.SimilarityIndex):\n"
                                 "    name = 'idx'\n\n    def compute(self, A, B):\n        return K\n")
    (pkg / "_helper.py").write_text("K = 1.0\n")
    (pkg / "unused.py").write_text("X = 1\n")

    def identity() -> str:
        for m in [m for m in sys.modules if m.startswith("idpkg")]:
            del sys.modules[m]
        spec = importlib.util.spec_from_file_location("idpkg", pkg / "__init__.py",
                                                      submodule_search_locations=[str(pkg)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["idpkg"] = module
        spec.loader.exec_module(module)
        return code_identity(module.Index(), f"registered path {pkg}", module)

    first = identity()
    assert first.startswith("src:")
    (pkg / "_helper.py").write_text('"""Docstrings and comments are not code."""\nK = 1.0  # the value\n')
    assert identity() == first
    (pkg / "unused.py").write_text("X = 2\n")  # imported by nothing the plugin uses
    assert identity() == first
    (pkg / "_helper.py").write_text("K = 2.0\n")
    assert identity() != first


def test_an_installed_plugin_is_identified_by_its_distribution_version():
    import importlib.metadata

    import pluggy

    version = importlib.metadata.version("pluggy")
    obj = pluggy.PluginManager("x")  # any object whose code lives in site-packages
    assert code_identity(obj, f"entry point pluggy {version}") == f"pluggy=={version}"


# -- configuration ------------------------------------------------------------------------

TINYCNN = '''
import stitchbench

class TinyCNN(stitchbench.ArchitecturePlugin):
    """A 3-block CNN (a test plugin)."""
    name = "tinycnn"

    class Params(stitchbench.Params):
        width: int = 6

    def build(self, params, num_classes, image_shape):
        from stitchbench.testing import TinyNet
        return TinyNet(num_classes, image_shape[0], params.width)

    def tag(self, params):
        return f"tinycnn-w{params.width}"

@stitchbench.hookimpl
def register_architectures(register):
    register(TinyCNN())
'''


@pytest.fixture
def tinycnn_ws(workspace, tmp_path, cli_here):
    f = tmp_path / "tinycnn.py"
    f.write_text(TINYCNN)
    assert cli_here("plugins", "register", str(f), cwd=workspace).returncode == 0
    return workspace


@pytest.mark.parametrize(("args", "expected"), [
    (["--plugin", "tinycnn", "--set", "networks.architecture.params.width=8"], "digits-tinycnn-w8-seed0"),
    (["--set", "networks.architecture.name=tinycnn"], "digits-tinycnn-w6-seed0"),
    (["--set", "networks.architecture.params.width=5", "--set", "networks.architecture.name=tinycnn"],
     "digits-tinycnn-w5-seed0"),
    (["--set", "stitching.matchers=[dm]"], "digits-resnet18-w16-seed0"),
    (["--plugin", "lcka"], "digits-resnet18-w16-seed0"),
])
def test_architecture_params_follow_the_architecture(tinycnn_ws, cli_here, args, expected):
    p = cli_here("run", "--dry-run", *args, cwd=tinycnn_ws)
    assert p.returncode == 0, p.stderr
    assert expected in p.stdout


@pytest.mark.parametrize(("setting", "message"), [
    ("indices.params.dm.k=5", ("indices.params.dm: dm is a matcher, not a similarity index; its params belong under "
                              "stitching.params.dm")),
    ("evaluations.params.resnet18.width=3", ("its params belong under networks.architecture.params (with "
                                            "networks.architecture.name: resnet18)")),
    ("indices.params.nope.k=1", "unknown similarity index 'nope'"),
])
def test_params_under_the_wrong_section_are_an_error(workspace, cli_here, setting, message):
    p = cli_here("run", "--dry-run", "--set", setting, cwd=workspace)
    assert p.returncode == 2 and message in p.stderr, p.stderr


def test_params_for_a_plugin_left_out_of_the_run_are_an_error(workspace, cli_here):
    # (the Ding tests would pull opd into the run: they require it)
    p = cli_here("run", "--dry-run", "--set", "indices.names=[lcka]", "--set", "evaluations.names=[layer_identification]",
                 "--set", "indices.params.opd.arrangement=pooled", cwd=workspace)
    assert p.returncode == 2
    assert "indices.params.opd: opd is not in this run (indices.names does not include it)" in p.stderr


def test_changing_a_plugin_name_drops_the_old_plugins_params():
    cfg = build_config("quick", overrides=["networks.architecture.name=vit_tiny"])
    assert cfg.networks.architecture.params == {}
    cfg = build_config("quick", overrides=["networks.architecture.params.width=8"])
    assert cfg.networks.architecture.params == {"width": 8}


# -- broken plugins refused before a run ---------------------------------------------------

BROKEN_ARCHS = '''
import stitchbench
from torch import nn


class ListNet(stitchbench.StitchableNetwork):
    def __init__(self, num_classes, channels, names=3, as_list=True):
        super().__init__()
        self.stem = nn.Conv2d(channels, 4, 3, padding=1)
        blocks = [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(3)]
        self.blocks = blocks if as_list else nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
        self.layer_names = [f"b{i}" for i in range(names)]


class Listy(stitchbench.ArchitecturePlugin):
    """Blocks in a Python list (a broken test plugin)."""
    name = "listy"

    def build(self, params, num_classes, image_shape):
        return ListNet(num_classes, image_shape[0])


class Misnamed(stitchbench.ArchitecturePlugin):
    """Two layer names for three blocks (a broken test plugin)."""
    name = "misnamed"

    def build(self, params, num_classes, image_shape):
        return ListNet(num_classes, image_shape[0], names=2, as_list=False)


class PlainSequential(stitchbench.ArchitecturePlugin):
    """build() returns nn.Sequential (a broken test plugin)."""
    name = "plainseq"

    def build(self, params, num_classes, image_shape):
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))


@stitchbench.hookimpl
def register_architectures(register):
    register(Listy())
    register(Misnamed())
    register(PlainSequential())
'''


@pytest.fixture
def broken_ws(workspace, tmp_path, cli_here):
    f = tmp_path / "broken_archs.py"
    f.write_text(BROKEN_ARCHS)
    assert cli_here("plugins", "register", str(f), cwd=workspace).returncode == 0
    return workspace


@pytest.mark.parametrize(("name", "message"), [
    ("listy", "blocks is a list, not an nn.ModuleList"),
    ("misnamed", "layer_names has 2 names but blocks has 3 blocks"),
    ("plainseq", "build() returned Sequential (an nn.Module), not a stitchbench.StitchableNetwork"),
])
def test_a_broken_architecture_is_refused_by_check_and_by_run(broken_ws, cli_here, name, message):
    p = cli_here("plugins", "check", name, cwd=broken_ws)
    assert p.returncode == 1 and message in p.stdout and f"FAIL {name}" in p.stdout
    for extra in (["--dry-run"], []):
        p = cli_here("run", "--plugin", name, "--plugin", "lcka", *extra, cwd=broken_ws)
        assert p.returncode == 2, p.stdout
        assert f"plugin {name}: the network it builds is not stitchable" in p.stderr and message in p.stderr
        assert "Traceback" not in p.stderr
    # refused before anything ran: no run in the store
    db = broken_ws / "mlruns" / "mlflow.db"
    assert not db.exists() or not client_of(broken_ws).search_runs(
        [e.experiment_id for e in client_of(broken_ws).search_experiments()])


@pytest.mark.parametrize("name", [i.name for i in stitchbench.list_plugins()])
def test_every_bundled_plugin_passes_its_checks(name):
    from stitchbench.testing import check_plugin

    assert check_plugin(stitchbench.get_plugin(name))


def test_plugins_check_cli(workspace):
    p = cli("plugins", "check", "lcka", "opd", "--json", cwd=workspace)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert [r["name"] for r in out] == ["lcka", "opd"] and all(r["ok"] and r["checks"] for r in out)
    p = cli("plugins", "check", "nope", cwd=workspace)
    assert p.returncode == 2 and "unknown plugin 'nope'" in p.stderr
    p = cli("plugins", "check", "tlm", "--set", "epochs=0", cwd=workspace)
    assert p.returncode == 0 and "ok   tlm" in p.stdout, p.stdout + p.stderr
    p = cli("plugins", "check", "tlm", "--set", "nope=1", cwd=workspace)
    assert p.returncode == 2 and "tlm.nope" in p.stderr


# -- cleaning a workspace -----------------------------------------------------------------


def test_clean(shared_ws, tmp_path):
    ws = shared_ws
    (ws / "registry").mkdir(exist_ok=True)
    (ws / "registry" / "plugins.toml").write_text("# kept\n")
    p = cli("clean", "--dry-run", cwd=ws)
    assert p.returncode == 0, p.stderr
    assert "would delete mlruns/mlflow.db" in p.stdout and "would delete mlruns/artifacts/" in p.stdout
    assert (ws / "mlruns" / "mlflow.db").exists()
    # a run of this workspace that is still running (its process is alive: this one)
    client = client_of(ws)
    exp = client.get_experiment_by_name("tiny")
    client.create_run(exp.experiment_id, tags={"stitchbench.kind": "parent", "stitchbench.pid": str(os.getpid()),
                                               "stitchbench.host": socket.gethostname()})
    p = cli("clean", cwd=ws)
    assert p.returncode == 2 and f"still running (process {os.getpid()}" in p.stderr
    assert (ws / "mlruns" / "mlflow.db").exists()
    p = cli("clean", cwd=ws, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'elsewhere.db'}"})
    assert p.returncode == 2 and "points at another store" in p.stderr
    p = cli("clean", "--force", cwd=ws)
    assert p.returncode == 0, p.stderr
    assert not (ws / "mlruns" / "mlflow.db").exists() and not (ws / "mlruns" / "artifacts").exists()
    assert (ws / "registry" / "plugins.toml").read_text() == "# kept\n"
    p = cli("clean", cwd=ws)
    assert p.returncode == 0 and "nothing to delete" in p.stdout
    p = cli("report", "latest", cwd=ws)
    assert p.returncode == 2 and "no finished" in p.stderr


def test_dir_lists_the_lazy_exports():
    assert set(stitchbench.__all__) <= set(dir(stitchbench))
    assert {"StitchableNetwork", "RunContext", "MatrixRecord", "StitchingProblem"} <= set(dir(stitchbench))



ALWAYS_NAN = '''
import stitchbench

class AlwaysNan(stitchbench.SimilarityIndex):
    """An index that always returns NaN (a broken test plugin)."""
    name = "always_nan"

    def compute(self, A, B):
        return float("nan")

@stitchbench.hookimpl
def register_similarity_indices(register):
    register(AlwaysNan())
'''


def test_an_index_failing_the_load_checks_is_refused_before_the_run(workspace, tmp_path, cli_here):
    f = tmp_path / "always_nan.py"
    f.write_text(ALWAYS_NAN)
    assert cli_here("plugins", "register", str(f), cwd=workspace).returncode == 0
    p = cli_here("run", "--dry-run", "--plugin", "always_nan", cwd=workspace)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "plugin always_nan: fails the similarity index checks on synthetic data" in p.stderr
    assert "compute() returned nan" in p.stderr and "stitchbench plugins check always_nan" in p.stderr


class _Asymmetric(stitchbench.SimilarityIndex):
    """Mean of A over the norm of B: asymmetric, but does not say so."""

    name = "asym_test"
    higher_is_more_similar = False

    def compute(self, A, B):
        a, b = np.asarray(A, float).reshape(len(A), -1), np.asarray(B, float).reshape(len(B), -1)
        return float(abs(a.std() - b.std()) * (1 + a.shape[1]))


class _WrongWay(stitchbench.Matcher):
    """Returns a layer for the swapped shapes."""

    name = "wrong_way_test"

    def fit(self, problem, params):
        return stitchbench.StitchingLayer(problem.target_shape, problem.source_shape)


class _DictEvaluation(stitchbench.Evaluation):
    """Returns a dict instead of an EvaluationResult."""

    name = "dict_eval_test"

    def run(self, context, params):
        return {"metric": 1.0}


@pytest.mark.parametrize(("plugin", "message"), [
    (_Asymmetric(), "set `symmetric = False` on the index if that is intended"),
    (_WrongWay(), "fit() returned a stitching layer for shapes (8, 4, 4) -> (4, 8, 8)"),
    (_DictEvaluation(), "run() returned dict"),
])
def test_check_plugin_finds_what_is_wrong_with_each_kind(plugin, message):
    from stitchbench.testing import PluginCheckError, check_plugin, plugin_problems

    assert any(message in p for p in plugin_problems(plugin)), plugin_problems(plugin)
    with pytest.raises(PluginCheckError, match=re.escape(message)):
        check_plugin(plugin)
