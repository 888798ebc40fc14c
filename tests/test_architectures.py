"""The bundled architecture plugins ``resnet18`` and ``vit_tiny``: splitting, activations,
layer shapes, state-dict round trips, initialisation, parameter validation and tags."""

from __future__ import annotations

import subprocess
import sys

import pydantic
import pytest
import torch
from stitchbench_plugins.architectures import resnet18 as resnet18_module
from stitchbench_plugins.architectures import vit_tiny as vit_tiny_module
from stitchbench_plugins.architectures.resnet18 import ResNet18
from stitchbench_plugins.architectures.vit_tiny import ViTTiny
from torch import nn

from stitchbench.nn.network import StitchableNetwork

RESNET_NAMES = [
    "layer1.0",
    "layer1.1",
    "layer2.0",
    "layer2.1",
    "layer3.0",
    "layer3.1",
    "layer4.0",
    "layer4.1",
]

# Small settings that keep every test cheap; (plugin, params, image_shape).
SMALL = {
    "resnet18": (ResNet18(), {"width": 4}, (3, 16, 16)),
    "vit_tiny": (ViTTiny(), {"patch_size": 4, "width": 32, "depth": 3, "num_heads": 2}, (3, 16, 16)),
    "vit_digits": (ViTTiny(), {"patch_size": 2, "width": 32, "depth": 4, "num_heads": 2}, (1, 8, 8)),
}


def build(key: str, seed: int = 0, num_classes: int = 10) -> StitchableNetwork:
    plugin, params, shape = SMALL[key]
    torch.manual_seed(seed)
    return plugin.build(params, num_classes, shape).eval()


def randx(key: str, n: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SMALL[key][2], generator=g)


def perturb_batchnorm(net: nn.Module) -> None:
    """Give BN non-trivial running statistics and affine terms, so that eval-mode checks
    exercise them (a fresh BN is the identity up to eps)."""
    g = torch.Generator().manual_seed(2)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight.data, m.bias.data, m.running_mean):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2 + (1.0 if t is m.weight.data else 0.0))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


@pytest.mark.parametrize("key", list(SMALL))
def test_back_of_front_is_forward_at_every_layer(key: str) -> None:
    net = build(key)
    perturb_batchnorm(net)
    x = randx(key)
    with torch.no_grad():
        y = net(x)
        assert y.shape == (3, 10)
        for i, name in enumerate(net.layer_names):
            torch.testing.assert_close(net.back(net.front(x, i), i), y, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(net.back(net.front(x, name), name), y, rtol=1e-5, atol=1e-6)


def test_vit_split_equals_timm_model_exactly() -> None:
    from stitchbench_plugins.architectures._vit import TimmViT
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=3, num_heads=2
    ).eval()
    with torch.no_grad():  # non-trivial norms and tokens, so that each part matters
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    net = TimmViT.from_timm(vit).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        ref = vit(x)
        assert torch.equal(net(x), ref)
        for i in range(3):
            assert torch.equal(net.back(net.front(x, i), i), ref)
    # every timm parameter is owned once by the wrapper (none lost, none duplicated)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in vit.parameters())
    assert len(net.state_dict()) == len(vit.state_dict())


@pytest.mark.parametrize("key", list(SMALL))
def test_activations_one_pass_all_and_subset(key: str) -> None:
    net = build(key)
    x = randx(key)
    calls = {"stem": 0, "blocks": 0, "head": 0}

    def counter(name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            calls[name] += 1

        return hook

    net.stem.register_forward_hook(counter("stem"))
    net.head.register_forward_hook(counter("head"))
    for block in net.blocks:
        block.register_forward_hook(counter("blocks"))
    with torch.no_grad():
        acts = net.activations(x)
    assert calls == {"stem": 1, "blocks": len(net.layer_names), "head": 0}
    assert list(acts) == net.layer_names
    with torch.no_grad():
        for i, name in enumerate(net.layer_names):
            torch.testing.assert_close(acts[name], net.front(x, i), rtol=0, atol=0)

    subset = [net.layer_names[2], net.layer_names[0]]
    for k in calls:
        calls[k] = 0
    with torch.no_grad():
        some = net.activations(x, subset)
    assert set(some) == set(subset)
    assert calls["stem"] == 1 and calls["blocks"] == 3  # stops after the last requested layer
    torch.testing.assert_close(some[subset[0]], acts[subset[0]], rtol=0, atol=0)
    with torch.no_grad():
        by_index = net.activations(x, [1])
    assert list(by_index) == [net.layer_names[1]]


def test_resnet_layer_names_and_proportional_shapes() -> None:
    net = ResNet18().build({"width": 8}, 10, (3, 32, 32))
    assert net.layer_names == RESNET_NAMES
    w = 8
    expected = [(w, 32, 32)] * 2 + [(2 * w, 16, 16)] * 2 + [(4 * w, 8, 8)] * 2 + [(8 * w, 4, 4)] * 2
    assert list(net.layer_shapes((3, 32, 32)).values()) == expected
    assert net.head.fc.in_features == 8 * w


def test_resnet_paper_width_shapes_and_head() -> None:
    net = ResNet18().build(None, 10, (3, 32, 32)).eval()  # default width: 64
    with torch.no_grad():
        acts = net.activations(torch.rand(1, 3, 32, 32))
    shapes = [tuple(a.shape[1:]) for a in acts.values()]
    assert shapes == [(64, 32, 32)] * 2 + [(128, 16, 16)] * 2 + [(256, 8, 8)] * 2 + [(512, 4, 4)] * 2
    # the head is the original code's avg_pool2d(x, 4) + linear at 32x32
    h = acts["layer4.1"]
    ref = net.head.fc(nn.functional.avg_pool2d(h, 4).flatten(1))
    torch.testing.assert_close(net.head(h), ref)


def test_resnet_stem_and_input_channels() -> None:
    net = ResNet18().build({"width": 4}, 10, (1, 8, 8))
    conv = net.stem[0]
    assert isinstance(conv, nn.Conv2d)
    assert (conv.in_channels, conv.kernel_size, conv.stride) == (1, (3, 3), (1, 1))
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    shapes = list(net.layer_shapes((1, 8, 8)).values())
    assert shapes[0] == (4, 8, 8) and shapes[-1] == (32, 1, 1)
    assert net(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_resnet_imagenet_stem_is_torchvisions() -> None:
    """``stem: imagenet``: torchvision's 7x7/2 conv + BN + ReLU + 3x3/2 max-pool; 224 -> 56."""
    net = ResNet18().build({"stem": "imagenet"}, 1000, (3, 224, 224)).eval()
    conv, bn, relu, pool = net.stem
    assert isinstance(conv, nn.Conv2d) and conv.bias is None
    got = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
    assert got == (3, 64, (7, 7), (2, 2), (3, 3))
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU)
    assert isinstance(pool, nn.MaxPool2d)
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    with torch.no_grad():
        assert net.stem(torch.rand(1, 3, 224, 224)).shape == (1, 64, 56, 56)
    expected = [(64, 56, 56)] * 2 + [(128, 28, 28)] * 2 + [(256, 14, 14)] * 2 + [(512, 7, 7)] * 2
    assert list(net.layer_shapes((3, 224, 224)).values()) == expected
    assert net.layer_names == RESNET_NAMES


def test_resnet_imagenet_stem_matches_torchvision_state_dict() -> None:
    """Stem parameters and buffers of torchvision's ``resnet18()`` (conv1, bn1) have the
    shapes of ours (stem.0, stem.1), in order; so have the blocks and the classifier, and
    the parameter counts are equal."""
    torchvision = pytest.importorskip("torchvision")
    ref = torchvision.models.resnet18(weights=None, num_classes=1000)
    net = ResNet18().build({"stem": "imagenet"}, 1000, (3, 224, 224))
    ours = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    theirs = [(k, tuple(v.shape)) for k, v in ref.state_dict().items()]
    stem_ours = [(k, s) for k, s in ours if k.startswith("stem.")]
    stem_theirs = [(k, s) for k, s in theirs if k.startswith(("conv1.", "bn1."))]
    bn_keys = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert [k for k, _ in stem_theirs] == ["conv1.weight", *(f"bn1.{k}" for k in bn_keys)]
    assert [s for _, s in stem_ours] == [s for _, s in stem_theirs]
    assert stem_ours[0] == ("stem.0.weight", (64, 3, 7, 7))
    # the whole network: the same tensors (shapes, in order) under other names
    assert [s for _, s in ours] == [s for _, s in theirs]
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == sum(p.numel() for p in ref.parameters()) == 11_689_512
    n_stem = sum(p.numel() for p in net.stem.parameters())
    assert n_stem == ref.conv1.weight.numel() + ref.bn1.weight.numel() + ref.bn1.bias.numel() == 9536
    # and the same function: torchvision's weights loaded into ours give its outputs
    perturb_batchnorm(ref)
    ref.eval()
    net.eval()
    net.load_state_dict(dict(zip([k for k, _ in ours], ref.state_dict().values())), strict=True)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-4, atol=1e-5)


def test_resnet_cifar_stem_is_the_default() -> None:
    assert ResNet18.Params().stem == "cifar"
    net = ResNet18().build({"width": 4, "stem": "cifar"}, 10, (3, 16, 16))
    default = ResNet18().build({"width": 4}, 10, (3, 16, 16))
    assert [(k, v.shape) for k, v in net.state_dict().items()] == [
        (k, v.shape) for k, v in default.state_dict().items()
    ]
    assert not any(isinstance(m, nn.MaxPool2d) for m in default.modules())
    assert ResNet18().build({"width": 4, "stem": "imagenet"}, 10, (3, 16, 16)).layer_shapes((3, 16, 16))[
        "layer1.0"
    ] == (4, 4, 4)


def test_vit_layer_shapes() -> None:
    net = ViTTiny().build({"depth": 2}, 10, (3, 32, 32))  # ViT-Ti width, fewer blocks
    assert net.layer_names == ["blocks.0", "blocks.1"]
    assert list(net.layer_shapes((3, 32, 32)).values()) == [(65, 192)] * 2
    assert net.stem.patch_embed.proj.kernel_size == (4, 4)
    digits = build("vit_digits")
    assert digits.layer_names == [f"blocks.{i}" for i in range(4)]
    assert set(digits.layer_shapes((1, 8, 8)).values()) == {(17, 32)}


def test_vit_default_is_vit_ti() -> None:
    p = ViTTiny.Params()
    assert (p.image_size, p.patch_size, p.width, p.depth, p.num_heads, p.mlp_ratio) == (
        None,
        4,
        192,
        12,
        3,
        4.0,
    )
    assert ViTTiny.Params(embed_dim=64, num_heads=4).width == 64


@pytest.mark.parametrize("key", list(SMALL))
def test_state_dict_round_trip(key: str) -> None:
    net = build(key, seed=0)
    perturb_batchnorm(net)
    x = randx(key)
    state = net.state_dict()
    assert len(state) == len(set(state))
    fresh = build(key, seed=123)
    with torch.no_grad():
        assert not torch.allclose(fresh(x), net(x))
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))
        assert torch.equal(fresh.front(x, 1), net.front(x, 1))


def test_vit_state_dict_keys_are_registered_once() -> None:
    net = build("vit_tiny")
    keys = list(net.state_dict())
    assert "stem.cls_token" in keys and "stem.pos_embed" in keys and "head.fc.weight" in keys
    assert all(k.split(".")[0] in {"stem", "blocks", "head"} for k in keys)
    n_state = sum(t.numel() for t in net.state_dict().values())
    assert n_state == sum(p.numel() for p in net.parameters()) + sum(b.numel() for b in net.buffers())


@pytest.mark.parametrize("key", list(SMALL))
def test_same_seed_same_init(key: str) -> None:
    a, b, c = build(key, seed=7), build(key, seed=7), build(key, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_resnet_kaiming_init() -> None:
    torch.manual_seed(0)
    net = ResNet18().build({"width": 16}, 10, (3, 32, 32))
    conv = net.blocks[6].conv2  # 128 -> 128, 3x3: fan_out = 128 * 9
    expected_std = (2.0 / (128 * 9)) ** 0.5
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.05
    bn = net.blocks[0].bn1
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(
        bn.bias, torch.zeros_like(bn.bias)
    )


@pytest.mark.parametrize(
    "plugin, params, match",
    [
        (ResNet18(), {"width": 0}, "width"),
        (ResNet18(), {"widht": 8}, "widht"),
        (ResNet18(), {"stem": "tiny"}, "stem"),
        (ViTTiny(), {"width": 0}, "width"),
        (ViTTiny(), {"patch_size": 3, "image_size": 32}, "not divisible by patch_size"),
        (ViTTiny(), {"width": 32, "num_heads": 3}, "not divisible by num_heads"),
        (ViTTiny(), {"mlp_ratio": 0}, "mlp_ratio"),
    ],
)
def test_bad_params_are_rejected(plugin, params: dict, match: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=match):
        plugin.Params.model_validate(params)
    with pytest.raises(pydantic.ValidationError, match=match):
        plugin.build(params, 10, (3, 32, 32))


def test_vit_image_not_divisible_by_patch() -> None:
    with pytest.raises(ValueError, match=r"image size 30x30 is not divisible by patch_size 4"):
        ViTTiny().build({"depth": 1, "width": 16, "num_heads": 2}, 10, (3, 30, 30))
    with pytest.raises(ValueError, match=r"image_size 16 does not match the data's images \(32x32\)"):
        ViTTiny().build({"image_size": 16, "depth": 1}, 10, (3, 32, 32))
    net = ViTTiny().build({"image_size": 32, "depth": 1, "width": 16, "num_heads": 2}, 10, (3, 32, 32))
    assert net.layer_shapes((3, 32, 32))["blocks.0"] == (65, 16)


@pytest.mark.parametrize("key", ["resnet18", "vit_tiny"])
def test_layer_out_of_range(key: str) -> None:
    net = build(key)
    n = len(net.layer_names)
    x = randx(key, n=1)
    for bad in (n, -1):
        with pytest.raises(ValueError, match=rf"out of range.*0\.\.{n - 1}"):
            net.front(x, bad)
        with pytest.raises(ValueError, match=rf"out of range.*0\.\.{n - 1}"):
            net.back(x, bad)
    with pytest.raises(ValueError, match=rf"out of range.*0\.\.{n - 1}"):
        net.activations(x, [0, n])
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        net.front(x, "nope")


def test_tags() -> None:
    assert ResNet18().tag(ResNet18.Params()) == "resnet18-w64"
    assert ResNet18().tag({"width": 16}) == "resnet18-w16"
    assert ResNet18().tag({"width": 16, "stem": "cifar"}) == "resnet18-w16"  # names of existing networks
    assert ResNet18().tag({"stem": "imagenet"}) == "resnet18-w64-in"
    v = ViTTiny()
    assert v.tag(ViTTiny.Params()) == "vit_tiny-p4-w192-d12-h3"
    assert v.tag({"patch_size": 2, "width": 32, "depth": 4, "num_heads": 2}) == "vit_tiny-p2-w32-d4-h2"
    assert (
        v.tag({"image_size": 8, "patch_size": 2, "width": 48, "mlp_ratio": 2})
        == "vit_tiny-p2-w48-d12-h3-i8-m2"
    )


def test_plugins_register_themselves() -> None:
    got: list = []
    resnet18_module.register_architectures(register=got.append)
    vit_tiny_module.register_architectures(register=got.append)
    assert [(p.name, p.kind) for p in got] == [("resnet18", "architecture"), ("vit_tiny", "architecture")]
    assert all(p.describe() for p in got)
    assert all(isinstance(build(k), StitchableNetwork) for k in ("resnet18", "vit_tiny"))


def test_plugin_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import stitchbench_plugins.architectures.resnet18, stitchbench_plugins.architectures.vit_tiny\n"
        "heavy = [m for m in ('torch', 'timm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
