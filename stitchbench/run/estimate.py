"""How much compute a plan needs: job counts and an estimate of GPU-hours (``--dry-run``).

The cost of a job is counted in image passes through a network of the run's architecture:
*training passes* (forward + backward of one image) and *forward passes*. Network training
is counted here; each matcher says what one stitcher costs (`Matcher.estimate_cost`) and
each evaluation what it costs for the whole plan (`Evaluation.estimate_cost`); a plugin
that says nothing is listed as "not estimated". Passes become hours through a
`Throughput` (images per second of the architecture on one GPU): measured ones come from
``benchmarks/gpu_throughput.py --write FILE`` (``--throughput FILE``); without a file the
built-in figures below are used and the estimate says they are assumed, not measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..plugin.types import Cost, DatasetInfo, PlanSummary

#: Assumed single-GPU throughputs (images/s, float32, batch 128-256) at a reference image
#: side, for when nothing was measured: an RTX A6000-class card (the paper's mix ran
#: from RTX 2080 Ti to RTX A6000). Replace them by measuring (benchmarks/gpu_throughput.py).
ASSUMED: dict[str, dict[str, float]] = {
    "resnet18": {"side": 32, "train": 4000.0, "forward": 12000.0},
    "vit_tiny": {"side": 32, "train": 3000.0, "forward": 9000.0},
}
#: For an architecture without a figure: a ResNet-18's at CIFAR size.
FALLBACK = "resnet18"


@dataclass
class Throughput:
    """Images per second of one architecture on one GPU at image side ``side`` (pixels):
    ``train`` (forward + backward), ``forward`` (inference), ``tlm`` (a TLM stitcher's
    training step per image, when measured; else ``train``); ``measured`` says whether the
    numbers were measured and ``source`` where they came from."""

    side: int
    train: float
    forward: float
    tlm: float | None = None
    measured: bool = False
    source: str = "assumed"
    device: str = ""

    def at_side(self, side: int) -> Throughput:
        """Scaled to another image side (convolution and attention cost ~ pixels)."""
        f = (self.side / side) ** 2
        return Throughput(side, self.train * f, self.forward * f, None if self.tlm is None else self.tlm * f,
                          self.measured, self.source, self.device)


def load_throughputs(path: str | Path | None) -> dict[str, Throughput]:
    """The throughput of every architecture: ``ASSUMED``, overridden by the file's entries
    (the JSON that ``benchmarks/gpu_throughput.py --write`` produces)."""
    out = {name: Throughput(int(v["side"]), v["train"], v["forward"]) for name, v in ASSUMED.items()}
    if path is None:
        return out
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
        device = str(data.get("device", ""))
        for name, v in data["architectures"].items():
            out[name] = Throughput(int(v["side"]), float(v["train_images_per_s"]), float(v["forward_images_per_s"]),
                                   float(v["tlm_images_per_s"]) if v.get("tlm_images_per_s") else None,
                                   measured=True, source=str(p), device=device)
    except FileNotFoundError:
        raise UsageError(f"--throughput {p}: no such file (write one with benchmarks/gpu_throughput.py --write)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"--throughput {p}: not a throughput file from benchmarks/gpu_throughput.py ({e})") from None
    return out


@dataclass
class Line:
    what: str
    jobs: int
    hours: float | None  # None: not estimated


@dataclass
class Estimate:
    lines: list[Line] = field(default_factory=list)
    throughput: Throughput | None = None

    @property
    def hours(self) -> float:
        return sum(x.hours for x in self.lines if x.hours is not None)

    @property
    def jobs(self) -> int:
        return sum(x.jobs for x in self.lines)

    def describe(self) -> str:
        t = self.throughput
        rows = [f"estimate:   {self.jobs} job(s), about {_fmt_hours(self.hours)} on one GPU"]
        for x in self.lines:
            h = "not estimated" if x.hours is None else _fmt_hours(x.hours)
            rows.append(f"  - {x.what:44} {x.jobs:>7} job(s)  {h}")
        if t is not None:
            how = (f"measured on {t.device or 'a GPU'} ({t.source})" if t.measured else
                   "ASSUMED, not measured: run benchmarks/gpu_throughput.py --write FILE on your GPU, "
                   "then --throughput FILE")
            tlm = f", TLM {t.tlm:.0f}" if t.tlm else ""
            rows.append(f"  throughput at {t.side}px (images/s): train {t.train:.0f}, forward {t.forward:.0f}{tlm}; {how}")
        return "\n".join(rows)


def _fmt_hours(h: float) -> str:
    if h < 1:
        return f"{h * 60:.1f} GPU-minutes"
    return f"{h:,.1f} GPU-hours"


def _seconds(cost: Cost, t: Throughput) -> float:
    return cost.train_images / t.train + cost.tlm_images / (t.tlm or t.train) + cost.forward_images / t.forward


def summarise(plan: Any, info: DatasetInfo) -> PlanSummary:
    """What evaluations may base their cost on: data sizes, networks, layers, matrices."""
    stitch: dict[str, int] = {}
    targets: dict[str, set[str]] = {}
    for job in plan.jobs:
        if job.kind == "stitch_matrix":
            stitch[job.plugin.name] = stitch.get(job.plugin.name, 0) + 1
            targets.setdefault(job.plugin.name, set()).add(job.target.model_name)
    return PlanSummary(
        info=info,
        networks=len(plan.networks),
        layers=list(plan.layers),
        layer_shapes=dict(plan.layer_shapes),
        stitch_matrices=stitch,
        stitch_targets={k: len(v) for k, v in targets.items()},
        index_matrices=sum(j.kind == "index_matrix" for j in plan.jobs),
        config=plan.config,
    )


def estimate(plan: Any, info: DatasetInfo, throughputs: dict[str, Throughput]) -> Estimate:
    """GPU time of every job of ``plan`` on data described by ``info``."""
    arch = plan.architecture.name
    base = throughputs.get(arch) or throughputs[FALLBACK]
    t = base.at_side(int(info.image_shape[-1]))
    out = Estimate(throughput=t)
    training = plan.config.networks.training
    net_cost = Cost(train_images=training.epochs * info.n_train, forward_images=info.n_test * training.epochs)
    out.lines.append(Line(f"train {arch} networks", len(plan.networks), len(plan.networks) * _seconds(net_cost, t) / 3600))
    summary = summarise(plan, info)
    cells = len(plan.layers) ** 2
    for use in plan.matchers:
        n = summary.stitch_matrices.get(use.name, 0) * cells
        cost = use.obj.estimate_cost(use.params, info)
        out.lines.append(Line(f"{use.name} stitchers", n, None if cost is None else n * _seconds(cost, t) / 3600))
    n_idx = summary.index_matrices
    if n_idx:
        # one forward pass per network for the activations; the indices themselves are
        # linear algebra on n_examples rows, small next to the passes
        n_ex = plan.config.indices.n_examples or info.n_test
        cost = Cost(forward_images=2 * n_ex)
        out.lines.append(Line("index matrices", n_idx, n_idx * _seconds(cost, t) / 3600))
    for use in plan.evaluations:
        costs = use.obj.estimate_cost(use.params, summary)
        if costs is None:
            out.lines.append(Line(f"evaluation {use.name}", 1, None))
            continue
        for c in costs:
            out.lines.append(Line(f"{use.name}: {c.what}", c.jobs, _seconds(c, t) / 3600))
    return out
