"""The report of ``energy_ood``: its section of ``stitchbench report`` (JSON) and the text
table."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stitchbench import MatrixRecord

    from .analysis import Detector, MatrixResult

#: The order of the matchers in tables and in the rows of the Fig. 2 layout; others follow.
MEASURE_ORDER = ("tlm", "dm")


def matrix_stem(rec: MatrixRecord) -> str:
    """A file name for a stitching matrix: ``<matcher>_<scope>_<source>[__<target>]``."""
    who = rec.source if rec.scope == "intra" else f"{rec.source}__{rec.target}"
    return f"{rec.plugin}_{rec.scope}_{who}"


def ordered_measures(measures: set[str]) -> list[str]:
    return [m for m in MEASURE_ORDER if m in measures] + sorted(m for m in measures if m not in MEASURE_ORDER)


def build_report(results: list[MatrixResult], summary: dict[str, Any], measures: list[str],
                 auxiliary: dict[str, Any], detectors: list[Detector], min_sanity_auroc: float) -> dict[str, Any]:
    """The ``ood`` section: layers, auxiliary set, matchers, the summary, every matrix's
    scores and relative accuracies, and every detector with its sanity scores."""
    mats: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in results:
        rec = r.record
        mats.setdefault(rec.plugin, {}).setdefault(rec.scope, []).append({
            "source": rec.source,
            "target": rec.target,
            "auroc": r.auroc.tolist(),
            "aupr": r.aupr.tolist(),
            "fpr95": r.fpr95.tolist(),
            "measure": rec.measure,
            "relative_accuracy": [[float(v) for v in row] for row in rec.values],
            "diag": r.diag,
            "offdiag": r.offdiag,
        })
    return {
        "layers": list(results[0].record.layers),
        "auxiliary": auxiliary,
        "matchers": measures,
        "summary": summary,
        "matrices": mats,
        "detectors": [
            {
                "network": d.network, "layer": d.layer, "model_name": d.model_name, "version": d.version,
                "key": d.key, "reused": d.reused, "sanity_auroc": d.sanity["auroc"],
                "sanity_aupr": d.sanity["aupr"], "sanity_fpr95": d.sanity["fpr95"],
                "id_test_accuracy": d.id_accuracy,
            }
            for d in detectors
        ],
        "min_sanity_auroc": min_sanity_auroc,
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [
        "Energy-based OOD analysis (Section 4): AUROC separating stitched T(f<=i(x)) from target g<=j(x)",
        "(0.5 = in distribution, 1.0 = fully separable; means over diagonal / off-diagonal cells)",
        f"{'matcher':10} {'scope':6} {'diag':>7} {'offdiag':>8} {'matrices':>9}",
    ]
    for m in report["matchers"]:
        for scope in ("intra", "inter", "all"):
            s = report["summary"].get(m, {}).get(scope)
            if s is None:
                continue
            off = f"{s['offdiag']:.3f}" if math.isfinite(s["offdiag"]) else "-"
            lines.append(f"{m:10} {scope:6} {s['diag']:7.3f} {off:>8} {s['matrices']:9d}")
    dets = report["detectors"]
    sanity = [d["sanity_auroc"] for d in dets]
    weak = [d for d in dets if d["sanity_auroc"] < report["min_sanity_auroc"]]
    lines.append(
        f"detectors: {len(dets)} ({sum(not d['reused'] for d in dets)} trained, {sum(d['reused'] for d in dets)} reused);"
        f" sanity AUROC vs held-out {report['auxiliary']['name']}: min {min(sanity):.3f}, "
        f"mean {sum(sanity) / len(sanity):.3f}"
    )
    if weak:
        lines.append(
            f"  warning: {len(weak)} detector(s) below {report['min_sanity_auroc']:.2f}: "
            + ", ".join(f"{d['network']}/{d['layer']} {d['sanity_auroc']:.3f}" for d in weak)
        )
    return "\n".join(lines)
