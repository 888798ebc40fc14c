"""How evaluations name a run's networks in the keys of their own jobs (detectors, probes).

The run's job key of the network when the core gives it (``RunContext.network_keys``),
else a hash of its weights and buffers (a context built by hand, e.g. in a notebook).
Imports neither torch nor numpy at module level.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any

_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fingerprint(net: Any) -> str:
    """A hash of a network's weights and buffers (names, dtypes, shapes, bytes). Cached per
    network object until one of its tensors is modified in place (torch's version counters)."""
    import torch

    state = net.state_dict()
    versions = tuple(t._version for t in state.values())
    hit = _FINGERPRINTS.get(net)
    if hit is not None and hit[0] == versions:
        return hit[1]
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    out = h.hexdigest()[:20]
    _FINGERPRINTS[net] = (versions, out)
    return out


def network_key(context: Any, model_name: str) -> str:
    """The job key of network ``model_name`` of the run, or ``weights:<hash>``."""
    key = (getattr(context, "network_keys", None) or {}).get(model_name)
    return key or "weights:" + fingerprint(context.networks[model_name])
