"""d(A, B) of Ding et al.'s tests for every measure: similarity indices through their
plugins (a similarity s becomes 1 − s), DM(func.) through the ``dm`` plugin and a
stitched network.

Every index arranges the representations by its own rules. The indices see a low-rank B
as its rank-r approximation, with the shape of the layer, except in two places where its
coordinates in the kept subspace (the same information, exactly rank r) are used: the
measures fitted from B to A (DM), and PWCCA in a set of low-rank approximations, which
uses the plugin's ``convention="ding"`` (Ding et al.'s weights; rank-deficient sides
allowed, where the default convention refuses them) in float64, compared per position
(``arrangement="positions"``) as the reference rule compares a layer with itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from stitchbench import IndexContext, RunContext, StitchedNetwork, StitchingLayer, iterate_batches

from .representations import Rep
from .threads import one_cpu_thread

log = logging.getLogger(__name__)

#: Measures fitted from B to A (the source is the representation compared with the
#: reference, as in the DM stitch of the sensitivity test); every other index gets (A, B).
FROM_B_TO_A = frozenset({"dm_struct", "dm_func"})


def _dm_params(context: RunContext) -> Any:
    params = context.params_of("dm")
    return params.model_copy(update={"rank": None, "target_rank": None})  # the low-rank source is given explicitly


def _test(context: RunContext, rep: Rep) -> torch.Tensor:
    return context.activations(rep.network, "test", context.config.indices.n_examples)[rep.layer]


def _train_sample(context: RunContext, rep: Rep, n: int) -> torch.Tensor:
    return context.activations(rep.network, "train_sample", n)[rep.layer]


def distances(context: RunContext, A: Rep, Bs: Sequence[Rep], measures: Sequence[str],
              low_rank: bool, timings: dict[str, float] | None = None,
              ) -> tuple[dict[str, list[float]], dict[str, list[str]]]:
    """d(A, B) for every B and index measure: ({measure: values}, {measure: problems})
    (``dm_func`` is left to `dm_relative_accuracies`, which serves all sets at once).

    A pair a measure cannot compute (e.g. PWCCA on numerically collinear columns) gets NaN
    and a note; it is left out of that measure's correlation. ``low_rank`` says the set
    holds low-rank approximations (see the module docstring for PWCCA there).
    """
    out: dict[str, list[float]] = {}
    notes: dict[str, list[str]] = {}
    timings = {} if timings is None else timings
    for m in measures:
        if m == "dm_func":
            continue
        t0 = time.perf_counter()
        idx = context.get_plugin(m)
        p = context.params_of(m)
        probs: list[str] = []
        sim = bool(idx.higher_is_more_similar)
        if m in FROM_B_TO_A:
            # sources: the Bs (as coordinates: full rank, same information); target: A
            src_test = [B.coords(_test(context, B)) for B in Bs]
            tgt_test = A.full(_test(context, A), torch.float64)

            def sample(side: str, n: int, _Bs=Bs) -> list[Any]:
                if side == "source":
                    return [B.coords(_train_sample(context, B, n)) for B in _Bs]
                return [A.full(_train_sample(context, A, n), torch.float64)]

            ctx = IndexContext(params=p, train_sample=sample if idx.needs_train_activations else None,
                               same_network=False)
            try:
                with one_cpu_thread(context.device):  # many small least-squares fits
                    col = np.asarray(idx.matrix(src_test, [tgt_test], ctx), dtype=float)[:, 0]
                vals = [float(v) for v in col]
            except ValueError as e:
                vals = [float("nan")] * len(Bs)
                probs.append(f"{m}: {e}")
            del src_test
        else:
            if m == "pwcca" and low_rank:
                # B by its rank-r coordinates (exactly rank r; CCA is invariant to the change of
                # basis), compared per position as the reference rule compares a layer with itself
                arrangement = "positions" if p.arrangement == "reference" else p.arrangement
                p = p.model_copy(update={"convention": "ding", "arrangement": arrangement})
                a_test = A.full(_test(context, A), torch.float64)
                b_tests = [B.coords(_test(context, B)) for B in Bs]
            else:
                a_test = A.full(_test(context, A), torch.float32)
                b_tests = [B.full(_test(context, B), torch.float32) for B in Bs]
            ctx = IndexContext(params=p, train_sample=_sample_fn(context, A, Bs) if idx.needs_train_activations
                               else None, same_network=False)
            try:
                vals = [float(v) for v in np.asarray(idx.matrix([a_test], b_tests, ctx), dtype=float)[0]]
            except ValueError:
                vals = [_guard(lambda i=idx, a=a_test, b=b, c=ctx: float(i.matrix([a], [b], c)[0][0]), m, A, B, probs)
                        for B, b in zip(Bs, b_tests)]
        out[m] = [(1.0 - v) if sim else v for v in vals]
        notes[m] = probs
        timings[m] = timings.get(m, 0.0) + time.perf_counter() - t0
    return out, notes


def _sample_fn(context: RunContext, A: Rep, Bs: Sequence[Rep]) -> Callable[[str, int], list[Any]]:
    def sample(side: str, n: int) -> list[Any]:
        if side == "source":
            return [A.full(_train_sample(context, A, n), torch.float32)]
        return [B.full(_train_sample(context, B, n), torch.float32) for B in Bs]

    return sample


def _guard(fn: Callable[[], float], m: str, A: Rep, B: Rep, probs: list[str]) -> float:
    try:
        return float(fn())
    except ValueError as e:
        msg = f"{m}({A.label}, {B.label}): {e}"
        log.warning("Ding test: %s; the pair is left out of %s's correlation", msg, m)
        probs.append(msg)
        return float("nan")


def dm_stitcher(context: RunContext, dm: Any, params: Any, B: Rep, A: Rep, k: int) -> Any:
    """The DM stitching layer from B to A, fitted on the run's ``k`` training images.

    A low-rank B is fitted in its coordinates (a full-rank least-squares problem); the map
    from the raw layer is then ``x -> W' Vᵀ(x − m) + b'``, installed as an affine map after
    B's fixed projection (`LowRankProjection`, as the dm plugin's low-rank variant does),
    so the stitched network sees B exactly. A low-rank A is B's target as its rank-r
    approximation (the dm plugin's ``target_rank``)."""
    src = B.coords(_train_sample(context, B, k))
    tgt = A.full(_train_sample(context, A, k), torch.float64)
    fitted = dm.fit_activations(src, tgt, params)
    shapes = context.layer_shapes()
    layer = StitchingLayer(shapes[B.layer], shapes[A.layer])
    with torch.no_grad():
        w = fitted.weight.detach().double()
        b = fitted.bias.detach().double()
        if B.basis is not None:
            w, b = w @ B.basis.T, b - w @ B.basis.T @ B.mean
        layer.set_affine(w.float(), b.float())
    if B.basis is not None:
        layer.source_transform = B.projection
    layer.fit_info = dict(fitted.fit_info)
    return layer.to(context.device).eval()


def dm_relative_accuracies(context: RunContext, pairs: Sequence[tuple[Rep, Rep]]) -> list[float]:
    """Relative accuracy of g_A>A.layer ∘ T ∘ f_B<=B.layer for each pair (A, B) (T: DM from
    B to A), on the whole test split, over the test accuracy of A's network."""
    dm = context.get_plugin("dm")
    params = _dm_params(context)
    k = len(context.data.train) if params.k == "all" else int(params.k)
    with one_cpu_thread(context.device):  # many small least-squares fits
        stitchers = [dm_stitcher(context, dm, params, B, A, k) for A, B in pairs]
    accs = stitched_accuracies(
        context, [(B.network, B.layer, s, A.network, A.layer) for (A, B), s in zip(pairs, stitchers)])
    out = []
    for (A, _), acc in zip(pairs, accs):
        base = context.network_accuracy[A.network]
        out.append(acc / base if base > 0 else float("nan"))
    return out


def stitched_accuracies(context: RunContext, jobs: Sequence[tuple[str, str, Any, str, str]]) -> list[float]:
    """Test accuracies of stitched networks (source, source layer, stitcher, target, target
    layer); one forward pass of each source network over the test split serves all of its
    stitchers."""
    correct = [0] * len(jobs)
    total = 0
    by_source: dict[str, list[int]] = {}
    for i, (src, *_rest) in enumerate(jobs):
        by_source.setdefault(src, []).append(i)
    bs = context.config.stitching.eval_batch_size
    for src, idxs in by_source.items():
        net = context.networks[src]
        nets = {i: StitchedNetwork(net, jobs[i][1], jobs[i][2], context.networks[jobs[i][3]], jobs[i][4]).eval()
                for i in idxs}
        layers = sorted({jobs[i][1] for i in idxs}, key=net.layer_names.index)
        seen = 0
        with torch.no_grad():
            for x, y in iterate_batches(context.data.test, bs):
                acts = net.activations(x.to(context.device), layers)
                for i in idxs:
                    pred = nets[i].forward_from_source(acts[jobs[i][1]]).argmax(1).cpu()
                    correct[i] += int((pred == y).sum())
                seen += len(y)
        total = seen
    return [c / max(total, 1) for c in correct]
