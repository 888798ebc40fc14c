"""The framework both of Ding et al.'s tests share (paper Section 5; docs/ding.md).

A set S of representations, the probing accuracy F of each, the reference A = argmax_S F,
and for every B in S the pair (|F(A) − F(B)|, d(A, B)) for each measure d; Kendall's τ and
Spearman's ρ of the pairs. The sensitivity test builds S from low-rank approximations of
one layer, the specificity test from every layer of several networks; `DingTest` is the
evaluation logic they share, and the two plugins say how S is built.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from stitchbench import Cost, Evaluation, EvaluationResult

from .figures import scatter_figure
from .params import DingParams
from .report import format_table, jsonable

if TYPE_CHECKING:
    from stitchbench import RunContext

    from .representations import Rep

log = logging.getLogger(__name__)


@dataclass
class RepSet:
    """One set S of representations (``reps[0]`` wins ties for the reference).
    ``reference_among``: the positions the reference may take (None: any), e.g. the
    full-rank representations of a pooled sensitivity set."""

    name: str
    reps: list[Rep]
    meta: dict[str, Any] = field(default_factory=dict)
    low_rank: bool = False
    reference_among: list[int] | None = None


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
    from .distances import distances, dm_relative_accuracies
    from .probes import probe_scores

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
        ref = reference_index(f, s.reference_among)
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


def reference_index(scores: Sequence[float], among: Sequence[int] | None = None) -> int:
    """A = argmax F over the set (over ``among`` when given); the first best on ties (the
    higher rank, or the earlier network)."""
    candidates = range(len(scores)) if among is None else among
    return max(candidates, key=lambda i: (scores[i], -i))


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


class DingTest(Evaluation):
    """Shared run logic of the two tests; subclasses build the sets."""

    requires: ClassVar[tuple[str, ...]] = ("dm", "lcka", "pwcca", "opd", "dm_struct")
    #: one-epoch probes and few permutations for `stitchbench plugins check`
    check_params: ClassVar[dict[str, Any]] = {"probe": {"epochs": 1}, "n_permutations": 20}
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
        from .probes import PROBE_VERSION
        from .threads import one_cpu_thread

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
        context.log_metrics({"probes": float(len(records)), "probes_reused_from_store": float(reused),
                             "seconds": time.perf_counter() - t0, **{f"seconds.{k}": v for k, v in timings.items()}})
        return EvaluationResult(
            metrics=metrics,
            tables={
                self.name: jsonable({"summary": summary, "sets": [r.table() for r in results],
                                     "params": params.model_dump(mode="json")}),
                "probes": {"version": PROBE_VERSION, "probes": records},
            },
            figures={f"{self.name}_scatter": scatter_figure(
                results, params.measures, summary, f"Ding et al.'s {name} test: |ΔF| against d")},
            report_key="ding",
            report={name: jsonable(summary)},
            report_text=text,
        )
