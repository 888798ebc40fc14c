"""Ding et al.'s statistical tests: statistics, low-rank approximation, probes, PWCCA on
rank-deficient input, parameters of the paper presets, and a tiny run end to end."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy import stats
from stitchbench_plugins.evaluations.ding import stats as ds
from stitchbench_plugins.evaluations.ding.features import pooled
from stitchbench_plugins.evaluations.ding.params import ProbeParams
from stitchbench_plugins.evaluations.ding.probe_training import ProbeGroup, probe_accuracies, train_probes
from stitchbench_plugins.evaluations.ding.representations import fit_low_rank
from stitchbench_plugins.evaluations.ding.sensitivity import DingSensitivity, default_ranks, layer_ranks
from stitchbench_plugins.evaluations.ding.specificity import DingSpecificity

import stitchbench

from .conftest import client_of

# Under pytest-xdist the modules that read the shared run's rerun go to one process: it is made once.
pytestmark = pytest.mark.xdist_group("rerun")

MEASURES = ("lcka", "pwcca", "opd", "dm_func", "dm_struct")

# -- statistics ---------------------------------------------------------------------------


@pytest.mark.parametrize("sign", [1, -1])
def test_correlations_and_one_sided_p_match_scipy(sign):
    rng = np.random.default_rng(0)
    x = rng.normal(size=15)
    y = sign * x + 0.8 * rng.normal(size=15)
    kt, sp = stats.kendalltau(x, y), stats.spearmanr(x, y)
    tau, p_tau = ds.kendall(x, y)
    rho, p_rho = ds.spearman(x, y)
    assert tau == pytest.approx(kt.statistic, abs=1e-12)
    assert rho == pytest.approx(sp.statistic, abs=1e-12)
    assert (tau > 0) == (sign > 0) and (rho > 0) == (sign > 0)
    # Ding et al.: p/2 for a positive correlation, 1 - p/2 otherwise
    expect_t = kt.pvalue / 2 if kt.statistic > 0 else 1 - kt.pvalue / 2
    expect_r = sp.pvalue / 2 if sp.statistic > 0 else 1 - sp.pvalue / 2
    assert p_tau == pytest.approx(expect_t, rel=1e-12)
    assert p_rho == pytest.approx(expect_r, rel=1e-12)
    assert (p_tau < 0.05) == (sign > 0)  # a strong negative correlation is not significant one-sided


def test_one_sided_conversion():
    assert ds.ding_one_sided(0.2, 0.5) == pytest.approx(0.1)
    assert ds.ding_one_sided(0.2, -0.5) == pytest.approx(0.9)
    assert ds.ding_one_sided(0.2, 0.0) == pytest.approx(0.9)
    assert math.isnan(ds.ding_one_sided(float("nan"), 0.3))


def test_undefined_correlations_are_nan():
    assert all(math.isnan(v) for v in ds.kendall([1, 1, 1, 1], [1, 2, 3, 4]))
    assert all(math.isnan(v) for v in ds.spearman([1, 2], [2, 1]))


def test_planted_monotone_relation_is_perfect_and_significant():
    x = np.arange(10.0)
    y = np.exp(x / 3)  # monotone, not linear
    s = ds.correlate_sets([(x, y)], n_permutations=2000, seed=1, alpha=0.05)
    assert s["tau"] == pytest.approx(1.0) and s["rho"] == pytest.approx(1.0)
    assert s["p_tau"] < 1e-4 and s["p_rho"] < 1e-4
    assert s["perm_p_tau"] == pytest.approx(1 / 2001) and s["perm_p_rho"] == pytest.approx(1 / 2001)
    assert s["significant"]


def test_permutation_pvalues_of_shuffled_relation_are_not_significant():
    rng = np.random.default_rng(3)
    ps = []
    for _ in range(20):
        x, y = rng.normal(size=12), rng.normal(size=12)
        ps.append(ds.permutation_pvalues(x, y, n_permutations=500, seed=int(rng.integers(1 << 30)))[0])
    # under the null the p-values are roughly uniform: most are large, few are tiny
    assert np.median(ps) > 0.2
    assert sum(p < 0.05 for p in ps) <= 4


def test_permutation_pvalue_agrees_with_exact_kendall():
    rng = np.random.default_rng(5)
    x = rng.normal(size=9)
    y = x + 1.5 * rng.normal(size=9)
    exact = ds.kendall(x, y)[1]  # scipy's exact test for small n without ties
    perm_t, _ = ds.permutation_pvalues(x, y, n_permutations=20000, seed=2)
    assert perm_t == pytest.approx(exact, abs=0.02)


def test_permutation_is_seeded_and_mean_test_combines_sets():
    rng = np.random.default_rng(7)
    sets = [(rng.normal(size=8), rng.normal(size=8)) for _ in range(3)]
    assert ds.mean_permutation_pvalues(sets, 300, seed=4) == ds.mean_permutation_pvalues(sets, 300, seed=4)
    good = [(np.arange(8.0), np.arange(8.0) + rng.normal(scale=0.1, size=8)) for _ in range(3)]
    s = ds.correlate_sets(good, n_permutations=500, seed=0, alpha=0.05)
    assert s["n_sets"] == 3 and s["p_method"].startswith("permutation")
    assert s["p_tau"] < 0.01 and s["significant"]


def test_not_significant_is_marked_approximately_zero():
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=6), rng.normal(size=6)
    s = ds.correlate_sets([(x, y)], n_permutations=200, seed=0, alpha=1e-6)
    assert not s["significant_tau"] and math.isfinite(s["tau"])  # the value is kept
    assert ds.mark(s["tau"], s["significant_tau"]) == "≈ 0"
    assert ds.mark(0.71234, True) == "0.7123"
    assert ds.mark(float("nan"), True) == "n/a"


# -- low-rank approximation, probes, ranks ------------------------------------------------


def test_low_rank_approximation_has_the_requested_rank():
    rng = np.random.default_rng(0)
    act = torch.from_numpy(rng.normal(size=(30, 12, 3, 3))).float() + 2.0
    for r in (1, 5, 11):
        proj = fit_low_rank(act, r)
        out = proj(act)
        assert out.shape == act.shape
        rows = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
        s = torch.linalg.svdvals(rows - rows.mean(0))
        assert int((s > 1e-4 * s[0]).sum()) == r
    full = fit_low_rank(act, 12)
    assert torch.allclose(full(act), act, atol=1e-4)
    tokens = torch.from_numpy(rng.normal(size=(10, 5, 8))).float()
    assert torch.allclose(fit_low_rank(tokens, 8)(tokens), tokens, atol=1e-4)


def test_rank_lists():
    assert default_ranks(512) == [512, 448, 384, 320, 256, 192, 128, 64, 32, 16, 8, 4, 2, 1]  # 14 ranks, as the paper's blocks 7-8
    assert len(default_ranks(256)) == 13  # the paper's count for blocks 5 and 6
    paper = [512, 448, 384, 320, 256, 192, 128, 64, 32, 16, 8, 4, 2, 1]
    assert layer_ranks(512, paper, "to_layer") == paper
    assert layer_ranks(256, paper, "to_layer") == [256, 224, 192, 160, 128, 96, 64, 32, 16, 8, 4, 2, 1]
    assert layer_ranks(256, paper, "absolute") == [256, 192, 128, 64, 32, 16, 8, 4, 2, 1]
    assert default_ranks(10) == [10, 5, 2, 1]


def test_probe_on_separable_features_is_accurate():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    y = torch.randint(0, 4, (600,), generator=g)
    x = centres[y] + 0.3 * torch.randn(600, 16, generator=g)
    acc_full, acc_rank1 = probe_accuracies(
        x[:400], y[:400], x[400:], y[400:], [None, fit_low_rank(x[:400], 1)], ProbeParams(epochs=10, lr=1e-2), 4, seed=0
    )
    assert acc_full > 0.95
    assert acc_rank1 < acc_full  # one direction cannot separate four classes as well
    # batched probes are the same as probes trained alone
    (alone,) = probe_accuracies(x[:400], y[:400], x[400:], y[400:], [None], ProbeParams(epochs=10, lr=1e-2), 4, seed=0)
    assert alone == acc_full


def test_probes_of_different_widths_trained_together_equal_probes_trained_alone():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (300,), generator=g)
    wide = torch.randn(3, 12, generator=g)[y] + torch.randn(300, 12, generator=g)
    narrow = torch.randn(3, 5, generator=g)[y] + 2 * torch.randn(300, 5, generator=g)
    params = ProbeParams(epochs=3, lr=1e-2, batch_size=32)
    groups = [ProbeGroup(wide[:200], wide[200:], [None], [7]), ProbeGroup(narrow[:200], narrow[200:], [None], [8])]
    together = train_probes(groups, y[:200], y[200:], params, 3, order_seed=0)
    alone = [train_probes([grp], y[:200], y[200:], params, 3, order_seed=0)[0] for grp in groups]
    assert together == alone
    assert together[0][0] != together[1][0]


def test_written_out_adam_matches_torch():
    from stitchbench_plugins.evaluations.ding.probe_training import _Adam

    torch.manual_seed(0)
    w = torch.randn(5, 3, requires_grad=True)
    w2 = w.detach().clone().requires_grad_(True)
    ours = _Adam([w], weight_decay=0.01)
    ours.lr = 0.01
    ref = torch.optim.Adam([w2], lr=0.01, weight_decay=0.01)
    for _ in range(20):
        x = torch.randn(4, 5)
        for p, opt in ((w, ours), (w2, ref)):
            p.grad = None
            ((x @ p) ** 2).sum().backward()
            opt.step()
    assert torch.allclose(w, w2, atol=1e-5)
    assert not torch.allclose(w, torch.zeros_like(w))


def test_pooled_probe_input():
    conv = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert torch.equal(pooled(conv), conv.mean(dim=(2, 3)))
    tokens = torch.randn(2, 5, 4)
    assert torch.equal(pooled(tokens), tokens[:, 0])


# -- PWCCA with rank-deficient input ------------------------------------------------------


def pwcca_ding(a, b) -> float:
    """The pwcca plugin under Ding et al.'s convention (what the sensitivity test uses)."""
    return type(stitchbench.get_plugin("pwcca"))(convention="ding").compute(a, b)


def test_pwcca_ding_equals_the_plugin_on_full_rank_input():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(200, 6))
    b = a @ rng.normal(size=(6, 8)) + rng.normal(size=(200, 8))
    plugin = stitchbench.get_plugin("pwcca")
    assert pwcca_ding(a, b) == pytest.approx(plugin.compute(a, b), abs=1e-10)


def test_pwcca_ding_counts_unmatched_directions_of_a_low_rank_input():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 8)) * np.linspace(3, 0.5, 8)
    x = x - x.mean(0)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    d = [pwcca_ding(x, (u[:, :r] * s[:r]) @ vt[:r]) for r in (8, 6, 4, 2, 1)]
    assert d[0] == pytest.approx(0.0, abs=1e-10)
    assert all(b > a for a, b in itertools.pairwise(d))  # lower rank, larger distance
    assert d[-1] < 1
    with pytest.raises(ValueError):  # the plugin refuses rank-deficient input
        stitchbench.get_plugin("pwcca").compute(x, (u[:, :2] * s[:2]) @ vt[:2])


# -- parameters of the paper presets ------------------------------------------------------


@pytest.mark.parametrize("preset", [p for p in __import__("stitchbench.run.config", fromlist=["x"]).preset_names()
                                    if p.startswith("paper-ding")])
def test_paper_presets_params_validate(preset):
    from stitchbench.run.config import preset_data

    params = preset_data(preset)["evaluations"]["params"]
    sens = DingSensitivity.Params.model_validate(params["ding_sensitivity"])
    spec = DingSpecificity.Params.model_validate(params["ding_specificity"])
    assert sens.probe.epochs == 10 and sens.probe.lr_drop_epoch == 5 and sens.ranks[-1] == 1
    assert spec.probe.lr == pytest.approx(1e-3)
    with pytest.raises(ValidationError):
        DingSensitivity.Params.model_validate({"probe": {"epoch": 3}})


def test_requires_pulls_in_the_measures():
    assert set(DingSensitivity.requires) == {"dm", "lcka", "pwcca", "opd", "dm_struct"}
    assert DingSpecificity.requires == DingSensitivity.requires


# -- end to end --------------------------------------------------------------------------


def test_tiny_run_end_to_end(trained_workspace, rerun_workspace, cli_here):
    """The shared tiny run (tests/conftest.py) ran both tests; its rerun reused every probe."""
    ws, first = trained_workspace.path, trained_workspace.result
    assert "sensitivity test (Table 2)" in first.stdout and "specificity test (Table 3)" in first.stdout
    rep = cli_here("report", "latest", "--json", cwd=ws)
    assert rep.returncode == 0, rep.stderr[-2000:]
    report = json.loads(rep.stdout)
    client = client_of(ws)
    parent = client.get_run(report["run_id"])
    for test in ("sensitivity", "specificity"):
        section = report["ding"][test]
        for m in MEASURES:
            for stat in ("tau", "rho"):
                v = section[m][stat]
                assert v is None or isinstance(v, float)
                assert f"ding.{test}.{m}.{stat}" in parent.data.metrics
            assert {"p_tau", "p_rho", "significant"} <= set(section[m])
    assert set(report["ding"]["sensitivity"]["lcka"]["per_layer"]) == {"layer4.0", "layer4.1"}
    exp = client.get_experiment_by_name("tiny")
    (evaluation,) = client.search_runs([exp.experiment_id], "tags.`stitchbench.plugin` = 'ding_sensitivity' and "
                                       "tags.`stitchbench.kind` = 'evaluation'")
    assert evaluation.data.metrics["probes"] == 12 and evaluation.data.metrics["probes_reused_from_store"] == 0
    arts = {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    assert {"ding_sensitivity.json", "probes.json", "ding_sensitivity_scatter.png", "report.json"} <= arts
    table = json.loads(_artifact(client, evaluation.info.run_id, "ding_sensitivity.json"))
    assert [[r["rank"] for r in s["representations"]] for s in table["sets"]] == [[None, 16, 8]] * 4
    # the probes are jobs of their own, one per (network, layer), nested in the evaluation's run
    jobs = client.search_runs([exp.experiment_id], "tags.`stitchbench.kind` = 'ding_probes'")
    sens = [j for j in jobs if j.data.tags["stitchbench.plugin"] == "ding_sensitivity"]
    assert len(sens) == 4 and all(j.data.tags["mlflow.parentRunId"] == evaluation.info.run_id for j in sens)
    stored = json.loads(_artifact(client, sens[0].info.run_id, "probes.json"))
    assert sorted(stored["probes"]) == ["16", "8", "full"]

    # the identical rerun found every probe by key
    client = client_of(rerun_workspace.path)
    exp = client.get_experiment_by_name("tiny")
    evals = client.search_runs([exp.experiment_id], "tags.`stitchbench.plugin` = 'ding_sensitivity' and "
                               "tags.`stitchbench.kind` = 'evaluation'", order_by=["attributes.start_time DESC"])
    assert len(evals) == 2
    newest = evals[0].data.metrics
    assert newest["probes"] == 12 and newest["probes_reused_from_store"] == 12
    assert len(client.search_runs([exp.experiment_id], "tags.`stitchbench.kind` = 'ding_probes'")) == len(jobs)
    rerun = json.loads(cli_here("report", "latest", "--json", cwd=rerun_workspace.path).stdout)
    assert rerun["ding"] == report["ding"]


def _artifact(client, run_id, path):
    return open(client.download_artifacts(run_id, path)).read()


def test_a_probes_seed_follows_the_networks_name_not_the_code_identity_in_its_key():
    """A probe's seed (its key) must not change when only the identity of the plugins' code
    in the network's job key does (an edit, an editable install against a release); the job
    key, which decides reuse across runs, must."""
    from stitchbench_plugins.evaluations.ding.probes import probe_job_key, probe_key
    from stitchbench_plugins.evaluations.ding.representations import Rep

    from stitchbench.testing import fake_context

    ctx = fake_context()
    net = next(iter(ctx.networks))
    params = ProbeParams()
    rep = Rep(net, "b1", rank=2)
    ctx.network_keys = {net: "key-with-code-src:aaaa"}
    seed_a, job_a = probe_key(ctx, rep, params), probe_job_key(ctx, net, "b1", [2], params, "code")
    ctx.network_keys = {net: "key-with-code-src:bbbb"}
    assert probe_key(ctx, rep, params) == seed_a
    assert probe_job_key(ctx, net, "b1", [2], params, "code") != job_a


def test_pooled_sensitivity_sets_are_dings_one_set_per_layer_with_the_best_full_rank_reference():
    """Hand-checked small case: 2 networks, 2 layers, ranks [4, 2, 1] (to_layer scaling):
    one set per layer of the 2 x 3 approximations, and the reference the better network at
    full rank even when an approximation of the other scores higher."""
    from stitchbench_plugins.evaluations.ding.framework import reference_index

    from stitchbench.testing import fake_context

    ctx = fake_context()
    plugin = DingSensitivity()
    params = DingSensitivity.Params(layers=["b1", "b2"], ranks=[4, 2, 1], sets="pooled")
    sets = plugin.build_sets(ctx, params)
    nets = list(ctx.networks)
    assert [s.name for s in sets] == ["all/b1", "all/b2"]
    for s, layer in zip(sets, ["b1", "b2"]):
        # 8 channels: ranks 8, 4, 2 (the largest listed rank stands for full rank)
        assert [(r.network, r.layer, r.rank) for r in s.reps] == [
            (n, layer, r) for n in nets for r in (None, 4, 2)]
        assert s.reference_among == [0, 3]
    # F: network 1's rank-4 approximation scores best overall, network 1 is best at full rank
    f = [0.50, 0.55, 0.40, 0.60, 0.70, 0.45]
    assert reference_index(f, sets[0].reference_among) == 3
    assert reference_index(f) == 4  # without the rule: an approximation would be the reference
    per_network = plugin.build_sets(ctx, params.model_copy(update={"sets": "per_network"}))
    assert [s.name for s in per_network] == [f"{n}/{layer}" for n in nets for layer in ("b1", "b2")]
    assert all(s.reference_among is None for s in per_network)


def test_pooled_sensitivity_runs_end_to_end_on_a_fake_run():
    from stitchbench.testing import check_plugin

    params = DingSensitivity.Params(layers=["b1", "b2"], ranks=[4, 2, 1], sets="pooled", n_permutations=20,
                                    probe={"epochs": 1})
    assert "run" in check_plugin(DingSensitivity(), params)
