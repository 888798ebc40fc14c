"""Jobs: keys that carry the code's identity, one store mechanism for finding and writing
finished jobs (the core's and the plugins'), and errors that name the job."""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import mlflow
import pytest

import stitchbench
from stitchbench.errors import JobError, UsageError, job_errors
from stitchbench.store import connection
from stitchbench.store.jobs import find_finished_job, job_run


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_code_version_follows_the_code_not_its_comments(tmp_path, monkeypatch):
    versions = {}
    sources = {
        "base": 'def f(x):\n    """Double."""\n    return 2 * x\n',
        "comment": 'def f(x):\n    """Twice x, documented otherwise."""\n    # a comment\n    return 2 * x  # here too\n',
        "changed": 'def f(x):\n    """Double."""\n    return 3 * x\n',
    }
    for label, src in sources.items():
        d = tmp_path / label
        d.mkdir()
        (d / "probe_mod.py").write_text(src)
        monkeypatch.delitem(sys.modules, "probe_mod", raising=False)
        module = _load(d / "probe_mod.py", "probe_mod")
        versions[label] = (stitchbench.code_version(module.f), stitchbench.code_version(module))
    assert versions["comment"] == versions["base"]
    assert versions["changed"][0] != versions["base"][0] and versions["changed"][1] != versions["base"][1]
    assert stitchbench.code_version(1) != stitchbench.code_version(2)  # plain values count by repr
    assert stitchbench.code_version(len) == stitchbench.code_version(len)  # no source: name and version


def test_job_key_is_stable_and_depends_on_every_part():
    k = stitchbench.job_key("x", a=1, b=[1, 2])
    assert k == stitchbench.job_key("x", b=[1, 2], a=1) and len(k) == 20
    assert k != stitchbench.job_key("x", a=1, b=[2, 1]) and k != stitchbench.job_key("y", a=1, b=[1, 2])


def test_job_errors_wraps_only_what_is_not_already_explained():
    with pytest.raises(JobError) as info, job_errors("matrix m", "lcka"):
        raise ZeroDivisionError("boom")
    assert str(info.value) == "job matrix m (plugin lcka) failed: ZeroDivisionError: boom"
    assert isinstance(info.value.cause, ZeroDivisionError)
    with pytest.raises(UsageError), job_errors("matrix m", "lcka"):
        raise UsageError("bad input")


def test_a_finished_job_is_found_by_key_and_a_failed_one_never(workspace):
    client = connection.connect(workspace)
    exp = connection.experiment_id(client, "jobs", workspace)
    with mlflow.start_run(experiment_id=exp):
        with job_run("a job", kind="thing", plugin="myplugin", key="k-done") as job:
            job.log_table({"answer": 42}, "out")
            job.log_metrics({"m": 1.5})
            job.log_state_dict({"w": __import__("torch").ones(2)}, "weights/state_dict.pt")
            assert find_finished_job("k-done") is None  # not complete until the block ends
        with pytest.raises(JobError) as info, job_run("a failing job", kind="thing", plugin="myplugin", key="k-fail"):
            raise RuntimeError("half-way")
    assert "job a failing job (plugin myplugin) failed: RuntimeError: half-way" in str(info.value)
    found = find_finished_job("k-done")
    assert found is not None and found.run_id == job.run_id and found.tags["stitchbench.plugin"] == "myplugin"
    assert found.read_json("out.json") == {"answer": 42} and found.metrics["m"] == 1.5
    assert found.load_state_dict("weights/state_dict.pt")["w"].tolist() == [1.0, 1.0]
    assert find_finished_job("k-fail") is None
    failed = client.search_runs([exp], "tags.`stitchbench.job_key` = 'k-fail'")
    assert [r.info.status for r in failed] == ["FAILED"]


def test_a_detector_key_changes_with_the_block_it_is_built_from(tmp_path, monkeypatch):
    """The detectors' key carries the code of the shared ResNet block (and their own), so
    editing the block trains them again instead of reusing detectors of the old block."""
    from stitchbench_plugins.evaluations.energy_ood import detectors

    before = detectors.detector_code_version((8, 4, 4))
    assert before == detectors.detector_code_version((8, 4, 4))
    (tmp_path / "other_blocks.py").write_text(textwrap.dedent('''
        from torch import nn

        class BasicBlock(nn.Module):
            """A residual block that computes something else."""
            def forward(self, x):
                return 2 * x
    '''))
    other = _load(tmp_path / "other_blocks.py", "other_blocks")
    monkeypatch.setattr(detectors, "BasicBlock", other.BasicBlock)
    assert detectors.detector_code_version((8, 4, 4)) != before
