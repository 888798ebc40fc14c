"""Ding et al.'s sensitivity test (paper Section 5, Table 2).

For each configured layer of each network, S is the layer's low-rank approximations at a
list of ranks, full rank first; A = argmax F over S; Kendall's τ and Spearman's ρ of
|F(A) − F(B)| and d(A, B) over B in S, per layer and averaged over the layers (and
networks). See docs/ding.md.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

import stitchbench

from .framework import DingTest, RepSet, SetResult, select_networks
from .params import DingParams
from .stats import correlate_sets, seed_for


def default_ranks(channels: int) -> list[int]:
    """Full rank, then 7 more equal steps down to C/8, then halving down to 1 (for 512
    channels exactly the authors' list, 512 448 ... 64 32 ... 1; for 256, 13
    ranks, as in the paper). Widths not divisible by 8 (or below 16) halve from the start."""
    c = int(channels)
    if c >= 16 and c % 8 == 0:
        step = c // 8
        out = list(range(c, step - 1, -step))
        r = step // 2
    else:
        out = [c]
        r = c // 2
    while r >= 1:
        out.append(r)
        r //= 2
    if out[-1] != 1:
        out.append(1)
    return list(dict.fromkeys(out))


def layer_ranks(channels: int, ranks: list[int] | None, scaling: str) -> list[int]:
    """The ranks used for a layer of ``channels`` channels, highest first, no repeats.

    ``scaling="to_layer"``: the largest listed rank stands for the layer's full rank and
    every rank is scaled by channels / max(ranks), rounded, at least 1 (so the paper's
    512-channel list gives 256 224 ... 32 16 ... 1 on a 256-channel layer).
    ``"absolute"``: ranks as given; those above the channel count are left out."""
    if ranks is None:
        return default_ranks(channels)
    if scaling == "to_layer":
        top = max(ranks)
        out = [max(1, round(r * channels / top)) for r in ranks]
    else:
        out = [r for r in ranks if r <= channels]
        if not out:
            raise ValueError(f"no rank in {ranks} fits a layer with {channels} channels")
    return sorted(set(out), reverse=True)


def pool_by_layer(sets: list[RepSet], layers: list[str]) -> list[RepSet]:
    """Ding et al.'s sets: one per layer holding every network's approximations of it
    (networks in order, each full rank first); the reference is chosen among the
    full-rank ones (the best network at full rank)."""
    pooled = []
    for layer in layers:
        parts = [s for s in sets if s.meta["layer"] == layer]
        reps, full = [], []
        for s in parts:
            full.append(len(reps))  # each part starts with its full-rank representation
            reps += s.reps
        pooled.append(RepSet(f"all/{layer}", reps, {
            "network": "all", "networks": [s.meta["network"] for s in parts], "layer": layer,
            "channels": parts[0].meta["channels"], "ranks": parts[0].meta["ranks"]}, low_rank=True,
            reference_among=full))
    return pooled


class DingSensitivity(DingTest):
    """Ding et al.'s sensitivity test (Table 2): rank correlations over low-rank approximations of a layer."""

    name = "ding_sensitivity"
    test_name = "sensitivity"

    class Params(DingParams):
        layers: list[int | str] | None = Field(
            None, description="layers to test (0-based index among the stitchable layers, or name); null = the last 4"
        )
        ranks: list[int] | None = Field(
            None, description="ranks, full rank first (see rank_scaling); null = C, 7 steps down to C/8, halving to 1"
        )
        rank_scaling: Literal["to_layer", "absolute"] = Field(
            "to_layer", description="to_layer: the largest rank means the layer's full rank; absolute: as given"
        )
        sets: Literal["per_network", "pooled"] = Field(
            "per_network", description="per_network: one set per (network, layer); pooled: Ding et al.'s, one set "
            "per layer over every network and rank, the best network at full rank as the reference")

    def _layers(self, context: Any, params: Any) -> list[str]:
        net = next(iter(context.networks.values()))
        names = list(net.layer_names)
        if params.layers is None:
            return names[-4:]
        out = [names[net.layer_index(layer)] for layer in params.layers]
        if len(set(out)) != len(out):
            raise ValueError(f"ding_sensitivity.layers lists a layer twice: {params.layers}")
        return out

    def count_representations(self, params: Any, plan: Any) -> int:
        nets = plan.networks if params.networks is None else min(params.networks, plan.networks)
        names = list(plan.layer_shapes)
        chosen = names[-4:] if params.layers is None else [
            names[x] if isinstance(x, int) else x for x in params.layers]
        total = 0
        for layer in chosen:
            shape = plan.layer_shapes.get(layer)
            channels = shape[0] if shape is not None and len(shape) == 3 else (shape[-1] if shape else 1)
            total += len(layer_ranks(channels, params.ranks, params.rank_scaling))
        return nets * total

    def build_sets(self, context: Any, params: Any) -> list[RepSet]:
        from .features import network_features
        from .representations import low_rank_rep

        if params.ranks is not None and any(r < 1 for r in params.ranks):
            raise ValueError(f"ding_sensitivity.ranks must be >= 1, got {params.ranks}")
        sets = []
        layers = self._layers(context, params)
        networks = select_networks(context, params.networks)
        for network in networks:
            feats = network_features(context, network, moment_layers=layers)
            for layer in layers:
                moments = feats.moments[layer]
                channels = moments.scatter.shape[0]
                ranks = layer_ranks(channels, params.ranks, params.rank_scaling)
                reps = [low_rank_rep(network, layer, moments, r) for r in ranks]
                sets.append(RepSet(f"{network}/{layer}", reps,
                                   {"network": network, "layer": layer, "channels": channels, "ranks": ranks},
                                   low_rank=True))
        return pool_by_layer(sets, layers) if params.sets == "pooled" else sets

    def summarise(self, results: list[SetResult], params: Any, seed: int) -> dict[str, dict]:
        out: dict[str, dict] = {}
        layers = list(dict.fromkeys(r.rset.meta["layer"] for r in results))
        for m in params.measures:
            opts = {"n_permutations": params.n_permutations, "alpha": params.alpha,
                    "significance": params.significance}
            summary = correlate_sets([(r.delta, r.d[m]) for r in results], seed=seed_for(seed, self.name, m),
                                     **opts)
            summary["per_layer"] = {
                layer: correlate_sets([(r.delta, r.d[m]) for r in results if r.rset.meta["layer"] == layer],
                                      seed=seed_for(seed, self.name, m, layer), **opts)
                for layer in layers
            }
            out[m] = summary
        return out

    def title(self, results: list[SetResult], params: Any) -> str:
        layers = list(dict.fromkeys(r.rset.meta["layer"] for r in results))
        nets = list(dict.fromkeys(n for r in results for n in r.rset.meta.get("networks", [r.rset.meta["network"]])))
        counts = sorted({len(r.rset.reps) for r in results})
        pooled = any("networks" in r.rset.meta for r in results)
        how = (f"one per layer ({', '.join(layers)}) pooling {len(nets)} network(s), the best at full rank as A"
               if pooled else f"{len(nets)} network(s) x layers {', '.join(layers)}")
        return (
            "Ding et al.'s sensitivity test (Table 2): Kendall's τ and Spearman's ρ of |F(A) − F(B)| and d(A, B),\n"
            f"mean over {len(results)} sets ({how}), "
            f"{'/'.join(map(str, counts))} low-rank approximations each, full rank to 1"
        )


@stitchbench.hookimpl
def register_evaluations(register):
    register(DingSensitivity())
