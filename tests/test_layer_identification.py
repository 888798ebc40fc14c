"""Layer identification (Table 1): hits, misses and ties on small hand-made matrices, and
how the evaluation reports the ties (issue 15, point 5)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError
from stitchbench_plugins.evaluations.layer_identification import (
    LayerIdentification,
    identification_cases,
    identification_hits,
)

from stitchbench.run.context import MatrixRecord

# values[i, j]: source layer i against target layer j (a similarity: higher is more similar).
# Per target (down each column):
#   column 0: layers 0 and 1 share the best value 0.9        -> tied, 2-way, layer 0 first
#   column 1: layers 0, 1 and 2 share the best value 0.8     -> tied, 3-way, layer 1 not first
#   column 2: layer 2 alone has the best value               -> identified
#   column 3: layer 1 is better than layer 3                 -> missed
M = np.array([
    [0.9, 0.8, 0.1, 0.1],
    [0.9, 0.8, 0.2, 0.9],
    [0.1, 0.8, 0.7, 0.2],
    [0.0, 0.0, 0.3, 0.5],
])
OUTCOMES = ["tied", "tied", "identified", "missed"]
HITS = {"strict": [0.0, 0.0, 1.0, 0.0], "fractional": [0.5, 1 / 3, 1.0, 0.0], "first": [1.0, 0.0, 1.0, 0.0]}


def test_cases_of_a_hand_made_matrix():
    cases = identification_cases(M, True)
    assert [c.best for c in cases] == [(0, 1), (0, 1, 2), (2,), (1,)]
    assert [c.outcome for c in cases] == OUTCOMES


@pytest.mark.parametrize("ties", ["strict", "fractional", "first"])
def test_each_tie_rule_on_the_hand_made_matrix(ties):
    assert identification_hits(M, True, ties=ties) == pytest.approx(HITS[ties], abs=0)
    # the same as a distance, and looked at along the rows of the transpose
    assert identification_hits(-M, False, ties=ties) == pytest.approx(HITS[ties], abs=0)
    assert identification_hits(M.T, True, direction="per_source", ties=ties) == pytest.approx(HITS[ties], abs=0)


def test_strict_is_the_default_and_a_tie_is_a_strict_miss():
    assert identification_hits(M, True) == HITS["strict"]
    for c, h in zip(identification_cases(M, True), HITS["strict"]):
        assert (h == 1.0) == (c.outcome == "identified")


def test_relative_accuracies_tie_exactly():
    """Accuracies are multiples of 1/n_test, divided by the same target accuracy in a
    column: equal counts of correct images give exactly equal floats, a tie."""
    n_test, target_acc = 360, 331 / 360
    correct = np.array([[331, 300, 10], [331, 320, 50], [200, 320, 331]])
    rel = correct / n_test / target_acc
    assert [c.outcome for c in identification_cases(rel, True)] == ["tied", "tied", "identified"]
    # one image more for the corresponding layer breaks the tie
    correct[0, 0] += 1
    rel = correct / n_test / target_acc
    assert [c.outcome for c in identification_cases(rel, True)] == ["identified", "tied", "identified"]


def test_tie_tolerance():
    d = np.array([[0.10, 0.20], [0.10 + 1e-13, 0.50]])  # a distance: lower is more similar
    assert [c.outcome for c in identification_cases(d, False)] == ["identified", "missed"]
    assert [c.outcome for c in identification_cases(d, False, tie_tolerance=1e-12)] == ["tied", "missed"]
    assert identification_hits(d, False, ties="fractional", tie_tolerance=1e-12) == [0.5, 0.0]
    with pytest.raises(ValueError, match="tie_tolerance"):
        identification_cases(d, False, tie_tolerance=-1.0)
    with pytest.raises(ValidationError):
        LayerIdentification.Params(tie_tolerance=-0.1)
    with pytest.raises(ValidationError):
        LayerIdentification.Params(ties="random")


def test_bad_matrices_are_refused():
    with pytest.raises(ValueError, match="square"):
        identification_cases(np.zeros((2, 3)), True)
    with pytest.raises(ValueError, match="NaN"):
        identification_cases(np.array([[1.0, np.nan], [0.0, 1.0]]), True)


# ---------------------------------------------------------------- the evaluation's report

def _record(measure: str, scope: str, values: np.ndarray, higher: bool = True) -> MatrixRecord:
    return MatrixRecord(measure=measure, plugin=measure, functional=measure == "tlm", higher_is_more_similar=higher,
                        source="a", target="a" if scope == "intra" else "b", scope=scope,
                        layers=[f"l{i}" for i in range(len(values))], values=np.asarray(values, dtype=float))


def _context(records: list[MatrixRecord]) -> SimpleNamespace:
    return SimpleNamespace(
        measures=lambda: list(dict.fromkeys(r.measure for r in records)),
        matrices_of=lambda measure, scope=None: [r for r in records if r.measure == measure
                                                 and (scope is None or r.scope == scope)],
    )


RECORDS = [
    _record("tlm", "intra", np.eye(4)),  # 4 identified
    _record("tlm", "inter", M),  # 2 tied, 1 identified, 1 missed
    _record("tlm", "inter", M),  # again
    _record("lcka", "intra", np.eye(4) + 0.1),  # 4 identified
    _record("lcka", "inter", -M, higher=False),  # as tlm's one inter matrix, as a distance
]


def _run(**params):
    ev = LayerIdentification()
    return ev.run(_context(RECORDS), ev.Params(**params))


def test_report_keeps_the_fractions_and_adds_cases_identified_and_ties():
    out = _run()
    r = out.report
    # the contract: {"intra": {measure: fraction}, "inter": {...}} exactly as before
    assert r["intra"] == {"tlm": 1.0, "lcka": 1.0}
    assert r["inter"] == {"tlm": 2 / 8, "lcka": 1 / 4}
    assert r["cases"] == {"intra": {"tlm": 4, "lcka": 4}, "inter": {"tlm": 8, "lcka": 4}}
    assert r["identified"] == {"intra": {"tlm": 4, "lcka": 4}, "inter": {"tlm": 2, "lcka": 1}}
    assert r["ties"] == {"intra": {"tlm": 0, "lcka": 0}, "inter": {"tlm": 4, "lcka": 2}}
    assert r["rules"] == {"direction": "per_target", "ties": "strict", "tie_tolerance": 0.0}
    assert out.report_key == "layer_identification"
    assert out.metrics["layer_id.inter.tlm"] == 0.25
    assert out.metrics["layer_id.ties.inter.tlm"] == 4.0 and out.metrics["layer_id.ties.intra.lcka"] == 0.0
    counts = out.tables["layer_identification"]["counts"]
    assert counts["inter"]["tlm"] == {"hits": 2.0, "cases": 8, "identified": 2, "tied": 4, "missed": 2}


def test_text_table_shows_the_ties_per_measure_and_scope():
    text = _run().report_text
    lines = text.splitlines()
    assert "ties strict" in lines[0]
    assert lines[1].split() == ["measure", "intra-network", "ties", "inter-network", "ties"]
    assert lines[2].split() == ["tlm", "100.00%", "(4/4)", "0", "25.00%", "(2/8)", "4"]
    assert lines[3].split() == ["lcka", "100.00%", "(4/4)", "0", "25.00%", "(1/4)", "2"]
    assert "exact equality" in text and "strict counts them as misses" in text
    assert lines[-1] == "Ties in: tlm inter 4 of 8, lcka inter 2 of 4."


def test_other_tie_rules_change_the_fractions_not_the_tie_counts():
    strict = _run().report
    for ties in ("fractional", "first"):
        r = _run(ties=ties).report
        assert r["ties"] == strict["ties"] and r["cases"] == strict["cases"] and r["identified"] == strict["identified"]
        assert r["rules"]["ties"] == ties
        # tlm inter: two copies of M
        assert r["inter"]["tlm"] == pytest.approx(sum(HITS[ties]) / 4)
    no_ties = LayerIdentification().run(_context(RECORDS[:1]), LayerIdentification.Params())
    assert no_ties.report_text.splitlines()[-1] == "No case is a tie."
    assert no_ties.report["inter"] == {} and no_ties.report["ties"] == {"intra": {"tlm": 0}, "inter": {}}
