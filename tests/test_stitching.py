"""Core stitching mechanics: the stitching layer, the stitched network, freezing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stitchbench.nn.network import StitchableNetwork
from stitchbench.nn.stitching import StitchedNetwork, StitchingLayer, frozen, to_rows


class TinyConvNet(StitchableNetwork):
    def __init__(self, width: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()),
            nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU()),
        ])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 3))
        self.layer_names = ["b0", "b1"]


def test_conv_layer_resizes_then_maps_channels():
    layer = StitchingLayer((3, 2, 2), (5, 4, 4))
    assert layer.kind == "conv" and layer.resize_to == (4, 4)
    x = torch.randn(2, 3, 2, 2)
    assert layer(x).shape == (2, 5, 4, 4)
    w, b = torch.randn(5, 3), torch.randn(5)
    layer.set_affine(w, b)
    prepared = layer.prepare(x)
    expected = torch.einsum("oc,nchw->nohw", w, prepared) + b[None, :, None, None]
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.allclose(prepared, nn.functional.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False))


def test_token_layer_is_the_same_affine_map_on_every_token():
    layer = StitchingLayer((5, 3), (5, 2))
    w, b = torch.randn(2, 3), torch.randn(2)
    layer.set_affine(w, b)
    x = torch.randn(4, 5, 3)
    assert torch.allclose(layer(x), x @ w.T + b, atol=1e-6)
    with pytest.raises(ValueError, match="equal token counts"):
        StitchingLayer((5, 3), (6, 3))
    with pytest.raises(ValueError, match="cannot stitch"):
        StitchingLayer((5, 3), (2, 4, 4))
    with pytest.raises(ValueError, match="do not fit"):
        layer.set_affine(torch.randn(3, 3), torch.randn(3))


def test_rows_are_channels_last():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    r = to_rows(x)
    assert r.shape == (8, 3)
    assert torch.equal(r[1], x[0, :, 0, 1])


def test_frozen_restores_each_flag():
    net = TinyConvNet()
    net.head[2].weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in net.named_parameters()}
    with frozen(net):
        assert not any(p.requires_grad for p in net.parameters())
    assert {n: p.requires_grad for n, p in net.named_parameters()} == before
    with pytest.raises(RuntimeError), frozen(net):
        raise RuntimeError("boom")
    assert {n: p.requires_grad for n, p in net.named_parameters()} == before


def test_stitched_network_keeps_halves_in_eval_and_uses_each_network():
    torch.manual_seed(0)
    a, b = TinyConvNet(), TinyConvNet()
    layer = StitchingLayer((4, 8, 8), (8, 4, 4))
    s = StitchedNetwork(a, "b0", layer, b, "b1")
    s.train()
    assert s.stitch.training and not a.training and not b.training
    x = torch.randn(3, 1, 8, 8)
    out = s(x)
    assert torch.allclose(out, b.back(layer(a.front(x, "b0")), "b1"))
    # The target's back half matters, the source's layers after the cut do not.
    with torch.no_grad():
        b.head[2].weight.add_(1.0)
    assert not torch.allclose(s(x), out)
    with torch.no_grad():
        a.blocks[1][0].weight.mul_(0)
    out2 = s(x)
    with torch.no_grad():
        a.blocks[1][0].weight.add_(3.0)
    assert torch.equal(s(x), out2)
