"""Conformance checks of architectures and similarity indices on tiny synthetic inputs.

A run makes them when it loads these plugins, before any heavy work (``--dry-run`` too),
so a broken plugin fails in a second with a message saying what is wrong rather than
after training, or never. ``stitchbench plugins check`` and
`stitchbench.testing.check_plugin` run them too, with the checks of the other kinds.
Each function returns the problems it found, one sentence each ([] when none).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import PluginError
from . import boundary

#: Agreement expected of values that must be equal (symmetry, identical inputs).
TOL = 1e-6


def architecture_problems(arch: Any, params: Any, num_classes: int, image_shape: Sequence[int], *,
                          every_layer: bool = True) -> list[str]:
    """Build one network with ``params`` (seeded) and check it (`network_problems`; a run
    checks with ``every_layer=False``, `plugins check` every layer)."""
    return checked_network(arch, params, num_classes, image_shape, every_layer=every_layer)[1]


def checked_network(arch: Any, params: Any, num_classes: int, image_shape: Sequence[int], *,
                    every_layer: bool = True) -> tuple[Any, list[str]]:
    """(the network ``arch`` builds with ``params``, seeded with 0, in eval mode, or None
    when ``build`` raised; its problems)."""
    import torch

    from ..nn.conformance import network_problems

    torch.manual_seed(0)
    try:
        net = arch.build(params, num_classes, tuple(image_shape))
    except Exception as e:  # noqa: BLE001 - the plugin's code raised
        return None, [f"build(params, {num_classes}, {tuple(image_shape)}) raised {type(e).__name__}: {e}"]
    return net, network_problems(net, num_classes, image_shape, batch=2 if every_layer else 1,
                                 every_layer=every_layer)


def synthetic_pair(n: int = 48, p1: int = 6, p2: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, C): A (n, p1); B (n, p2) a noisy linear image of A; C (n, p2) independent."""
    rs = np.random.RandomState(seed)
    A = rs.randn(n, p1)
    B = A @ rs.randn(p1, p2) + 0.3 * rs.randn(n, p2)
    C = rs.randn(n, p2)
    return A, B, C


def index_problems(index: Any, params: Any = None, *, thorough: bool = False) -> list[str]:
    """Check a similarity index on synthetic data: ``compute`` returns one finite float for
    feature and conv-map inputs; identical inputs give the index's best value (0 for a
    distance, at least the value of any other pair for a similarity); ``compute(A, B) ==
    compute(B, A)`` unless the index sets ``symmetric = False``; ``matrix`` returns the
    (sources x targets) values. ``thorough`` adds torch inputs and ``matrix``/``compute``
    agreement."""
    problems: list[str] = []
    if not isinstance(getattr(index, "higher_is_more_similar", None), bool):
        return ["higher_is_more_similar must be a bool (True: a similarity, False: a distance)"]
    A, B, C = synthetic_pair()

    def value(a: Any, b: Any, what: str) -> float | None:
        try:
            return boundary.index_value(index, a, b, params)
        except PluginError as e:
            problems.append(f"on {what}: {str(e).split(': ', 1)[-1]}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"compute() on {what} raised {type(e).__name__}: {e}")
        return None

    ab = value(A, B, "related (48, 6) and (48, 5) arrays")
    aa = value(A, A, "two identical (48, 6) arrays")
    ac = value(A, C, "independent (48, 6) and (48, 5) arrays")
    if None not in (ab, aa, ac):
        if index.higher_is_more_similar:
            if aa < max(ab, ac) - TOL * max(1.0, abs(aa)):
                problems.append(f"identical inputs score {aa:.6g}, below other pairs ({ab:.6g}, {ac:.6g}): a "
                                "similarity should be largest for identical representations")
        elif abs(aa) > TOL * max(1.0, abs(ab)):
            problems.append(f"identical inputs give distance {aa:.6g}, not 0")
        if getattr(index, "symmetric", True):
            ba = value(B, A, "the pair swapped")
            if ba is not None and abs(ab - ba) > TOL * max(1.0, abs(ab)):
                problems.append(f"compute(A, B) = {ab:.6g} but compute(B, A) = {ba:.6g}; set `symmetric = False` "
                                "on the index if that is intended")
    rs = np.random.RandomState(1)
    conv_a, conv_b = rs.randn(24, 3, 2, 2), rs.randn(24, 2, 2, 2)
    value(conv_a, conv_b, "(24, 3, 2, 2) and (24, 2, 2, 2) conv maps")
    problems += _matrix_problems(index, params, [A, B], [B, A, C], thorough)
    if thorough and ab is not None:
        import torch

        tab = value(torch.from_numpy(A).float(), torch.from_numpy(B).float(), "float32 torch tensors")
        if tab is not None and abs(tab - ab) > 1e-3 * max(1.0, abs(ab)):
            problems.append(f"torch float32 input gives {tab:.6g}, numpy float64 gives {ab:.6g}")
    return problems


def _matrix_problems(index: Any, params: Any, sources: list[np.ndarray], targets: list[np.ndarray],
                     thorough: bool) -> list[str]:
    from ..plugin.types import IndexContext

    rs = np.random.RandomState(2)
    train = {side: [rs.randn(64, *a.shape[1:]) for a in arrays]
             for side, arrays in (("source", sources), ("target", targets))}
    ctx = IndexContext(params=params, same_network=False,
                       train_sample=(lambda side, n: [t[:n] for t in train[side]])
                       if getattr(index, "needs_train_activations", False) else None)
    try:
        values = boundary.index_matrix(index, sources, targets, ctx)
    except PluginError as e:
        return [str(e).split(": ", 1)[-1]]
    except Exception as e:  # noqa: BLE001
        return [f"matrix() on 2 source and 3 target layers raised {type(e).__name__}: {e}"]
    if not thorough or getattr(index, "needs_train_activations", False):
        return []
    for i, a in enumerate(sources):
        for j, b in enumerate(targets):
            try:
                single = boundary.index_value(index, a, b, params)
            except Exception:  # noqa: BLE001 - reported by the compute checks
                return []
            if abs(single - values[i, j]) > 1e-6 * max(1.0, abs(single)):
                return [f"matrix() cell ({i}, {j}) is {values[i, j]:.8g} but compute() of that pair is {single:.8g}"]
    return []
