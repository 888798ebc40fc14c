"""Ding et al.'s specificity test (paper Section 5, Table 3).

S is every layer of every network of the run (independently trained instances of one
architecture); A = argmax F over S; Kendall's τ and Spearman's ρ of |F(A) − F(B)| and
d(A, B) over B in S. See docs/ding.md.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

import stitchbench

from .framework import DingTest, RepSet, SetResult, select_networks
from .params import DingParams
from .stats import correlate_sets, seed_for


class DingSpecificity(DingTest):
    """Ding et al.'s specificity test (Table 3): rank correlations over every layer of several networks."""

    name = "ding_specificity"
    test_name = "specificity"

    class Params(DingParams):
        layers: list[int | str] | None = Field(
            None, description="layers (0-based index or name); null = the run's stitched layers"
        )

    def _layers(self, context: Any, params: Any) -> list[str]:
        if params.layers is None:
            return list(context.layers)
        net = next(iter(context.networks.values()))
        return list(dict.fromkeys(net.layer_names[net.layer_index(layer)] for layer in params.layers))

    def count_representations(self, params: Any, plan: Any) -> int:
        nets = plan.networks if params.networks is None else min(params.networks, plan.networks)
        return nets * (len(plan.layers) if params.layers is None else len(params.layers))

    def build_sets(self, context: Any, params: Any) -> list[RepSet]:
        from .representations import Rep

        nets = select_networks(context, params.networks)
        layers = self._layers(context, params)
        reps = [Rep(n, layer) for n in nets for layer in layers]
        return [RepSet("all layers", reps, {"networks": nets, "layers": layers})]

    def summarise(self, results: list[SetResult], params: Any, seed: int) -> dict[str, dict]:
        (r,) = results
        out = {}
        for m in params.measures:
            s = correlate_sets([(r.delta, r.d[m])], n_permutations=params.n_permutations,
                               seed=seed_for(seed, self.name, m), alpha=params.alpha,
                               significance=params.significance)
            s["reference"] = r.rset.reps[r.reference].label
            out[m] = s
        return out

    def title(self, results: list[SetResult], params: Any) -> str:
        (r,) = results
        A = r.rset.reps[r.reference]
        nets, layers = r.rset.meta["networks"], r.rset.meta["layers"]
        return (
            "Ding et al.'s specificity test (Table 3): Kendall's τ and Spearman's ρ of |F(A) − F(B)| and d(A, B),\n"
            f"over {len(r.rset.reps)} representations ({len(nets)} network(s) x {len(layers)} layers); "
            f"reference A = {A.label} (F = {r.scores[r.reference]:.4f})"
        )


@stitchbench.hookimpl
def register_evaluations(register):
    register(DingSpecificity())
