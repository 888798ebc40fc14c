"""Layer identification (paper Section 3, Table 1): how often the most similar layer is
the architecturally corresponding one, within a network and between networks."""

from __future__ import annotations

from typing import Any, Literal

import stitchbench
from stitchbench import Evaluation, EvaluationResult, Params


def identification_hits(
    values: Any, higher_is_more_similar: bool, direction: str = "per_target", ties: str = "strict"
) -> list[float]:
    """One score per layer: 1 when the corresponding layer is the most similar, else 0.

    ``values[i, j]`` compares source layer i with target layer j. ``per_target`` looks down
    each column (for target layer j, the best source layer); ``per_source`` along each row.
    Ties for the best value: ``strict`` counts a hit only when the corresponding layer is the
    unique best; ``fractional`` gives 1/k when it is one of k tied best; ``first`` takes the
    first best in layer order (what ``numpy.argmax`` does).
    """
    import numpy as np

    m = np.asarray(values, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"layer identification needs a square matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("layer identification got a matrix with NaN or inf values")
    if not higher_is_more_similar:
        m = -m
    if direction == "per_source":
        m = m.T
    hits = []
    for j in range(m.shape[1]):
        col = m[:, j]
        best = np.flatnonzero(col == col.max())
        if ties == "first":
            hits.append(float(best[0] == j))
        elif j not in best:
            hits.append(0.0)
        elif ties == "fractional":
            hits.append(1.0 / len(best))
        else:
            hits.append(float(len(best) == 1))
    return hits


class LayerIdentification(Evaluation):
    """Table 1: fraction of layers whose most similar layer is the corresponding one (intra and inter)."""

    name = "layer_identification"
    summarises_matrices = True

    class Params(Params):
        direction: Literal["per_target", "per_source"] = "per_target"
        ties: Literal["strict", "fractional", "first"] = "strict"

    def estimate_cost(self, params: Any, plan: stitchbench.PlanSummary) -> list[stitchbench.Cost]:
        return []  # reads the matrices only

    def run(self, context: stitchbench.RunContext, params: Any) -> EvaluationResult:
        result: dict[str, dict[str, float]] = {"intra": {}, "inter": {}}
        counts: dict[str, dict[str, dict[str, float]]] = {"intra": {}, "inter": {}}
        for measure in context.measures():
            for scope in ("intra", "inter"):
                mats = context.matrices_of(measure, scope)
                if not mats:
                    continue
                hits: list[float] = []
                for m in mats:
                    hits += identification_hits(m.values, m.higher_is_more_similar, params.direction, params.ties)
                result[scope][measure] = sum(hits) / len(hits)
                counts[scope][measure] = {"hits": sum(hits), "cases": len(hits)}
        metrics = {f"layer_id.{scope}.{m}": v for scope, d in result.items() for m, v in d.items()}
        text = format_table(result, counts, params)
        return EvaluationResult(
            metrics=metrics,
            tables={"layer_identification": {"fractions": result, "counts": counts,
                                             "direction": params.direction, "ties": params.ties}},
            report_key="layer_identification",
            report=result,
            report_text=text,
        )


def format_table(result: dict, counts: dict, params: Any) -> str:
    measures = list(dict.fromkeys([*result["intra"], *result["inter"]]))
    lines = [
        f"Layer identification (Table 1; best layer {params.direction.replace('_', ' ')}, ties {params.ties})",
        f"{'measure':12} {'intra-network':>22} {'inter-network':>22}",
    ]
    for m in measures:
        cells = []
        for scope in ("intra", "inter"):
            if m in result[scope]:
                c = counts[scope][m]
                cells.append(f"{100 * result[scope][m]:6.2f}% ({c['hits']:g}/{c['cases']})")
            else:
                cells.append("-")
        lines.append(f"{m:12} {cells[0]:>22} {cells[1]:>22}")
    return "\n".join(lines)


@stitchbench.hookimpl
def register_evaluations(register):
    register(LayerIdentification())
