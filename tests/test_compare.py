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
