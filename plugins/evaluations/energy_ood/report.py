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
                 auxiliary: dict[str, Any], detectors: list[Detector], min_sanity_auroc: float,
                 high_accuracy: dict[str, dict[str, dict[str, Any]]] | None = None,
                 ood_auroc: float = 0.9) -> dict[str, Any]:
    """The ``ood`` section: layers, auxiliary set, matchers, the summary, the conditional
    high-accuracy statistic (``high_accuracy``: ``{matcher: {scope: {threshold, cells,
    mean_auroc, fraction_ood, correlation}}}``, None where undefined; ``high_accuracy_ood_auroc``
    the AUROC above which a cell counts as OOD), every matrix's scores and relative
    accuracies, and every detector with its sanity scores."""
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
        "high_accuracy": high_accuracy or {},
        "high_accuracy_ood_auroc": ood_auroc,
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
    lines += format_high_accuracy(report)
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


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, fmt)


def format_high_accuracy(report: dict[str, Any]) -> list[str]:
    """The table of the conditional statistic and a one-line reading of the paper's claim
    (nothing for a report written before the statistic existed)."""
    high = report.get("high_accuracy") or {}
    if not high:
        return []
    some = next((st for scopes in high.values() for st in scopes.values()), None)
    if some is None:
        return []
    thr, cut = some["threshold"], report.get("high_accuracy_ood_auroc", 0.9)
    lines = [
        f"High-accuracy stitches (Section 4): off-diagonal cells with relative accuracy >= {thr:g}",
        f"{'matcher':10} {'scope':6} {'cells':>6} {'mean AUROC':>11} {f'AUROC>{cut:g}':>10} {'r(acc, AUROC)':>14}",
    ]
    for m in report["matchers"]:
        for scope in ("intra", "inter", "all"):
            st = high.get(m, {}).get(scope)
            if st is None:
                continue
            frac = "-" if st["fraction_ood"] is None else f"{100 * st['fraction_ood']:.1f}%"
            lines.append(f"{m:10} {scope:6} {st['cells']:6d} {_num(st['mean_auroc'], '.3f'):>11} {frac:>10} "
                         f"{_num(st['correlation'], '.2f'):>14}")
    lines.append(reading(high, cut))
    return lines


def reading(high: dict[str, dict[str, dict[str, Any]]], cut: float) -> str:
    """One line: does this run show the paper's claim (high-accuracy DM stitches in
    distribution, TLM's out of distribution)? Read from the pooled (``all``) scope."""
    claim = "reading (paper: high-accuracy DM stitches are in distribution, TLM's out of distribution)"
    dm, tlm = high.get("dm", {}).get("all"), high.get("tlm", {}).get("all")
    if dm is None or tlm is None:
        return f"{claim}: this run lacks {'DM' if dm is None else 'TLM'} matrices to compare"
    if dm["mean_auroc"] is None or tlm["mean_auroc"] is None:
        who = " and ".join(n for n, st in (("DM", dm), ("TLM", tlm)) if st["mean_auroc"] is None)
        return f"{claim}: no off-diagonal {who} cell reaches the threshold here, so no comparison"
    agrees = tlm["mean_auroc"] > dm["mean_auroc"]
    return (
        f"{claim}: TLM's mean AUROC {tlm['mean_auroc']:.3f} ({100 * tlm['fraction_ood']:.1f}% > {cut:g}) "
        f"vs DM's {dm['mean_auroc']:.3f} ({100 * dm['fraction_ood']:.1f}%): "
        + ("consistent with the claim" if agrees else "contrary to the claim")
    )
