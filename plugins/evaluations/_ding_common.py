"""What Ding et al.'s two tests share (paper Section 5; docs/ding.md).

The framework: a set S of representations, the probing accuracy F of each, the reference
A = argmax_S F, and for every B in S the pair (|F(A) − F(B)|, d(A, B)) for each measure d;
Kendall's τ and Spearman's ρ of the pairs. The sensitivity test builds S from low-rank
approximations of one layer, the specificity test from every layer of several networks;
everything else lives here.

Pieces:

* `Rep`: one representation, a (network, layer) and an optional low-rank projection;
* `RowMoments`, `fit_low_rank`: the low-rank approximation (REFERENCE.md "Low-rank
  approximation"), fitted once on all training activations of a layer, rows channels-last;
* `network_features`: one pass over each split per network, all layers at once: pooled
  probe features and the row moments, kept for the run (both tests share them);
* `probe_scores`: F for many representations, one job per representation keyed by
  (network weights, data, layer, rank, probe settings), kept for the run and written to
  ``probes.json`` so a later run with the same key reuses it;
* `distances`: d(A, B) for every measure (indices through their plugins, DM(func) through
  the ``dm`` plugin and a stitched network);
* `DingTest`: the shared evaluation logic; the two plugins say how S is built.

Module top level imports neither torch nor numpy (plugin listings import this module).
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from stitchbench import Evaluation, EvaluationResult, Params
from stitchbench.keys import job_key

from ._network_keys import fingerprint, network_key
from ._probing import ProbeParams, one_cpu_thread

if TYPE_CHECKING:
    from stitchbench.context import RunContext

log = logging.getLogger(__name__)

MEASURES = ("lcka", "pwcca", "opd", "dm_func", "dm_struct")
DISPLAY = {"lcka": "LCKA", "pwcca": "PWCCA", "opd": "OPD", "dm_func": "DM (func.)", "dm_struct": "DM (struct.)"}
#: Measures fitted from B to A (the source is the representation compared with the
#: reference, as in the DM stitch of the sensitivity test); every other index gets (A, B).
FROM_B_TO_A = frozenset({"dm_struct", "dm_func"})
#: Tag and artifact of the probe accuracies an evaluation run holds (reused by later runs).
PROBE_TAG = "stitchbench.ding.probes"
PROBE_ARTIFACT = "probes.json"
#: Bump when the definition of a probe or of the low-rank approximation changes.
PROBE_VERSION = 2


# --------------------------------------------------------------------------- parameters


class DingParams(Params):
    """Parameters both tests have."""

    probe: ProbeParams = Field(default_factory=ProbeParams, description="linear probe training")
    measures: list[str] = Field(
        default_factory=lambda: list(MEASURES),
        description="dissimilarities d: similarity index names (similarities become 1 − s) and dm_func",
    )
    networks: int | None = Field(None, ge=1, description="use the run's first N networks; null = all")
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level; weaker correlations show as ≈ 0")
    n_permutations: int = Field(2000, ge=0, description="random permutations per permutation test (seeded)")
    significance: Literal["ding", "permutation"] = Field(
        "ding", description="which p-values decide significance: Ding et al.'s one-sided scipy p, or permutation"
    )
    reuse_probes: bool = Field(True, description="reuse probe accuracies of earlier runs with the same key")
    cpu_threads: int | None = Field(
        1, ge=1, description="torch intra-op threads while the test runs on a CPU device; null = torch's "
        "setting. 1 is fastest for small networks (many tiny operations); probes and DM fits always use 1",
    )


# --------------------------------------------------------------------------- representations


@dataclass(eq=False)
class Rep:
    """A representation: layer ``layer`` of network ``network``, optionally replaced by its
    rank-``rank`` approximation (``mean`` (C,), ``basis`` (C, r), float64)."""

    network: str
    layer: str
    rank: int | None = None
    mean: Any = None
    basis: Any = None
    _projection: Any = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"{self.network}/{self.layer}" + ("" if self.rank is None else f"@r{self.rank}")

    @property
    def projection(self) -> Any:
        """The fixed `LowRankProjection` (float32 buffers), or None for the full representation."""
        if self.basis is None:
            return None
        if self._projection is None:
            from stitchbench.lowrank import LowRankProjection

            self._projection = LowRankProjection(self.mean, self.basis).eval()
        return self._projection

    def full(self, act: Any, dtype: Any = None) -> Any:
        """The representation of raw layer activations ``act`` (torch; conv or tokens)."""
        import torch

        dtype = dtype or act.dtype
        if self.basis is None:
            return act.to(dtype)
        return _apply_channels(act.to(torch.float64), lambda h: self.mean + (h - self.mean) @ self.basis
                               @ self.basis.T).to(dtype)

    def coords(self, act: Any) -> Any:
        """Its coordinates in the kept subspace, (x − m)V, float64, channels in place of C
        (an invertible affine image of the representation: same information, full rank)."""
        import torch

        if self.basis is None:
            return act.to(torch.float64)
        return _apply_channels(act.to(torch.float64), lambda h: (h - self.mean) @ self.basis)


def _apply_channels(act: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to the channel (embedding) axis: (N, C, H, W) channels-last and back;
    (N, T, D) and (N, D) on the last axis."""
    if act.ndim == 4:
        return fn(act.movedim(1, -1)).movedim(-1, 1).contiguous()
    return fn(act)


class RowMoments:
    """Streaming mean and centred scatter (float64) of rows, merged batch by batch with the
    pairwise update of Chan et al. (no uncentred sums are ever subtracted)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Any = None
        self.scatter: Any = None

    def update(self, rows: Any) -> None:
        import torch

        rows = rows.to(torch.float64)
        nb = rows.shape[0]
        if nb == 0:
            return
        if not torch.isfinite(rows).all():
            raise ValueError("low-rank approximation: the activations contain NaN or inf")
        mb = rows.mean(0)
        c = rows - mb
        sb = c.T @ c
        if self.n == 0:
            self.n, self.mean, self.scatter = nb, mb, sb
            return
        d = mb - self.mean
        n = self.n + nb
        self.scatter = self.scatter + sb + (self.n * nb / n) * torch.outer(d, d)
        self.mean = self.mean + d * (nb / n)
        self.n = n

    def basis(self, rank: int) -> tuple[Any, Any]:
        """(mean (C,), V (C, rank)): the ``rank`` leading right singular vectors of the
        centred rows (eigenvectors of their scatter, largest first), on the CPU."""
        import torch

        if self.n == 0:
            raise ValueError("low-rank approximation: no rows were seen")
        c = self.scatter.shape[0]
        if not 1 <= rank <= c:
            raise ValueError(f"rank must be in 1..{c}, got {rank}")
        _, vec = torch.linalg.eigh(self.scatter.cpu())
        return self.mean.cpu().clone(), vec[:, -rank:].flip(1).contiguous()


def to_rows(act: Any) -> Any:
    from stitchbench.stitching import to_rows as core_to_rows

    return core_to_rows(act)


def fit_low_rank(act: Any, rank: int) -> Any:
    """The rank-``rank`` approximation fitted on activations ``act`` (N, C, H, W), (N, T, D)
    or (N, D), as a `LowRankProjection`: rows channels-last, centred, SVD, keep ``rank``."""
    moments = RowMoments()
    moments.update(to_rows(act))
    from stitchbench.lowrank import LowRankProjection

    return LowRankProjection(*moments.basis(rank))


def low_rank_rep(network: str, layer: str, moments: RowMoments, rank: int) -> Rep:
    """The rank-``rank`` approximation of a layer (the full layer when rank >= channels)."""
    c = moments.scatter.shape[0]
    if rank >= c:
        return Rep(network, layer)
    mean, basis = moments.basis(rank)
    return Rep(network, layer, rank, mean, basis)


# --------------------------------------------------------------------------- features


@dataclass
class NetworkFeatures:
    """Pooled probe features (N, C) per layer and split, labels, and per-layer row moments
    of the training activations; all float32 on the CPU except the moments."""

    pooled: dict[str, dict[str, Any]]
    labels: dict[str, Any]
    moments: dict[str, RowMoments]


_FEATURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
def network_features(context: RunContext, model_name: str, moment_layers: Sequence[str] = (),
                     batch_size: int = 256) -> NetworkFeatures:
    """One forward pass over each split (no augmentation, fixed order): every layer's pooled
    features, and the row moments of the training activations of ``moment_layers``. Kept
    for the lifetime of the network object, so both tests of a run share it (moments of
    further layers asked for later cost one more pass over the training split)."""
    import torch

    from stitchbench.data import iterate_batches

    from ._probing import pooled

    net = context.networks[model_name]
    key = (fingerprint(net), id(context.data))
    cached = _FEATURES.get(net)
    out = cached[1] if cached is not None and cached[0] == key else None
    missing = [layer for layer in moment_layers if out is None or layer not in out.moments]
    if out is not None and not missing:
        return out
    splits = ("train",) if out is not None else ("train", "test")
    if out is None:
        out = NetworkFeatures({"train": {}, "test": {}}, {}, {})
    new = {layer: RowMoments() for layer in missing}
    device = next(net.parameters()).device
    net.eval()
    with torch.no_grad():
        for split in splits:
            chunks: dict[str, list[Any]] = {name: [] for name in net.layer_names}
            labels = []
            for x, y in iterate_batches(getattr(context.data, split), batch_size):
                acts = net.activations(x.to(device))
                for name, act in acts.items():
                    chunks[name].append(pooled(act).float().cpu())
                    if split == "train" and name in new:
                        new[name].update(to_rows(act))
                labels.append(y)
            out.pooled[split] = {name: torch.cat(c) for name, c in chunks.items()}
            out.labels[split] = torch.cat(labels)
    out.moments.update(new)
    _FEATURES[net] = (key, out)
    return out


# --------------------------------------------------------------------------- probes

_PROBES: dict[str, float] = {}  # probe key -> accuracy, for the life of the process


def probe_key(context: RunContext, rep: Rep, params: ProbeParams) -> str:
    return job_key(
        "ding_probe",
        version=PROBE_VERSION,
        network=network_key(context, rep.network),
        dataset=context.config.dataset.model_dump(mode="json"),
        layer=rep.layer,
        rank=rep.rank,
        probe=params.model_dump(mode="json"),
        seed=context.config.seed,
    )


def _stored_probes(limit: int = 10) -> dict[str, float]:
    """Probe accuracies of the newest finished evaluation runs that hold ``probes.json``."""
    import mlflow

    from stitchbench import tracking

    client = mlflow.MlflowClient()
    ids = tracking.all_experiment_ids(client)
    if not ids:
        return {}
    runs = client.search_runs(
        ids, filter_string=f"tags.`{PROBE_TAG}` = '1' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=limit,
    )
    found: dict[str, float] = {}
    for run in reversed(runs):  # newer runs win
        try:
            data = tracking.read_json_artifact(run.info.run_id, PROBE_ARTIFACT)
        except Exception as e:  # noqa: BLE001 - an unreadable store entry is skipped, never trusted
            log.debug("run %s: no readable %s (%s)", run.info.run_id, PROBE_ARTIFACT, e)
            continue
        for k, v in (data.get("probes") or {}).items():
            if isinstance(v, dict) and isinstance(v.get("accuracy"), (int, float)):
                found[k] = float(v["accuracy"])
    return found


def _active_run() -> Any:
    try:
        import mlflow

        return mlflow.active_run()
    except Exception:  # noqa: BLE001 - outside a run nothing is stored
        return None


def probe_scores(context: RunContext, reps: Sequence[Rep], params: ProbeParams, *,
                 reuse: bool = True) -> tuple[list[float], dict[str, dict[str, Any]], int]:
    """F for every representation: (accuracies, {key: record} for probes.json, how many were
    reused from earlier runs). The missing probes are trained together (`train_probes`),
    each initialised from its key, so its accuracy does not depend on the company."""
    keys = [probe_key(context, r, params) for r in reps]
    missing = [k for k in dict.fromkeys(keys) if k not in _PROBES]
    reused = 0
    if missing and reuse and _active_run() is not None:
        stored = _stored_probes()
        for k in missing:
            if k in stored:
                _PROBES[k] = stored[k]
                reused += 1
    todo: dict[tuple[str, str], dict[str, Rep]] = {}
    for k, r in zip(keys, reps):
        if k not in _PROBES:
            todo.setdefault((r.network, r.layer), {}).setdefault(k, r)
    if todo:
        from ._probing import ProbeGroup, probe_task

        groups = []
        labels = None
        for (network, layer), items in todo.items():
            feats = network_features(context, network)
            labels = feats.labels
            groups.append(ProbeGroup(feats.pooled["train"][layer], feats.pooled["test"][layer],
                                     [r.projection for r in items.values()],
                                     [int(k[:8], 16) for k in items]))
        # Tasks of the run's executor: here, all probes as one batched model; elsewhere (Ray),
        # one task per network. A probe's accuracy does not depend on its company.
        chunks: dict[str, list[int]] = {}
        for n, (network, _) in enumerate(todo):
            chunks.setdefault("all" if context.tasks_in_process else network, []).append(n)
        futures = {
            context.submit(probe_task, [groups[n] for n in members], labels["train"], labels["test"], params,
                           context.data.num_classes, context.config.seed, str(context.device),
                           label=f"ding probes ({name}: {sum(len(groups[n].seeds) for n in members)})"): members
            for name, members in chunks.items()
        }
        items_of = list(todo.values())
        for fut in context.as_completed(list(futures)):
            for n, group_accs in zip(futures[fut], fut.result()):
                for k, a in zip(items_of[n], group_accs):
                    _PROBES[k] = a
    records = {k: {"accuracy": _PROBES[k], "network": r.network, "layer": r.layer, "rank": r.rank}
               for k, r in zip(keys, reps)}
    return [_PROBES[k] for k in keys], records, reused


# --------------------------------------------------------------------------- distances


def _index_params(context: RunContext, obj: Any) -> Any:
    return obj.Params.model_validate(context.config.indices.params.get(obj.name, {}) or {})


def _dm_params(context: RunContext, dm: Any) -> Any:
    raw = dict(context.config.stitching.params.get("dm", {}) or {})
    raw.update(rank=None, target_rank=None)  # the low-rank source is given explicitly
    return dm.Params.model_validate(raw)


def _test(context: RunContext, rep: Rep) -> Any:
    return context.activations(rep.network, "test", context.config.indices.n_examples)[rep.layer]


def _train_sample(context: RunContext, rep: Rep, n: int) -> Any:
    return context.activations(rep.network, "train_sample", n)[rep.layer]


def pwcca_ding(A: Any, B: Any, tol: float = 1e-10) -> float:
    """PWCCA distance with Ding et al.'s handling of rank-deficient inputs (weights from A).

    ``A`` (n, p1), ``B`` (n, p2): arranged rows. Each side is whitened on its numerical
    column space (eigenvalues of its correlation matrix above ``tol`` times the largest; a
    constant column has none), so a rank-r side has r canonical directions. All ka
    canonical variates h_i of A carry a weight α_i = Σ_j |⟨h_i, a_j⟩| (a_j: A's centred
    columns); the ka − kb that have no partner in B get correlation 0, as in Ding et al.'s
    regularised CCA. Those unmatched variates are taken in the eigenbasis of
    Σ_j (P a_j)(P a_j)ᵀ, P the projection on them (any orthonormal basis is a valid set of
    canonical variates there; this one is deterministic). For full-rank sides with
    p1 <= p2 this is the ``pwcca`` plugin's value. Returns 1 − Σα_iρ_i / Σα_i.
    """
    import numpy as np

    a = np.asarray(A, dtype=np.float64)
    b = np.asarray(B, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"pwcca_ding needs (n, p1) and (n, p2) rows, got {a.shape} and {b.shape}")
    a = a - a.mean(0)
    b = b - b.mean(0)
    saa = a.T @ a
    wa = _pinv_sqrt(saa, tol)
    wb = _pinv_sqrt(b.T @ b, tol)
    if wa.shape[1] == 0 or wb.shape[1] == 0:
        raise ValueError("pwcca_ding: a side is constant over the rows")
    if a.shape[0] <= max(wa.shape[1], wb.shape[1]):
        raise ValueError(f"pwcca_ding needs more rows than (effective) columns: {a.shape}, {b.shape}")
    m = wa.T @ (a.T @ b) @ wb
    u, rho, _ = np.linalg.svd(m, full_matrices=True)
    k = len(rho)
    g = saa @ wa  # column i of g @ u: <h_i, a_j> over neurons j
    if u.shape[1] > k:
        comp = u[:, k:]
        proj = g @ comp
        _, rot = np.linalg.eigh(proj.T @ proj)
        u = np.concatenate([u[:, :k], comp @ rot[:, ::-1]], axis=1)
    alpha = np.abs(g @ u).sum(axis=0)
    rho_all = np.concatenate([rho, np.zeros(u.shape[1] - k)])
    return float(1.0 - alpha @ rho_all / alpha.sum())


def _pinv_sqrt(cov: Any, tol: float) -> Any:
    """W (p, k) with Wᵀ Σ W = I on Σ's numerical range, from its correlation matrix."""
    import numpy as np

    d = np.diag(cov).copy()
    live = d > 0
    out = np.zeros((cov.shape[0], 0))
    if not live.any():
        return out
    inv = np.zeros_like(d)
    inv[live] = 1.0 / np.sqrt(d[live])
    lam, vec = np.linalg.eigh(cov * inv[:, None] * inv[None, :])
    keep = lam > tol * lam[-1]
    return (inv[:, None] * vec[:, keep]) / np.sqrt(lam[keep])


def _arrange_same_shape(act: Any, arrangement: str) -> Any:
    """Rows of one layer for a pair of equal shapes, as the indices' ``arrangement`` does:
    reference -> per position / token; pooled -> mean over positions / tokens; flatten."""
    if act.ndim == 2:
        return act
    if arrangement == "reference":
        return to_rows(act)
    if arrangement == "pooled":
        return act.mean(dim=(2, 3)) if act.ndim == 4 else act.mean(dim=1)
    return act.reshape(act.shape[0], -1)


def distances(context: RunContext, A: Rep, Bs: Sequence[Rep], measures: Sequence[str],
              low_rank: bool, timings: dict[str, float] | None = None,
              ) -> tuple[dict[str, list[float]], dict[str, list[str]]]:
    """d(A, B) for every B and index measure: ({measure: values}, {measure: problems})
    (``dm_func`` is left to `dm_relative_accuracies`, which serves all sets at once).

    A pair a measure cannot compute (e.g. PWCCA on numerically collinear columns) gets NaN
    and a note; it is left out of that measure's correlation. ``low_rank`` says the set
    holds low-rank approximations: then PWCCA uses `pwcca_ding` (the plugin refuses
    rank-deficient input) on every pair of the set.
    """
    import time

    import numpy as np
    import torch

    from stitchbench import IndexContext

    out: dict[str, list[float]] = {}
    notes: dict[str, list[str]] = {}
    timings = {} if timings is None else timings
    for m in measures:
        if m == "dm_func":
            continue
        t0 = time.perf_counter()
        idx = context.get_plugin(m)
        p = _index_params(context, idx)
        vals: list[float] = []
        probs: list[str] = []
        sim = bool(idx.higher_is_more_similar)
        if m == "pwcca" and low_rank:
            arrangement = getattr(p, "arrangement", "reference")
            a_rows = _arrange_same_shape(A.full(_test(context, A), torch.float64), arrangement).numpy()
            for B in Bs:
                b_rows = _arrange_same_shape(B.coords(_test(context, B)), arrangement).numpy()
                vals.append(_guard(lambda a=a_rows, b=b_rows: pwcca_ding(a, b), m, A, B, probs))
        elif m in FROM_B_TO_A:
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
    import torch

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


_SHAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layer_shapes(context: RunContext) -> dict[str, tuple[int, ...]]:
    """``context.layer_shapes()``, computed once per network object (it runs a forward pass)."""
    net = next(iter(context.networks.values()))
    key = tuple(context.data.image_shape)
    hit = _SHAPES.get(net)
    if hit is None or hit[0] != key:
        hit = _SHAPES[net] = (key, context.layer_shapes())
    return hit[1]


def dm_stitcher(context: RunContext, dm: Any, params: Any, B: Rep, A: Rep, k: int) -> Any:
    """The DM stitching layer from B to A, fitted on the run's ``k`` training images.

    A low-rank B is fitted in its coordinates (a full-rank least-squares problem); the map
    from the raw layer is then ``x -> W' Vᵀ(x − m) + b'``, installed as an affine map after
    B's fixed projection (`LowRankProjection`, as the dm plugin's low-rank variant does),
    so the stitched network sees B exactly. A low-rank A is B's target as its rank-r
    approximation (the dm plugin's ``target_rank``)."""
    import torch

    from stitchbench.stitching import StitchingLayer

    src = B.coords(_train_sample(context, B, k))
    tgt = A.full(_train_sample(context, A, k), torch.float64)
    fitted = dm.fit_activations(src, tgt, params)
    shapes = layer_shapes(context)
    layer = StitchingLayer(shapes[B.layer], shapes[A.layer])
    with torch.no_grad():
        w = fitted.weight.detach().double()
        b = fitted.bias.detach().double()
        if B.basis is not None:
            w, b = w @ B.basis.T, b - w @ B.basis.T @ B.mean
        layer.set_affine(w.float(), b.float())
    if B.basis is not None:
        layer.source_transform = B.projection
    layer.fit_info = getattr(fitted, "fit_info", {})
    return layer.to(context.device).eval()


def dm_relative_accuracies(context: RunContext, pairs: Sequence[tuple[Rep, Rep]]) -> list[float]:
    """Relative accuracy of g_A>A.layer ∘ T ∘ f_B<=B.layer for each pair (A, B) (T: DM from
    B to A), on the whole test split, over the test accuracy of A's network."""
    dm = context.get_plugin("dm")
    params = _dm_params(context, dm)
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
    import torch

    from stitchbench.data import iterate_batches
    from stitchbench.stitching import StitchedNetwork

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


# --------------------------------------------------------------------------- the shared test


@dataclass
class RepSet:
    """One set S of representations (``reps[0]`` wins ties for the reference)."""

    name: str
    reps: list[Rep]
    meta: dict[str, Any] = field(default_factory=dict)
    low_rank: bool = False


@dataclass
class SetResult:
    rset: RepSet
    scores: list[float]
    reference: int
    delta: list[float]
    d: dict[str, list[float]]
    notes: dict[str, list[str]]

    def table(self) -> dict[str, Any]:
        A = self.rset.reps[self.reference]
        return {
            "name": self.rset.name,
            **self.rset.meta,
            "reference": {"label": A.label, "network": A.network, "layer": A.layer, "rank": A.rank,
                          "probe_accuracy": self.scores[self.reference]},
            "representations": [
                {"label": r.label, "network": r.network, "layer": r.layer, "rank": r.rank,
                 "probe_accuracy": f, "abs_delta_f": df, **{f"d_{m}": v[i] for m, v in self.d.items()}}
                for i, (r, f, df) in enumerate(zip(self.rset.reps, self.scores, self.delta))
            ],
            "problems": {m: v for m, v in self.notes.items() if v},
        }


def run_sets(context: RunContext, sets: Sequence[RepSet], params: DingParams,
             timings: dict[str, float] | None = None) -> tuple[list[SetResult], dict, int]:
    """Probe every representation, pick each set's reference, measure every pair.
    ``timings`` (optional) receives the seconds spent per phase and measure."""
    import time

    timings = {} if timings is None else timings
    t = time.perf_counter()
    all_reps = [r for s in sets for r in s.reps]
    scores, records, reused = probe_scores(context, all_reps, params.probe, reuse=params.reuse_probes)
    timings["probes"] = time.perf_counter() - t
    results = []
    pos = 0
    for s in sets:
        f = scores[pos : pos + len(s.reps)]
        pos += len(s.reps)
        ref = max(range(len(f)), key=lambda i: (f[i], -i))  # first best: higher rank on ties
        A = s.reps[ref]
        d, notes = distances(context, A, s.reps, params.measures, s.low_rank, timings)
        results.append(SetResult(s, f, ref, [abs(f[ref] - x) for x in f], d, notes))
        log.info("Ding %s: reference %s (F = %.4f)", s.name, A.label, f[ref])
    if "dm_func" in params.measures:
        # every set's stitched networks at once: one forward pass per source network
        t = time.perf_counter()
        pairs = [(r.rset.reps[r.reference], B) for r in results for B in r.rset.reps]
        rel = iter(dm_relative_accuracies(context, pairs))
        timings["dm_func"] = time.perf_counter() - t
        for r in results:
            r.d["dm_func"] = [1.0 - next(rel) for _ in r.rset.reps]
            r.notes["dm_func"] = []
    for r in results:  # the measures' order as configured
        r.d = {m: r.d[m] for m in params.measures}
    return results, records, reused


def check_measures(context: RunContext, measures: Sequence[str]) -> None:
    for m in measures:
        if m == "dm_func":
            continue
        obj = context.get_plugin(m)
        if obj.kind != "similarity_index":
            raise ValueError(f"measure {m!r} is a {obj.kind}; the Ding tests take similarity indices and dm_func")


def select_networks(context: RunContext, n: int | None) -> list[str]:
    names = list(context.networks)
    return names if n is None else names[:n]


def scatter_figure(results: Sequence[SetResult], measures: Sequence[str], summary: dict[str, dict],
                   title: str) -> Any:
    """|ΔF| against d, one panel per measure, one colour per set."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(measures)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False, dpi=90)
    # fixed margins: tight_layout costs more than the whole plot
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.16, top=0.76, wspace=0.28)
    for ax, m in zip(axes[0], measures):
        for r in results:
            ax.scatter(r.d[m], r.delta, s=14, alpha=0.8, label=r.rset.name if len(results) > 1 else None)
        s = summary[m]
        ax.set_title(f"{DISPLAY.get(m, m)}\nτ={s['tau']:.3f} ρ={s['rho']:.3f}", fontsize=9)
        ax.set_xlabel(f"d(A, B): {_d_label(m)}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("|F(A) − F(B)|", fontsize=8)
    if len(results) > 1 and len(results) <= 12:
        axes[0][-1].legend(fontsize=6, loc="best")
    fig.suptitle(title, fontsize=10)
    return fig


def _d_label(m: str) -> str:
    return {"lcka": "1 − LCKA", "pwcca": "PWCCA distance", "opd": "OPD", "dm_func": "1 − rel. acc.",
            "dm_struct": "normalised error"}.get(m, m)


def format_table(title: str, summary: dict[str, dict], measures: Sequence[str], params: DingParams,
                 footer: str = "") -> str:
    from ._ding_stats import mark

    lines = [title, f"{'measure':14} {'τ':>8} {'ρ':>8}"]
    for m in measures:
        s = summary[m]
        lines.append(f"{DISPLAY.get(m, m):14} {mark(s['tau'], s['significant_tau']):>8} "
                     f"{mark(s['rho'], s['significant_rho']):>8}")
    test = "one-sided, Ding et al.'s convention" if params.significance == "ding" else "permutation"
    lines.append(f"≈ 0: not significant at α = {params.alpha:g} ({test}); the values are in the JSON")
    if footer:
        lines.append(footer)
    return "\n".join(lines)


class DingTest(Evaluation):
    """Shared run logic of the two tests; subclasses build the sets."""

    requires: ClassVar[tuple[str, ...]] = ("dm", "lcka", "pwcca", "opd", "dm_struct")
    test_name: ClassVar[str] = ""

    def build_sets(self, context: RunContext, params: Any) -> list[RepSet]:
        raise NotImplementedError

    def summarise(self, results: list[SetResult], params: Any, seed: int) -> dict[str, dict]:
        raise NotImplementedError

    def title(self, results: list[SetResult], params: Any) -> str:
        raise NotImplementedError

    def count_representations(self, params: Any, plan: Any) -> int:
        raise NotImplementedError

    def estimate_cost(self, params: Any, plan: Any) -> list[Any]:
        """One forward pass over both splits per network (probe features: the probes
        themselves are linear layers on pooled features, negligible), and per
        representation a DM fit on ``k`` training images and a stitched test pass."""
        from stitchbench import Cost

        info = plan.info
        nets = plan.networks if params.networks is None else min(params.networks, plan.networks)
        reps = self.count_representations(params, plan)
        dm = dict((plan.config.stitching.params or {}).get("dm") or {})
        k = dm.get("k", 100)
        k = info.n_train if k == "all" else min(int(k), info.n_train)
        return [
            Cost(forward_images=nets * (info.n_train + info.n_test), jobs=nets, what="probe features"),
            Cost(forward_images=reps * (k + info.n_test), jobs=reps, what="DM stitches of the representations"),
        ]

    def run(self, context: RunContext, params: Any) -> EvaluationResult:
        import time

        t0 = time.perf_counter()
        check_measures(context, params.measures)
        timings: dict[str, float] = {}
        with one_cpu_thread(context.device, params.cpu_threads):
            sets = self.build_sets(context, params)
            timings["sets"] = time.perf_counter() - t0
            results, records, reused = run_sets(context, sets, params, timings)
            t = time.perf_counter()
            summary = self.summarise(results, params, context.config.seed)
            timings["statistics"] = time.perf_counter() - t
        name = self.test_name
        metrics = {f"ding.{name}.{m}.{s}": float(summary[m][s]) for m in params.measures for s in ("tau", "rho")}
        problems = sum(len(v) for r in results for v in r.notes.values())
        footer = f"{problems} pair(s) could not be measured (see {self.name}.json)" if problems else ""
        text = format_table(self.title(results, params), summary, params.measures, params, footer)
        run = _active_run()
        if run is not None:
            import mlflow

            mlflow.set_tag(PROBE_TAG, "1")
            mlflow.log_metrics({"probes": float(len(records)), "probes_reused_from_store": float(reused),
                                "seconds": time.perf_counter() - t0,
                                **{f"seconds.{k}": v for k, v in timings.items()}})
        return EvaluationResult(
            metrics=metrics,
            tables={
                self.name: jsonable({"summary": summary, "sets": [r.table() for r in results],
                                     "params": params.model_dump(mode="json")}),
                PROBE_ARTIFACT[: -len(".json")]: {"version": PROBE_VERSION, "probes": records},
            },
            figures={f"{self.name}_scatter": scatter_figure(
                results, params.measures, summary, f"Ding et al.'s {name} test: |ΔF| against d")},
            report_key="ding",
            report={name: jsonable(summary)},
            report_text=text,
        )


def jsonable(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None (strict JSON; NaN marks an undefined value)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj

