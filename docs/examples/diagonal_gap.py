# docs/examples/diagonal_gap.py
"""The ``diagonal_gap`` evaluation: how much better each layer matches itself than the others.

For every similarity matrix of the run, the mean diagonal cell minus the mean off-diagonal
cell (distances negated first, so larger is always better); and, as a job of its own that
later runs reuse, the mean activation norm of each network's layers.
"""

from __future__ import annotations

import numpy as np

import stitchbench


def activation_norms(acts):
    """Mean L2 norm of each layer's activations of one network (one number per layer)."""
    return {layer: float(a.flatten(1).norm(dim=1).mean()) for layer, a in acts.items()}


class DiagonalGap(stitchbench.Evaluation):
    """Mean diagonal minus mean off-diagonal cell of every matrix, and the layers' activation norms."""

    name = "diagonal_gap"
    summarises_matrices = True  # runs whenever the run has matrices

    class Params(stitchbench.Params):
        n: int = 100  # test images for the activation norms

    def run(self, context, params):
        norms = {}
        for net in context.networks:
            # a job of our own: computed once per network and n, reused by key afterwards
            key = stitchbench.job_key("activation_norms", network=context.network_key(net), n=params.n)
            found = context.find_job(key)
            if found is not None:
                norms[net] = found.read_json("norms.json")
                continue
            with context.job_run(f"activation norms {net}", key=key, kind="activation_norms") as job:
                norms[net] = activation_norms(context.activations(net, "test", params.n))
                job.log_table(norms[net], "norms")
        gaps = {}
        for m in context.matrices:
            v = m.values if m.higher_is_more_similar else -m.values
            off = ~np.eye(len(v), dtype=bool)
            gaps[f"{m.measure}.{m.scope}.{m.source}"] = float(np.diag(v).mean() - v[off].mean())
        context.log_table(norms, "activation_norms")
        return stitchbench.EvaluationResult(
            metrics={f"gap.{k}": g for k, g in gaps.items()},
            tables={"gaps": gaps},
            report_key="diagonal_gap",
            report=gaps,
            report_text="\n".join(f"{k}: {g:+.3f}" for k, g in gaps.items()),
        )

    def estimate_cost(self, params, plan):
        """For `--dry-run`: negligible next to the run (a forward pass of n images per network)."""
        return []


@stitchbench.hookimpl
def register_evaluations(register):
    register(DiagonalGap())
