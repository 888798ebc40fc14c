"""The probing accuracy F of many representations, as jobs: reused by key when an earlier
run computed them, else trained as tasks of the run's executor.

A probe job holds the probes of one (network, layer) at a list of ranks; its key hashes
the network's key, the data set, the layer, the ranks, the probe settings, the seed and
the probing code. Each probe is initialised from a seed of its own (from `probe_key`), and all
probes see the same mini-batches, so a probe's accuracy does not depend on which other
probes it is trained with: within a run, a probe the other test already trained is not
trained again (``context.shared``), and what a job holds is what training it alone gives.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import stitchbench
from stitchbench import RunContext

from . import probe_training, representations
from .features import network_features
from .params import ProbeParams
from .representations import Rep

log = logging.getLogger(__name__)

#: The artifact of a probe job: ``{"version", "probes": {rank or "full": accuracy}}``.
PROBE_ARTIFACT = "probes.json"
#: Bump when the definition of a probe or of the low-rank approximation changes.
PROBE_VERSION = 3


def probe_key(context: RunContext, rep: Rep, params: ProbeParams) -> str:
    """What identifies ``rep``'s probe within a run; its first 32 bits seed the probe's
    initialisation. The network enters by its name (data set, architecture tag, seed), not
    its job key: the key also holds the identity of the plugins' code (an edit, or an
    editable install instead of a release), which must not change a probe's seed. Reuse
    across runs goes by `probe_job_key`, which has the network's key."""
    return stitchbench.job_key(
        "ding_probe",
        version=PROBE_VERSION,
        network=rep.network,
        dataset=context.config.dataset.model_dump(mode="json"),
        layer=rep.layer,
        rank=rep.rank,
        probe=params.model_dump(mode="json"),
        seed=context.config.seed,
    )


def probe_code_version() -> str:
    """The identity of the code that defines a probe's accuracy (part of every probe job's key)."""
    return stitchbench.code_version(probe_training, representations)


def probe_job_key(context: RunContext, network: str, layer: str, ranks: Sequence[int | None],
                  params: ProbeParams, code: str) -> str:
    """The key of the job that probes (network, layer) at ``ranks`` (None: full rank);
    ``code`` is `probe_code_version`."""
    return stitchbench.job_key(
        "ding_probes",
        version=PROBE_VERSION,
        network=context.network_key(network),
        dataset=context.config.dataset.model_dump(mode="json"),
        layer=layer,
        ranks=list(ranks),
        probe=params.model_dump(mode="json"),
        seed=context.config.seed,
        code=code,
    )


def _rank_name(rank: int | None) -> str:
    return "full" if rank is None else str(rank)


class _Job:
    """The probes of one (network, layer): its representations by rank, key and accuracies."""

    def __init__(self, context: RunContext, network: str, layer: str, reps: list[Rep], params: ProbeParams,
                 code: str):
        self.network, self.layer = network, layer
        self.reps = {r.rank: r for r in reps}
        self.key = probe_job_key(context, network, layer, list(self.reps), params, code)
        self.probe_keys = {rank: probe_key(context, r, params) for rank, r in self.reps.items()}
        self.accuracy: dict[int | None, float] = {}
        self.reused = False

    @property
    def label(self) -> str:
        ranks = ",".join(_rank_name(r) for r in self.reps)
        return f"ding probes {self.network}/{self.layer} (ranks {ranks})"


def probe_scores(context: RunContext, reps: Sequence[Rep], params: ProbeParams, *,
                 reuse: bool = True) -> tuple[list[float], dict[str, dict[str, Any]], int]:
    """F for every representation: (accuracies, one record per probe for ``probes.json``,
    how many probes were reused from the store)."""
    jobs: dict[tuple[str, str], list[Rep]] = {}
    for r in reps:
        group = jobs.setdefault((r.network, r.layer), [])
        if all(g.rank != r.rank for g in group):
            group.append(r)
    code = probe_code_version()
    todo = [_Job(context, net, layer, group, params, code) for (net, layer), group in jobs.items()]
    memo: dict[str, float] = context.shared.setdefault("ding.probes", {})  # probe key -> accuracy
    reused = 0
    for job in todo:
        found = context.find_job(job.key) if reuse else None
        if found is not None:
            stored = found.read_json(PROBE_ARTIFACT)["probes"]
            job.accuracy = {rank: float(stored[_rank_name(rank)]) for rank in job.reps}
            job.reused = True
            reused += len(job.reps)
        else:
            job.accuracy = {rank: memo[k] for rank, k in job.probe_keys.items() if k in memo}
    _train_missing(context, [j for j in todo if len(j.accuracy) < len(j.reps)], params)
    for job in todo:
        memo.update({job.probe_keys[rank]: acc for rank, acc in job.accuracy.items()})
        if not job.reused:
            with context.job_run(job.label, key=job.key, kind="ding_probes") as out:
                out.log_table({"version": PROBE_VERSION, "network": job.network, "layer": job.layer,
                               "probes": {_rank_name(r): a for r, a in job.accuracy.items()}}, PROBE_ARTIFACT)
    by_group = {(j.network, j.layer): j for j in todo}
    accuracies = [by_group[(r.network, r.layer)].accuracy[r.rank] for r in reps]
    records = {}
    for r, a in zip(reps, accuracies):
        job = by_group[(r.network, r.layer)]
        records[job.probe_keys[r.rank]] = {"accuracy": a, "network": r.network, "layer": r.layer, "rank": r.rank,
                                           "job": job.key}
    return accuracies, records, reused


def _train_missing(context: RunContext, jobs: list[_Job], params: ProbeParams) -> None:
    """Train the probes the jobs still miss: locally one batched model for all of them,
    on Ray one task per network (a probe's accuracy does not depend on its company)."""
    if not jobs:
        return
    groups, missing, labels = [], [], None
    for job in jobs:
        ranks = [rank for rank in job.reps if rank not in job.accuracy]
        feats = network_features(context, job.network)
        labels = feats.labels
        groups.append(probe_training.ProbeGroup(
            feats.pooled["train"][job.layer], feats.pooled["test"][job.layer],
            [job.reps[rank].projection for rank in ranks], [int(job.probe_keys[rank][:8], 16) for rank in ranks]))
        missing.append(ranks)
    chunks: dict[str, list[int]] = {}
    for n, job in enumerate(jobs):
        chunks.setdefault("all" if context.tasks_in_process else job.network, []).append(n)
    futures = {
        context.submit(probe_training.probe_task, [groups[n] for n in members], labels["train"], labels["test"],
                       params, context.data.num_classes, context.config.seed, str(context.device),
                       label=f"ding probes ({name}: {sum(len(groups[n].seeds) for n in members)})"): members
        for name, members in chunks.items()
    }
    for fut in context.as_completed(list(futures)):
        for n, group_accs in zip(futures[fut], fut.result()):
            jobs[n].accuracy.update(zip(missing[n], group_accs))
