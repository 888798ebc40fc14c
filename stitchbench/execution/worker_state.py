"""What a process that computes jobs keeps between them.

The driver (with the local executor) and every Ray worker process hold one `WorkerState`:
the networks built so far, by network job key, and one activation cache and per-index
scratch space shared by the jobs that run there. So the jobs of one process share one
forward pass per network, as the local executor always did, and a Ray worker that gets
several jobs on the same network builds it and extracts its activations once.

A network's key is a hash of everything that determines its weights, so a network found
here under a key is the network of that key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..nn.activations import ActivationCache
from ..nn.network import StitchableNetwork


@dataclass
class NetworkResult:
    """A trained (or reused) base network as plain data, what jobs pass between them.

    ``state_dict``: CPU tensors, or None when the network is known to be in the process
    state already (the local executor's reused networks). ``history``: one metrics dict
    per training epoch (empty for a reused network)."""

    key: str
    model_name: str
    seed: int
    test_accuracy: float
    state_dict: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class NetworkInput:
    """A base network as an evaluation's task takes it (`RunContext.network_input`): the
    architecture that builds it and its `NetworkResult`. In a task, ``network(data,
    device)`` returns the network (built once per process, in eval mode) and
    ``activations(data, split)`` every stitchable layer's activations of a split (extracted
    once per process and shared with the other jobs there)."""

    architecture: Any
    result: NetworkResult

    @property
    def model_name(self) -> str:
        return self.result.model_name

    @property
    def key(self) -> str:
        return self.result.key

    def network(self, data: Any, device: Any = "cpu") -> StitchableNetwork:
        return state().network(self.architecture, self.result, data, torch.device(device))

    def activations(self, data: Any, split: str = "test", n: int | None = None, device: Any = "cpu",
                    seed: int = 0) -> dict[str, torch.Tensor]:
        """Per-layer activations of the first ``n`` examples of ``split`` of ``data`` (the
        run's data set; ``train_sample`` is the training split in the order fixed by
        ``seed``)."""
        return state().cache.all_layers(self.network(data, device), split, n, data, seed)


class WorkerState:
    """Networks by key, one activation cache, per-index scratch (see the module docstring)."""

    def __init__(self) -> None:
        self.networks: dict[str, StitchableNetwork] = {}
        self.cache = ActivationCache()
        self.index_shared: dict[str, dict[Any, Any]] = {}

    def network(self, architecture: Any, net: NetworkResult, data: Any, device: torch.device) -> StitchableNetwork:
        """The network of ``net``, in eval mode on ``device``: the one built here before, or
        built by ``architecture`` (a `PluginUse`) from ``net.state_dict``."""
        found = self.networks.get(net.key)
        if found is not None:
            return found
        if net.state_dict is None:
            raise RuntimeError(f"network {net.model_name} (key {net.key}) was passed without its weights")
        built = build_network(architecture, net.seed, data, device)
        built.load_state_dict(net.state_dict)
        built.eval()
        self.networks[net.key] = built
        return built

    def add(self, key: str, net: StitchableNetwork) -> None:
        self.networks[key] = net


def build_network(architecture: Any, seed: int, data: Any, device: torch.device) -> StitchableNetwork:
    """A fresh network of ``architecture`` (a `PluginUse`), initialised from ``seed``."""
    torch.manual_seed(seed)
    net = architecture.obj.build(architecture.params, data.num_classes, tuple(data.image_shape))
    return net.to(device)


_STATE: WorkerState | None = None


def state() -> WorkerState:
    """This process's state (created on first use)."""
    global _STATE
    if _STATE is None:
        _STATE = WorkerState()
    return _STATE


def reset() -> WorkerState:
    """A fresh state for this process (the driver calls it when a run starts)."""
    global _STATE
    _STATE = WorkerState()
    return _STATE


def clear() -> None:
    """Drop this process's state (and the memory it holds)."""
    global _STATE
    _STATE = None
