"""`stitchbench compare` on users' own activation files."""

from __future__ import annotations

import json

import numpy as np
import pytest

import stitchbench

from .conftest import cli


@pytest.fixture
def arrays(workspace):
    rs = np.random.RandomState(0)
    a = rs.randn(60, 4, 3, 3).astype(np.float32)
    b = rs.randn(60, 5, 3, 3)
    np.save(workspace / "a.npy", a)
    np.save(workspace / "b.npy", b)
    return workspace, a, b


def test_compare_json_matches_the_api(arrays):
    ws, a, b = arrays
    p = cli("compare", "a.npy", "b.npy", "--index", "lcka", "--index", "opd", "--json", cwd=ws)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["a"]["shape"] == [60, 4, 3, 3]
    got = {r["index"]: r["value"] for r in out["results"]}
    assert set(got) == {"lcka", "opd"}
    assert got["lcka"] == pytest.approx(stitchbench.get_plugin("lcka").compute(a, b), abs=1e-12)
    assert got["opd"] == pytest.approx(stitchbench.get_plugin("opd").compute(a, b), abs=1e-12)
    table = cli("compare", "a.npy", "b.npy", cwd=ws)
    assert table.returncode == 0 and "pwcca" in table.stdout and "dm_struct" in table.stdout


def test_compare_bad_input(arrays):
    ws, a, _ = arrays
    np.save(ws / "short.npy", a[:10])
    p = cli("compare", "a.npy", "short.npy", cwd=ws)
    assert p.returncode == 2 and "different numbers of examples" in p.stderr and "Traceback" not in p.stderr
    (ws / "junk.npy").write_bytes(b"not an array")
    p = cli("compare", "a.npy", "junk.npy", cwd=ws)
    assert p.returncode == 2 and "junk.npy is not a readable .npy array" in p.stderr
    p = cli("compare", "a.npy", "missing.npy", cwd=ws)
    assert p.returncode == 2 and "does not exist" in p.stderr
    p = cli("compare", "a.npy", "a.npy", "--index", "nope", cwd=ws)
    assert p.returncode == 2 and "unknown similarity index 'nope'" in p.stderr


# Third-party indices that fail as plugins do: by raising, or by returning a NaN.
FAILING_PLUGIN = '''
import stitchbench

class Boom(stitchbench.SimilarityIndex):
    """Always raises (a test plugin)."""
    name = "boom"

    def compute(self, A, B):
        raise RuntimeError("the boom index exploded\\non two lines")

class NotANumber(stitchbench.SimilarityIndex):
    """Always returns a NaN (a test plugin)."""
    name = "not_a_number"

    def compute(self, A, B):
        return float("nan")

@stitchbench.hookimpl
def register_similarity_indices(register):
    register(Boom())
    register(NotANumber())
'''


@pytest.fixture
def failing(arrays):
    ws, a, b = arrays
    (ws / "failing.py").write_text(FAILING_PLUGIN)
    p = cli("plugins", "register", str(ws / "failing.py"), cwd=ws)
    assert p.returncode == 0, p.stderr
    return ws, a, b


def _strict_json(text):
    def no_constant(name):
        raise AssertionError(f"{name} in the JSON output: not strict JSON")

    return json.loads(text, parse_constant=no_constant)


def test_compare_an_index_that_raises_fails_its_row_only(failing):
    ws, a, b = failing
    p = cli("compare", "a.npy", "b.npy", "--index", "lcka", "--index", "boom", "--index", "opd", cwd=ws)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    assert "index boom failed: RuntimeError: the boom index exploded on two lines" in p.stderr
    rows = {line.split()[0]: line for line in p.stdout.splitlines()[1:]}
    assert set(rows) == {"lcka", "boom", "opd"} and "failed" in rows["boom"]
    assert f"{stitchbench.get_plugin('lcka').compute(a, b):.6f}" in rows["lcka"]
    assert f"{stitchbench.get_plugin('opd').compute(a, b):.6f}" in rows["opd"]


def test_compare_json_is_strict_when_an_index_returns_nan(failing):
    ws, a, b = failing
    p = cli("compare", "a.npy", "b.npy", "--json", cwd=ws)  # every index, the two failing ones too
    assert p.returncode == 1 and "Traceback" not in p.stderr
    out = _strict_json(p.stdout)
    rows = {r["index"]: r for r in out["results"]}
    assert rows["not_a_number"]["value"] is None
    assert rows["not_a_number"]["error"].startswith("PluginError: plugin not_a_number: compute() returned nan")
    assert rows["boom"]["value"] is None and rows["boom"]["error"].startswith("RuntimeError: ")
    assert "index not_a_number failed" in p.stderr and "index boom failed" in p.stderr
    for name in ("lcka", "opd", "pwcca", "dm_struct"):
        assert rows[name]["value"] == pytest.approx(stitchbench.get_plugin(name).compute(a, b), abs=1e-12)
        assert "error" not in rows[name]
        assert {"index", "value", "higher_is_more_similar", "params"} <= set(rows[name])
    assert rows["boom"]["params"] == {}


def test_compare_param_reaches_compute(workspace):
    rs = np.random.RandomState(1)
    a, b = rs.randn(50, 3, 2, 2), rs.randn(50, 3, 2, 2)  # same shapes: "reference" is per position, not pooled
    np.save(workspace / "a.npy", a)
    np.save(workspace / "b.npy", b)
    pwcca = stitchbench.get_plugin("pwcca")
    pooled = pwcca.compute(a, b, params={"arrangement": "pooled"})
    assert pooled != pytest.approx(pwcca.compute(a, b))
    p = cli("compare", "a.npy", "b.npy", "--index", "pwcca", "--index", "lcka",
            "--param", "pwcca.arrangement=pooled", "--json", cwd=workspace)
    assert p.returncode == 0, p.stderr
    rows = {r["index"]: r for r in _strict_json(p.stdout)["results"]}
    assert rows["pwcca"]["value"] == pytest.approx(pooled, abs=1e-12)
    assert rows["pwcca"]["params"]["arrangement"] == "pooled"
    assert rows["lcka"]["params"]["arrangement"] == "reference"
    assert rows["lcka"]["value"] == pytest.approx(stitchbench.get_plugin("lcka").compute(a, b), abs=1e-12)


def test_compare_bad_param(workspace):
    np.save(workspace / "a.npy", np.random.RandomState(2).randn(20, 3))
    p = cli("compare", "a.npy", "a.npy", "--param", "pwcca.nope=1", cwd=workspace)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "'pwcca'" in p.stderr and "pwcca.nope: unknown key" in p.stderr
    p = cli("compare", "a.npy", "a.npy", "--param", "pwcca.arrangement=sideways", cwd=workspace)
    assert p.returncode == 2 and "pwcca.arrangement:" in p.stderr
    p = cli("compare", "a.npy", "a.npy", "--index", "lcka", "--param", "pwcca.arrangement=pooled", cwd=workspace)
    assert p.returncode == 2 and "'pwcca' is not being compared" in p.stderr
    p = cli("compare", "a.npy", "a.npy", "--param", "nope.k=1", cwd=workspace)
    assert p.returncode == 2 and "unknown similarity index 'nope'" in p.stderr
    p = cli("compare", "a.npy", "a.npy", "--param", "pwcca", cwd=workspace)
    assert p.returncode == 2 and "expected NAME.KEY=VALUE" in p.stderr
