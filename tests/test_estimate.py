"""Compute estimates of a plan (``--dry-run``): data set info, per-plugin costs, GPU-hours."""

from __future__ import annotations

import json

import pytest

import stitchbench
from stitchbench.errors import UsageError
from stitchbench.plugin.manager import load_plugins
from stitchbench.run.config import build_config
from stitchbench.run.estimate import ASSUMED, Throughput, estimate, load_throughputs
from stitchbench.run.plan import make_plan


def test_dataset_info_matches_what_load_returns():
    for params in ({}, {"test_fraction": 0.3}):
        plugin = stitchbench.get_plugin("digits")
        info, data = plugin.info(params), plugin.load(params, None)
        assert (info.n_train, info.n_test) == (len(data.train), len(data.test))
        assert info.num_classes == data.num_classes and info.image_shape == tuple(data.image_shape)
    info = stitchbench.get_plugin("cifar10").info({"limit_train": 500})
    assert (info.n_train, info.n_test, info.image_shape) == (500, 10_000, (3, 32, 32))
    assert stitchbench.get_plugin("imagenet").info({"image_size": 64}).image_shape == (3, 64, 64)


def test_throughput_scales_with_pixels_and_reads_measured_files(tmp_path):
    t = Throughput(32, 4000.0, 12000.0, 3000.0)
    half = t.at_side(64)
    assert half.train == pytest.approx(1000.0) and half.tlm == pytest.approx(750.0)
    path = tmp_path / "tp.json"
    path.write_text(json.dumps({"device": "NVIDIA H100", "architectures": {"resnet18": {
        "side": 32, "train_images_per_s": 10000, "forward_images_per_s": 30000, "tlm_images_per_s": 8000}}}))
    got = load_throughputs(path)
    assert got["resnet18"].measured and got["resnet18"].device == "NVIDIA H100" and got["resnet18"].tlm == 8000
    assert not got["vit_tiny"].measured and got["vit_tiny"].train == ASSUMED["vit_tiny"]["train"]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UsageError, match="not a throughput file"):
        load_throughputs(tmp_path / "bad.json")
    with pytest.raises(UsageError, match="no such file"):
        load_throughputs(tmp_path / "missing.json")


def test_quick_plan_estimate_counts_every_job_and_sums_its_parts():
    plugins = load_plugins()
    plan = make_plan(build_config("quick"), plugins)
    info = plan.dataset.obj.info(plan.dataset.params)
    t = Throughput(32, 4000.0, 12000.0)
    est = estimate(plan, info, {"resnet18": t})
    by = {x.what: x for x in est.lines}
    cells = len(plan.layers) ** 2
    assert by["dm stitchers"].jobs == by["tlm stitchers"].jobs == 3 * cells  # 2 intra + 1 inter
    assert by["train resnet18 networks"].jobs == 2
    assert all(x.hours is not None and x.hours >= 0 for x in est.lines)  # every bundled plugin estimates
    assert by["tlm stitchers"].hours > by["dm stitchers"].hours  # epochs of training vs forward passes
    assert by["energy_ood: OOD detectors (pre-train + fine-tune)"].jobs == 2 * len(plan.layers)
    assert est.hours == pytest.approx(sum(x.hours for x in est.lines))
    # twice the throughput, half the time
    fast = estimate(plan, info, {"resnet18": Throughput(32, 8000.0, 24000.0)})
    assert fast.hours == pytest.approx(est.hours / 2)
    text = est.describe()
    assert "ASSUMED, not measured" in text and "GPU-" in text


PAPER_PRESETS = [
    "paper-table1-resnet18", "paper-table1-vit", "paper-ood-cifar10-resnet18", "paper-ood-cifar10-vit",
    *[f"paper-ding-{d}-{a}" for d in ("cifar10", "svhn", "imagenet") for a in ("resnet18", "vit")],
]


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_every_paper_preset_dry_runs_without_data_and_prints_jobs_and_gpu_hours(preset, workspace, capsys, monkeypatch):
    import re

    from stitchbench.cli import main

    monkeypatch.chdir(workspace)
    assert main(["run", "--preset", preset, "--dry-run"]) == 0
    out = capsys.readouterr().out
    jobs = re.search(r"^jobs: +(\d+) network\(s\), (\d+) matrix job\(s\) \((\d+) stitchers\)", out, re.MULTILINE)
    est = re.search(r"^estimate: +(\d+) job\(s\), about ([\d,.]+) GPU-(hours|minutes)", out, re.MULTILINE)
    assert jobs and est, out[-2000:]
    assert int(jobs.group(1)) == (5 if "imagenet" in preset else 10)
    assert float(est.group(2).replace(",", "")) > 0
    assert "needs:      --data-dir DIR" in out and "ASSUMED, not measured" in out
    assert not (workspace / "mlruns" / "mlflow.db").exists()  # a dry run logs nothing


def test_table1_presets_plan_the_papers_22880_stitchers(workspace, capsys, monkeypatch):
    import re

    from stitchbench.cli import main

    monkeypatch.chdir(workspace)
    total = 0
    for preset in ("paper-table1-resnet18", "paper-table1-vit"):
        assert main(["run", "--preset", preset, "--dry-run"]) == 0
        total += int(re.search(r"\((\d+) stitchers\)", capsys.readouterr().out).group(1))
    assert total == 22_880  # paper, "Table 1 alone requires computing 22,880 stitching transformations"
