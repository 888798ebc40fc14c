"""Parameters of Ding et al.'s tests (paper Section 5; defaults follow the authors' code,
see docs/ding.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from stitchbench import Params

MEASURES = ("lcka", "pwcca", "opd", "dm_func", "dm_struct")
DISPLAY = {"lcka": "LCKA", "pwcca": "PWCCA", "opd": "OPD", "dm_func": "DM (func.)", "dm_struct": "DM (struct.)"}


class ProbeParams(Params):
    """How a linear probe is trained (defaults: the authors' ``exec_probe.py``, ``train_prober``)."""

    epochs: int = Field(10, ge=1, description="training epochs of each probe")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    lr_drop_epoch: int | None = Field(
        5, ge=0, description="from this 0-based epoch on the lr is multiplied by lr_drop_factor; null = never"
    )
    lr_drop_factor: float = Field(0.1, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(64, ge=1, description="images per probe mini-batch (not given by the reference)")


class DingParams(Params):
    """Parameters both tests have."""

    probe: ProbeParams = Field(default_factory=ProbeParams, description="linear probe training")
    measures: list[str] = Field(
        default_factory=lambda: list(MEASURES),
        description="dissimilarities d: similarity index names (similarities become 1 − s) and dm_func",
    )
    networks: int | None = Field(None, ge=1, description="use the run's first N networks; null = all")
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level; weaker correlations show as ≈ 0")
    n_permutations: int = Field(2000, ge=0, description="random permutations per permutation test (seeded)")
    significance: Literal["ding", "permutation"] = Field(
        "ding", description="which p-values decide significance: Ding et al.'s one-sided scipy p, or permutation"
    )
    reuse_probes: bool = Field(True, description="reuse probe accuracies of earlier runs with the same key")
    cpu_threads: int | None = Field(
        1, ge=1, description="torch intra-op threads while the test runs on a CPU device; null = torch's "
        "setting. 1 is fastest for small networks (many tiny operations); probes and DM fits always use 1",
    )
