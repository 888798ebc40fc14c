"""Configuration: presets, files, overrides, and the errors bad input gets."""

from __future__ import annotations

import json

import pytest

from stitchbench.cli import main
from stitchbench.errors import ConfigError, UsageError
from stitchbench.run.config import apply_override, build_config, preset_names

from .conftest import cli

PAPER_PRESETS = [
    "paper-table1-resnet18", "paper-table1-vit", "paper-ood-cifar10-resnet18", "paper-ood-cifar10-vit",
    *[f"paper-ding-{d}-{a}" for d in ("cifar10", "svhn", "imagenet") for a in ("resnet18", "vit")],
]


def test_every_preset_validates():
    assert {"quick", "quick-vit", *PAPER_PRESETS} <= set(preset_names())
    for name in preset_names():
        cfg = build_config(name)
        assert cfg.name == name


def test_paper_presets_carry_the_paper_settings():
    cfg = build_config("paper-table1-resnet18")
    assert cfg.dataset.name == "cifar10" and cfg.networks.count == 10
    assert cfg.networks.architecture.params == {"width": 64}
    assert cfg.stitching.params["dm"]["k"] == 100 and cfg.stitching.params["tlm"]["epochs"] == 30
    assert cfg.indices.n_examples == 1000 and set(cfg.requires) == {"gpu", "data_dir"}
    vit = build_config("paper-table1-vit")
    assert vit.networks.architecture.params == {"image_size": 32, "patch_size": 4, "width": 192, "depth": 12,
                                                "num_heads": 3}
    assert build_config("paper-ding-imagenet-resnet18").networks.count == 5


def test_overrides_parse_values_as_yaml():
    cfg = build_config("quick", overrides=["networks.count=3", "stitching.layers=[0, 7]", "indices.names=null",
                                           "networks.training.lr=0.01", "stitching.params.tlm.epochs=1"])
    assert cfg.networks.count == 3 and cfg.stitching.layers == [0, 7] and cfg.indices.names is None
    assert cfg.networks.training.lr == 0.01 and cfg.stitching.params["tlm"]["epochs"] == 1
    with pytest.raises(UsageError, match="expected dotted.key=value"):
        apply_override({}, "networks.count")


def test_config_files_yaml_and_toml(tmp_path):
    y = tmp_path / "mine.yaml"
    y.write_text("networks:\n  count: 3\nstitching:\n  layers: [1, 2]\n")
    cfg = build_config(config_file=y)
    assert cfg.networks.count == 3 and cfg.stitching.layers == [1, 2] and cfg.name == "mine"
    t = tmp_path / "other.toml"
    t.write_text('preset = "quick-vit"\n[networks]\ncount = 4\n')
    cfg = build_config(config_file=t)
    assert cfg.networks.count == 4 and cfg.networks.architecture.name == "vit_tiny"


def test_changing_a_plugin_name_drops_the_old_params(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("networks:\n  architecture: {name: vit_tiny}\n")
    assert build_config(config_file=y).networks.architecture.params == {}


@pytest.mark.parametrize(
    "override, message",
    [
        ("networks.trainng.epochs=3", "networks.trainng: unknown key (misspelt?)"),
        ("networks.count=two", "networks.count: Input should be a valid integer"),
        ("networks.training.epochs=-1", "networks.training.epochs: Input should be greater than or equal to 0"),
        ("device=gpu", "device: Input should be 'cpu', 'cuda' or 'auto'"),
    ],
)
def test_bad_values_name_the_dotted_path(override, message):
    with pytest.raises(ConfigError) as e:
        build_config("quick", overrides=[override])
    assert message in str(e.value)


def test_unknown_preset():
    with pytest.raises(UsageError, match="unknown preset 'quik'; presets are: .*quick"):
        build_config("quik")


# -- the same through the command line: exit 2, a clear message, no traceback -------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--set", "networks.trainng.epochs=1"], "networks.trainng: unknown key"),
        (["--set", "networks.training.epochs=-2"], "networks.training.epochs"),
        (["--set", "networks.count=x"], "networks.count"),
        (["--set", "stitching.layers=[0, 8]"], "layer 8 is out of range: resnet18 has 8 stitchable layers (0..7"),
        (["--plugin", "tlmm"], "unknown plugin 'tlmm'"),
        (["--set", "stitching.matchers=[dmm]"], "unknown matcher 'dmm'; known matchers: dm, tlm"),
        (["--set", "stitching.params.tlm.epochs=-1"], "stitching.params.tlm.epochs"),
        (["--set", "stitching.params.tlm.epoch=3"], "stitching.params.tlm.epoch: unknown key"),
        (["--set", "dataset.name=noise"], "auxiliary out-of-distribution set"),
        (["--config", "/nonexistent/c.yaml"], "does not exist"),
    ],
)
def test_cli_bad_input_exits_2(workspace, capsys, args, needle):
    # in-process for speed; tests/test_plugins.py and test_run_e2e.py drive the real command
    code = main(["run", "--dry-run", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err
    assert "Traceback" not in err
    assert not (workspace / "mlruns" / "mlflow.db").exists()


def test_data_dir_missing_or_without_the_data(workspace, tmp_path, capsys):
    # a real run (a dry run does not read the data): stopped before the store is created
    code = main(["run", "--set", "dataset.name=cifar10"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "--data-dir" in err
    empty = tmp_path / "data"
    empty.mkdir()
    code = main(["run", "--set", "dataset.name=cifar10", "--data-dir", str(empty)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert str(empty) in err
    assert not (workspace / "mlruns" / "mlflow.db").exists()
    # the dry run plans without the data and says what the real run needs
    assert main(["run", "--dry-run", "--set", "dataset.name=cifar10"]) == 0
    assert "needs:      --data-dir DIR" in capsys.readouterr().out


def test_dry_run_prints_the_plan(workspace, cli_here):
    p = cli("run", "--dry-run", cwd=workspace)  # the installed command
    assert p.returncode == 0, p.stderr
    assert "digits-resnet18-w16-seed0" in p.stdout and "layer4.1" in p.stdout
    assert "stitch_matrix" in p.stdout and "experiment: quick" in p.stdout
    p = cli_here("run", "--dry-run", "--plugin", "tlm", cwd=workspace)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if "_matrix" in ln]
    assert lines and all("tlm [" in ln for ln in lines)
    assert "evaluations: layer_identification" in p.stdout
    assert not (workspace / "mlruns" / "mlflow.db").exists()


def test_config_command_prints_a_resolved_preset(workspace):
    p = cli("config", "--preset", "paper-table1-vit", "--format", "json", cwd=workspace)
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["networks"]["architecture"]["name"] == "vit_tiny" and data["networks"]["count"] == 10
    p = cli("presets", cwd=workspace)
    assert p.returncode == 0 and "paper-ding-svhn-vit" in p.stdout


def test_a_closed_pipe_ends_a_command_quietly(tmp_path):
    """`stitchbench presets | head -1`: no traceback when the reader stops early."""
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("stitchbench")
    p = subprocess.run(f"'{exe}' presets | head -1", shell=True, cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, check=False)
    assert p.stdout.count("\n") == 1 and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
