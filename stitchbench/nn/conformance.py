"""What every stitchable network must satisfy, checked on a tiny input.

`network_problems` returns what is wrong with a network an architecture built (empty: it
conforms). A run checks the architecture this way before it trains anything (also with
``--dry-run``), and ``stitchbench plugins check`` / `stitchbench.testing.check_plugin` do
too. The checks catch what otherwise trains silently to chance accuracy: a block kept in a
Python list (its parameters are not the network's, so the optimiser never sees them),
``layer_names`` that do not match the blocks, ``front``/``back`` that do not compose to
the forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .network import StitchableNetwork

#: Relative tolerance of "equal" outputs (float32 forward passes that differ in grouping).
RTOL = 1e-4


def network_problems(net: Any, num_classes: int, image_shape: Sequence[int], *, batch: int = 2,
                     every_layer: bool = True) -> list[str]:
    """Everything that is wrong with ``net``, one sentence each; [] when it conforms.

    Checked on ``batch`` random inputs of ``image_shape``, in eval mode, on the network's
    device: it is a `StitchableNetwork` with unique ``layer_names``; with the default
    ``front``/``back``, ``blocks`` is an ``nn.ModuleList`` with one block per name; every
    parameter the forward pass uses is registered (reachable by ``net.parameters()``);
    ``forward`` gives (batch, num_classes) logits; ``activations`` gives every layer and
    equals ``front`` at each; ``back(front(x, i), i)`` equals ``forward(x)`` at each layer.
    ``every_layer=False`` checks the last two views at the first and the last layer only
    (a few forward passes in all, what a run checks before it starts; paper-size
    networks take seconds per pass on a CPU).
    """
    if not isinstance(net, StitchableNetwork):
        what = "an nn.Module" if isinstance(net, nn.Module) else type(net).__name__
        return [(f"build() returned {type(net).__name__} ({what}), not a stitchbench.StitchableNetwork: subclass it "
                "and set stem, blocks (an nn.ModuleList), head and layer_names, or implement front/back/activations")]
    problems: list[str] = []
    names = list(getattr(net, "layer_names", None) or [])
    if not names or not all(isinstance(n, str) and n for n in names):
        return [(f"layer_names is {getattr(net, 'layer_names', None)!r}: set it to the ordered names of the "
                "stitchable layers (non-empty strings)")]
    if len(set(names)) != len(names):
        problems.append(f"layer_names repeats a name: {names}")
    cls = type(net)
    default_split = all(getattr(cls, m) is getattr(StitchableNetwork, m) for m in ("front", "back"))
    if default_split:
        blocks = getattr(net, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            problems.append(
                f"blocks is a {type(blocks).__name__}, not an nn.ModuleList: a Python list hides the blocks' "
                "parameters from the network (they would never be trained or saved); use "
                "nn.ModuleList([...])")
        elif len(blocks) != len(names):
            problems.append(f"layer_names has {len(names)} names but blocks has {len(blocks)} blocks: the default "
                            "front/back need one name per block")
        for part in ("stem", "head"):
            if not isinstance(getattr(net, part, None), nn.Module):
                problems.append(f"{part} is {type(getattr(net, part, None)).__name__}, not an nn.Module")
    if problems:
        return problems
    try:
        params = list(net.parameters())
    except Exception as e:  # noqa: BLE001
        return [f"parameters() failed: {type(e).__name__}: {e}"]
    if not any(p.requires_grad for p in params):
        problems.append("the network has no trainable parameters (are its layers kept in a plain list or dict?)")
    device = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params and params[0].is_floating_point() else torch.float32
    was_training = net.training
    net.eval()
    try:
        x = torch.randn(batch, *image_shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        logits = net(x)  # with autograd: its graph shows the parameters the pass uses
        problems += _unregistered_parameters(logits, params)
        with torch.no_grad():
            problems += _views_agree(net, x, logits.detach() if isinstance(logits, torch.Tensor) else logits, names,
                                     num_classes, names if every_layer else list(dict.fromkeys([names[0], names[-1]])))
    except Exception as e:  # noqa: BLE001 - the plugin's own code raised: report it as a problem
        problems.append(f"a pass on a ({batch}, {', '.join(map(str, image_shape))}) input raised "
                        f"{type(e).__name__}: {e}")
    finally:
        net.train(was_training)
    return problems


def _unregistered_parameters(out: Any, params: list[torch.Tensor]) -> list[str]:
    """Leaf tensors that need a gradient, fed the forward pass that gave ``out``, and are
    not parameters of the network: parameters of modules kept outside the module tree."""
    if not isinstance(out, torch.Tensor) or out.grad_fn is None:
        return []
    registered = {id(p) for p in params}
    seen: set[int] = set()
    stack = [out.grad_fn]
    foreign = 0
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)  # AccumulateGrad: a leaf that will get a gradient
        if var is not None and id(var) not in registered:
            foreign += 1
        stack.extend(nxt for nxt, _ in fn.next_functions)
    if foreign:
        return [(f"{foreign} tensor(s) that need a gradient take part in forward() but are not parameters of the "
                "network: a layer kept in a Python list, dict or plain attribute of a non-Module is never trained "
                "or saved (use nn.ModuleList / nn.ModuleDict)")]
    return []


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return a.shape == b.shape and float((a - b).abs().max()) <= RTOL * max(scale, 1.0)


def _views_agree(net: StitchableNetwork, x: torch.Tensor, logits: Any, names: list[str], num_classes: int,
                 checked: list[str]) -> list[str]:
    problems = []
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (len(x), num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        return [f"forward() returned {shape}; expected logits of shape ({len(x)}, {num_classes})"]
    acts = net.activations(x, names)
    if not isinstance(acts, dict) or set(acts) != set(names):
        got = sorted(acts) if isinstance(acts, dict) else type(acts).__name__
        return [f"activations(x, layer_names) returned {got}; expected one entry per layer name {names}"]
    for name in checked:
        i = names.index(name)
        h = net.front(x, name)
        if not isinstance(h, torch.Tensor) or h.ndim not in (2, 3, 4) or h.shape[0] != len(x):
            shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            problems.append(f"front(x, {name!r}) returned {shape}; expected (N, C, H, W), (N, T, D) or (N, D)")
            continue
        if not _close(acts[name], h):
            problems.append(f"activations(x)[{name!r}] differs from front(x, {name!r})")
        if not _close(net.back(h, name), logits):
            problems.append(f"back(front(x, {name!r}), {name!r}) differs from forward(x): front and back must split "
                            "the network exactly at the layer")
        if i == 0 and net.front(x, i).shape != h.shape:
            problems.append(f"front(x, {i}) and front(x, {name!r}) differ: a layer's index and name must agree")
    return problems
