"""The paper presets run the authors' protocol: every switch where stitchbench's default
differs from the authors' code is set to the authors' behaviour, and `--dry-run` shows it
(docs/fidelity.md)."""

from __future__ import annotations

import pytest

from stitchbench.plugin.manager import load_plugins
from stitchbench.run.config import build_config, preset_names
from stitchbench.run.plan import make_plan

PAPER = [p for p in preset_names() if p.startswith("paper-")]


@pytest.mark.parametrize("preset", PAPER)
def test_paper_presets_select_the_authors_switches_and_the_dry_run_shows_them(preset, workspace):
    plan = make_plan(build_config(preset), load_plugins(workspace), load_data=False)
    text = plan.describe()
    uses = {u.name: u for u in [plan.architecture, *plan.matchers, *plan.indices, *plan.evaluations]}
    if "dm" in uses:
        assert uses["dm"].params.cutoff == "authors" and "dm: cutoff=authors" in text
    if "tlm" in uses:
        assert uses["tlm"].params.dm.cutoff == "authors" and "tlm: dm.cutoff=authors" in text
    if "pwcca" in uses:
        assert uses["pwcca"].params.convention == "ding" and "pwcca: convention=ding" in text
    if "dm_struct" in uses:
        assert (uses["dm_struct"].params.cutoff, uses["dm_struct"].params.reduction) == ("authors", "per_batch")
        assert "dm_struct: reduction=per_batch, cutoff=authors" in text
    if "ding_sensitivity" in uses:
        assert uses["ding_sensitivity"].params.sets == "pooled" and "sets=pooled" in text
    if "energy_ood" in uses:
        assert uses["energy_ood"].params.finetune.recipe == "authors" and "finetune.recipe=authors" in text
    if plan.dataset.name == "svhn":
        assert plan.dataset.params.augmentation == "authors" and "svhn: augmentation=authors" in text
    if plan.architecture.name == "resnet18":
        want = "imagenet" if plan.dataset.name == "imagenet" else "cifar"
        assert plan.architecture.params.stem == want
        assert ("stem=imagenet" in text) == (want == "imagenet")
