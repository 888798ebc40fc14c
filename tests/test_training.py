"""Base-network training: seeded and deterministic on CPU, across processes; divergence
stops with a clear message."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import stitchbench
from stitchbench.errors import DivergenceError
from stitchbench.nn.data import LoadedDataset, TensorSplit
from stitchbench.nn.training import accuracy, train_classifier
from stitchbench.run.config import TrainingConfig

SCRIPT = """
import hashlib, torch, stitchbench
from stitchbench.run.config import TrainingConfig
from stitchbench.nn.training import train_classifier
ds = stitchbench.get_plugin("digits")
data = ds.load(ds.Params(), None)
for name, params in {archs!r}:
    arch = stitchbench.get_plugin(name)
    torch.manual_seed(3)
    net = arch.build(arch.Params(**params), 10, (1, 8, 8))
    train_classifier(net, data, TrainingConfig(epochs=1, batch_size=128, lr=0.003, augment=False), seed=3,
                     device=torch.device("cpu"))
    print(name, hashlib.sha256(b"".join(v.numpy().tobytes() for v in net.state_dict().values())).hexdigest())
"""
ARCHS = [("resnet18", {"width": 4}), ("vit_tiny", {"patch_size": 2, "width": 16, "depth": 2, "num_heads": 2})]


def test_training_is_deterministic_across_processes():
    """Each architecture trained in two fresh processes (at once) ends with the same bits."""
    code = SCRIPT.format(archs=ARCHS)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={"STITCHBENCH_PROGRESS": "off", "PATH": ""}) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    first, second = (out.split() for out, _ in outs)
    assert first == second and first[0::2] == [name for name, _ in ARCHS] and all(len(h) == 64 for h in first[1::2])


def test_non_finite_loss_stops_training_with_a_clear_message():
    images = torch.rand(64, 1, 8, 8)
    images[5, 0, 3, 3] = float("nan")
    data = LoadedDataset("bad", 10, (1, 8, 8), TensorSplit(images, torch.arange(64) % 10),
                         TensorSplit(images[:8], torch.arange(8)))
    arch = stitchbench.get_plugin("resnet18")
    net = arch.build(arch.Params(width=4), 10, (1, 8, 8))
    with pytest.raises(DivergenceError, match="training loss became nan in epoch 1"):
        train_classifier(net, data, TrainingConfig(epochs=1, batch_size=64), seed=0, device=torch.device("cpu"))


def test_training_learns_digits():
    ds = stitchbench.get_plugin("digits")
    data = ds.load(ds.Params(), None)
    arch = stitchbench.get_plugin("resnet18")
    torch.manual_seed(0)
    net = arch.build(arch.Params(width=8), 10, (1, 8, 8))
    before = accuracy(net, data, device=torch.device("cpu"))
    history = train_classifier(net, data, TrainingConfig(epochs=3, batch_size=64, lr=0.003, augment=False),
                               seed=0, device=torch.device("cpu"))
    assert [sorted(h) for h in history] == [["loss", "test_accuracy", "train_accuracy"]] * 3
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["test_accuracy"] > max(0.5, before)
