"""Layer identification (paper Section 3, Table 1): how often the most similar layer is
the architecturally corresponding one, within a network and between networks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

import stitchbench
from stitchbench import Evaluation, EvaluationResult, Params

SCOPES = ("intra", "inter")


@dataclass(frozen=True)
class Case:
    """One case of Table 1: the layers with the best value (in layer order) and the
    corresponding layer. ``outcome`` is ``identified`` (it is the unique best), ``tied``
    (it shares the best value with other layers) or ``missed`` (another layer is better)."""

    best: tuple[int, ...]
    correct: int

    @property
    def outcome(self) -> str:
        if self.correct not in self.best:
            return "missed"
        return "identified" if len(self.best) == 1 else "tied"

    def hit(self, ties: str = "strict") -> float:
        """The case's score under a tie rule (see `identification_hits`)."""
        if ties == "first":
            return float(self.best[0] == self.correct)
        if self.correct not in self.best:
            return 0.0
        if ties == "fractional":
            return 1.0 / len(self.best)
        return float(len(self.best) == 1)


def identification_cases(
    values: Any, higher_is_more_similar: bool, direction: str = "per_target", tie_tolerance: float = 0.0
) -> list[Case]:
    """The cases of one square matrix, one per layer (see `identification_hits`).

    The best layers of a case are those whose value is within ``tie_tolerance`` (absolute,
    in the measure's units) of the best value; with the default 0 that is exact equality.
    """
    import numpy as np

    m = np.asarray(values, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"layer identification needs a square matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("layer identification got a matrix with NaN or inf values")
    if not tie_tolerance >= 0.0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
    if not higher_is_more_similar:
        m = -m
    if direction == "per_source":
        m = m.T
    cases = []
    for j in range(m.shape[1]):
        col = m[:, j]
        best = np.flatnonzero(col >= col.max() - tie_tolerance)
        cases.append(Case(best=tuple(int(i) for i in best), correct=j))
    return cases


def identification_hits(
    values: Any, higher_is_more_similar: bool, direction: str = "per_target", ties: str = "strict",
    tie_tolerance: float = 0.0,
) -> list[float]:
    """One score per layer: 1 when the corresponding layer is the most similar, else 0.

    ``values[i, j]`` compares source layer i with target layer j. ``per_target`` looks down
    each column (for target layer j, the best source layer); ``per_source`` along each row.
    Ties for the best value (exact equality, or within ``tie_tolerance``): ``strict``
    counts a hit only when the corresponding layer is the unique best; ``fractional`` gives
    1/k when it is one of k tied best; ``first`` takes the first best in layer order (what
    ``numpy.argmax`` does).
    """
    return [c.hit(ties) for c in identification_cases(values, higher_is_more_similar, direction, tie_tolerance)]


class LayerIdentification(Evaluation):
    """Table 1: fraction of layers whose most similar layer is the corresponding one (intra and inter)."""

    name = "layer_identification"
    summarises_matrices = True

    class Params(Params):
        direction: Literal["per_target", "per_source"] = "per_target"
        ties: Literal["strict", "fractional", "first"] = "strict"
        tie_tolerance: float = Field(
            0.0, ge=0.0, allow_inf_nan=False,
            description="values within this (absolute, in the measure's units) of the best count as tied; 0 = exact equality",
        )

    def estimate_cost(self, params: Any, plan: stitchbench.PlanSummary) -> list[stitchbench.Cost]:
        return []  # reads the matrices only

    def run(self, context: stitchbench.RunContext, params: Any) -> EvaluationResult:
        result: dict[str, dict[str, float]] = {s: {} for s in SCOPES}
        counts: dict[str, dict[str, dict[str, float]]] = {s: {} for s in SCOPES}
        for measure in context.measures():
            for scope in SCOPES:
                mats = context.matrices_of(measure, scope)
                if not mats:
                    continue
                cases: list[Case] = []
                for m in mats:
                    cases += identification_cases(m.values, m.higher_is_more_similar, params.direction,
                                                  params.tie_tolerance)
                hits = [c.hit(params.ties) for c in cases]
                outcomes = [c.outcome for c in cases]
                result[scope][measure] = sum(hits) / len(hits)
                counts[scope][measure] = {"hits": sum(hits), "cases": len(cases),
                                          **{k: outcomes.count(k) for k in ("identified", "tied", "missed")}}
        metrics = {f"layer_id.{scope}.{m}": v for scope, d in result.items() for m, v in d.items()}
        metrics |= {f"layer_id.ties.{scope}.{m}": float(c["tied"]) for scope, d in counts.items() for m, c in d.items()}
        rules = {"direction": params.direction, "ties": params.ties, "tie_tolerance": params.tie_tolerance}

        def per_scope(key: str) -> dict[str, dict[str, int]]:
            return {scope: {m: c[key] for m, c in d.items()} for scope, d in counts.items()}

        report: dict[str, Any] = {
            **result,  # {"intra": {measure: fraction}, "inter": {...}}: Table 1 as the paper prints it
            "cases": per_scope("cases"),
            "identified": per_scope("identified"),
            "ties": per_scope("tied"),
            "rules": rules,
        }
        text = format_table(result, counts, params)
        return EvaluationResult(
            metrics=metrics,
            tables={"layer_identification": {"fractions": result, "counts": counts, **rules}},
            report_key="layer_identification",
            report=report,
            report_text=text,
        )


def format_table(result: dict, counts: dict, params: Any) -> str:
    measures = list(dict.fromkeys([*result["intra"], *result["inter"]]))
    tol = getattr(params, "tie_tolerance", 0.0)
    equal = "exact equality" if tol == 0 else f"within {tol:g} of the best value"
    lines = [
        f"Layer identification (Table 1; best layer {params.direction.replace('_', ' ')}, ties {params.ties})",
        f"{'measure':12} {'intra-network':>22} {'ties':>5} {'inter-network':>22} {'ties':>5}",
    ]
    tied_in = []
    for m in measures:
        cells = []
        for scope in SCOPES:
            if m in result[scope]:
                c = counts[scope][m]
                cells += [f"{100 * result[scope][m]:6.2f}% ({c['hits']:g}/{c['cases']})", f"{c['tied']}"]
                if c["tied"]:
                    tied_in.append(f"{m} {scope} {c['tied']} of {c['cases']}")
            else:
                cells += ["-", "-"]
        lines.append(f"{m:12} {cells[0]:>22} {cells[1]:>5} {cells[2]:>22} {cells[3]:>5}")
    rule = {"strict": "ties strict counts them as misses",
            "fractional": "ties fractional counts 1/k for a k-way tie",
            "first": "ties first counts one when the corresponding layer is the first of the tied in layer order"
            }[params.ties]
    lines.append(f"ties: cases where the corresponding layer shares the best value with another layer "
                 f"({equal}); {rule}.")
    lines.append("Ties in: " + ", ".join(tied_in) + "." if tied_in else "No case is a tie.")
    return "\n".join(lines)


@stitchbench.hookimpl
def register_evaluations(register):
    register(LayerIdentification())
