"""The energy_ood evaluation: energy and metrics conventions, detectors that separate, reuse
of registered detectors by key, and stitched activations that really go through T."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from stitchbench_plugins.evaluations.energy_ood import training
from stitchbench_plugins.evaluations.energy_ood.analysis import high_accuracy_metrics
from stitchbench_plugins.evaluations.energy_ood.detectors import build_detector
from stitchbench_plugins.evaluations.energy_ood.metrics import (
    HIGH_ACCURACY_KEYS,
    detector_energies,
    energy,
    high_accuracy_stats,
    ood_scores,
)
from stitchbench_plugins.evaluations.energy_ood.params import EnergyOODParams
from stitchbench_plugins.evaluations.energy_ood.report import format_high_accuracy
from stitchbench_plugins.evaluations.energy_ood.training import (
    DisjointSubsets,
    LayerBatches,
    energy_margin_loss,
    finetune,
    finetune_optimizer,
    finetune_settings,
    pretrain,
)

from stitchbench.execution.executors import LocalExecutor

from .conftest import OOD_PARAMS, client_of

# Under pytest-xdist the modules that read the shared run's rerun go to one process: it is made once.
pytestmark = pytest.mark.xdist_group("rerun")

# -- energy and metrics -------------------------------------------------------------------------


def test_energy_is_negative_logsumexp_and_shifts_with_the_logits():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 10)) * 3
    e = energy(z)
    assert np.allclose(e, -logsumexp(z, axis=1))
    assert np.allclose(energy(z + 4.0), e - 4.0)  # adding c to every logit shifts E by -c
    assert np.all(e <= -z.max(axis=1) + 1e-12)  # lse >= max, so E <= -max(logit) at T = 1
    assert np.allclose(energy(z, temperature=2.0), -2.0 * logsumexp(z / 2.0, axis=1))
    t = energy(torch.tensor(z))  # the torch path (used in training) agrees and keeps gradients
    assert isinstance(t, torch.Tensor) and np.allclose(t.numpy(), e)
    with pytest.raises(ValueError):
        energy(z, temperature=0.0)


def test_metrics_equal_scikit_learn_with_id_as_positive_class():
    rng = np.random.default_rng(1)
    e_id, e_ood = rng.normal(-3.0, 1.0, 400), rng.normal(-1.5, 1.2, 300)
    s = ood_scores(e_id, e_ood)
    labels = np.r_[np.ones(400), np.zeros(300)]
    scores = -np.r_[e_id, e_ood]
    assert s.auroc == pytest.approx(roc_auc_score(labels, scores))
    assert s.aupr == pytest.approx(average_precision_score(labels, scores))
    fpr, tpr, _ = roc_curve(labels, scores)
    assert s.fpr95 == pytest.approx(fpr[tpr >= 0.95].min())
    assert 0.75 < s.auroc < 0.95  # lower ID energies: AUROC above 0.5


def test_auroc_orientation():
    rng = np.random.default_rng(2)
    e = rng.normal(size=500)
    assert ood_scores(e, e.copy()).auroc == pytest.approx(0.5)  # identical sets
    assert ood_scores(rng.normal(size=2000), rng.normal(size=2000)).auroc == pytest.approx(0.5, abs=0.04)
    sep = ood_scores(e - 100.0, e)  # ID energies all lower: fully separable
    assert sep.auroc == 1.0 and sep.aupr == 1.0 and sep.fpr95 == 0.0
    assert ood_scores(e + 100.0, e).auroc == 0.0  # the other way round
    with pytest.raises(ValueError):
        ood_scores(np.r_[e, np.nan], e)


def test_energy_margin_loss():
    low = torch.full((4, 3), 20.0)  # energy about -21.1
    high = torch.zeros(4, 3)  # energy -log 3
    assert energy_margin_loss(low, high, m_in=-20.0, m_out=-5.0).item() == 0.0  # both inside their margins
    wrong = energy_margin_loss(high, low, m_in=-20.0, m_out=-5.0).item()
    e_hi, e_lo = -np.log(3), -(20 + np.log(3))
    assert wrong == pytest.approx((e_hi + 20.0) ** 2 + (-5.0 - e_lo) ** 2, rel=1e-5)


# -- the conditional high-accuracy statistic (paper Section 4) ----------------------------------------

# Two 3x3 stitching matrices of one matcher and scope: relative accuracy and AUROC. The
# diagonals (99 / 0.1) must be ignored; their off-diagonal cells, row by row:
#   acc   0.95 0.50 | 0.90 0.30 | 1.10 0.70      and   0.20 0.92 | 0.89 0.99 | 0.60 0.40
#   auroc 0.80 0.95 | 0.91 0.99 | 0.60 0.97            0.98 0.70 | 0.93 0.85 | 0.99 0.96
ACC = [np.array([[99.0, 0.95, 0.50], [0.90, 99.0, 0.30], [1.10, 0.70, 99.0]]),
       np.array([[99.0, 0.20, 0.92], [0.89, 99.0, 0.99], [0.60, 0.40, 99.0]])]
AUROC = [np.array([[0.1, 0.80, 0.95], [0.91, 0.1, 0.99], [0.60, 0.97, 0.1]]),
         np.array([[0.1, 0.98, 0.70], [0.93, 0.1, 0.85], [0.99, 0.96, 0.1]])]


def test_high_accuracy_statistic_on_a_hand_made_case():
    from scipy.stats import pearsonr

    st = high_accuracy_stats(ACC, AUROC, threshold=0.9, ood_auroc=0.9)
    assert tuple(st) == HIGH_ACCURACY_KEYS and st["threshold"] == 0.9
    # acc >= 0.9 (0.90 counts, 0.89 does not): 0.95, 0.90, 1.10 | 0.92, 0.99 -> AUROC 0.80, 0.91, 0.60, 0.70, 0.85
    assert st["cells"] == 5
    assert st["mean_auroc"] == pytest.approx((0.80 + 0.91 + 0.60 + 0.70 + 0.85) / 5)
    assert st["fraction_ood"] == pytest.approx(1 / 5)  # only 0.91 is > 0.9
    # Pearson's r over all 12 off-diagonal cells, not only the high-accuracy ones
    acc = [0.95, 0.50, 0.90, 0.30, 1.10, 0.70, 0.20, 0.92, 0.89, 0.99, 0.60, 0.40]
    auroc = [0.80, 0.95, 0.91, 0.99, 0.60, 0.97, 0.98, 0.70, 0.93, 0.85, 0.99, 0.96]
    assert st["correlation"] == pytest.approx(pearsonr(acc, auroc)[0], abs=1e-12)
    assert st["correlation"] == pytest.approx(np.corrcoef(acc, auroc)[0, 1], abs=1e-12)
    assert st["correlation"] < -0.5  # here the most accurate stitches are the least OOD
    # the AUROC cut is strict and a parameter; the threshold too
    assert high_accuracy_stats(ACC, AUROC, 0.9, ood_auroc=0.85)["fraction_ood"] == pytest.approx(1 / 5)
    assert high_accuracy_stats(ACC, AUROC, 0.9, ood_auroc=0.84)["fraction_ood"] == pytest.approx(2 / 5)
    lower = high_accuracy_stats(ACC, AUROC, threshold=0.6, ood_auroc=0.9)
    assert lower["cells"] == 8 and lower["threshold"] == 0.6
    assert lower["correlation"] == st["correlation"]  # the correlation does not depend on the threshold
    # one matrix alone: its own cells
    one = high_accuracy_stats(ACC[:1], AUROC[:1], 0.9, 0.9)
    assert one["cells"] == 3 and one["mean_auroc"] == pytest.approx((0.80 + 0.91 + 0.60) / 3)


def test_high_accuracy_statistic_undefined_cases():
    # no cell reaches the threshold: no mean, no fraction; the correlation is still defined
    none = high_accuracy_stats(ACC, AUROC, threshold=1.5)
    assert none["cells"] == 0 and none["mean_auroc"] is None and none["fraction_ood"] is None
    assert none["correlation"] is not None
    # constant relative accuracy (or AUROC): no correlation
    flat = high_accuracy_stats([np.full((3, 3), 0.95)], AUROC[:1])
    assert flat["cells"] == 6 and flat["correlation"] is None
    assert high_accuracy_stats(ACC[:1], [np.full((3, 3), 0.7)])["correlation"] is None
    # a 1x1 matrix has no off-diagonal cell at all
    empty = high_accuracy_stats([np.array([[1.0]])], [np.array([[0.9]])])
    assert empty == {"threshold": 0.9, "cells": 0, "mean_auroc": None, "fraction_ood": None, "correlation": None}
    # cells with a non-finite relative accuracy are left out
    acc = ACC[0].copy()
    acc[0, 1] = np.nan
    st = high_accuracy_stats([acc], AUROC[:1])
    assert st["cells"] == 2 and st["mean_auroc"] == pytest.approx((0.91 + 0.60) / 2)
    # undefined values become NaN metrics (the core leaves them out), JSON null in the report
    low = high_accuracy_stats([0.5 * a for a in ACC], AUROC)  # every off-diagonal cell below 0.9
    assert low["cells"] == 0 and low["mean_auroc"] is None
    high = {"dm": {"all": low}, "tlm": {"all": high_accuracy_stats(ACC, AUROC)}}
    m = high_accuracy_metrics(high)
    assert m["ood.high_accuracy.dm.all.cells"] == 0.0 and np.isnan(m["ood.high_accuracy.dm.all.mean_auroc"])
    assert m["ood.high_accuracy.tlm.all.fraction_ood"] == pytest.approx(0.2)
    assert set(m) == {f"ood.high_accuracy.{k}.all.{x}" for k in ("dm", "tlm")
                      for x in ("cells", "mean_auroc", "fraction_ood", "correlation")}
    assert json.loads(json.dumps(none))["mean_auroc"] is None
    text = "\n".join(format_high_accuracy({"matchers": ["tlm", "dm"], "high_accuracy": high,
                                           "high_accuracy_ood_auroc": 0.9}))
    assert "relative accuracy >= 0.9" in text and "no off-diagonal DM cell reaches the threshold" in text


def test_high_accuracy_reading_of_the_papers_claim():
    in_dist = {"threshold": 0.9, "cells": 4, "mean_auroc": 0.6, "fraction_ood": 0.25, "correlation": -0.6}
    ood = {"threshold": 0.9, "cells": 5, "mean_auroc": 0.85, "fraction_ood": 0.6, "correlation": -0.3}

    def text(dm, tlm):
        return "\n".join(format_high_accuracy({"matchers": ["tlm", "dm"], "high_accuracy_ood_auroc": 0.9,
                                               "high_accuracy": {"dm": {"all": dm}, "tlm": {"all": tlm}}}))

    agrees = text(in_dist, ood)
    assert "TLM's mean AUROC 0.850 (60.0% > 0.9) vs DM's 0.600 (25.0%): consistent with the claim" in agrees
    assert "dm         all         4       0.600      25.0%          -0.60" in agrees
    assert "contrary to the claim" in text(ood, in_dist)


# -- detectors -------------------------------------------------------------------------------------


def _toy(shape, n, seed, shift=0.0, classes=3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, *shape, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + 0.5 * torch.randn(n, *shape, generator=g) + shift
    return x, y


@pytest.mark.parametrize(
    "shape,settings",
    [((4, 4, 4), {"resnet": {"width": 8, "stages": 1, "blocks": 1, "upsample_to": None}}),
     ((5, 8), {"vit": {"width": 12, "depth": 1, "num_heads": 2}})],
)
def test_finetuned_detector_separates_id_from_auxiliary_data(shape, settings):
    torch.manual_seed(0)
    x, y = _toy(shape, 600, 0)
    xo, _ = _toy(shape, 600, 1, shift=2.0)  # the auxiliary OOD set: shifted activations
    xt, yt = _toy(shape, 300, 2)
    xot, _ = _toy(shape, 300, 3, shift=2.0)
    det = build_detector(shape, 3, settings.get("resnet", {}), settings.get("vit", {}))
    cpu = torch.device("cpu")
    train = LayerBatches("l", y, cpu, acts=x)
    aux = LayerBatches("l", torch.zeros(600, dtype=torch.long), cpu, acts=xo)
    test, test_ood = LayerBatches("l", yt, cpu, acts=xt), LayerBatches("l", yt, cpu, acts=xot)
    g = torch.Generator().manual_seed(0)
    pretrain(det, train, epochs=3, batch_size=64, lr=3e-3, weight_decay=0.0, generator=g)
    _, pred = detector_energies(det, test.batches(128))
    assert (pred == yt.numpy()).mean() > 0.8  # pre-training makes a classifier of the ID activations
    hist = finetune(det, train, aux, epochs=3, batch_size=64, lr=1e-3, weight_decay=0.0, m_in=-25.0, m_out=-7.0,
                    weight=0.1, generator=g, optimizer="sgd")
    assert hist[-1]["finetune_energy_in"] < hist[-1]["finetune_energy_out"]
    e_id, _ = detector_energies(det, test.batches(128))
    e_ood, _ = detector_energies(det, test_ood.batches(128))
    assert ood_scores(e_id, e_ood).auroc > 0.95


# -- fine-tuning recipes: Liu et al.'s and the authors' -----------------------------------------


def test_authors_recipe_optimizer_and_schedule():
    # exec_train_representation_classifier.py: Adam(lr, weight_decay), MultiStepLR([epochs // 2], 0.1)
    det = torch.nn.Linear(4, 3)
    opt, sched = finetune_optimizer(det.parameters(), recipe="authors", epochs=20, steps_per_epoch=9375,
                                    lr=1e-3, weight_decay=1e-5, optimizer="sgd", momentum=0.9)
    assert type(opt) is torch.optim.Adam
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["weight_decay"] == 1e-5
    assert isinstance(sched, torch.optim.lr_scheduler.MultiStepLR)
    assert dict(sched.milestones) == {10: 1} and sched.gamma == 0.1  # iteration 10, not epoch 10
    # the recipe's settings: Adam with pre-training's lr and weight decay, the batch halved
    p = EnergyOODParams.model_validate({"pretrain": {"batch_size": 64, "lr": 2e-3, "weight_decay": 3e-5},
                                        "finetune": {"recipe": "authors", "lr": 0.5, "weight_decay": 0.1}})
    ft = finetune_settings(p)
    assert (ft["optimizer"], ft["lr"], ft["weight_decay"]) == ("adam", 2e-3, 3e-5)
    assert (ft["batch_size"], ft["aux_batch_size"], ft["recipe"]) == (32, 32, "authors")
    assert (ft["id_augment"], ft["aux_augment"]) == (False, True)
    p = EnergyOODParams.model_validate({"finetune": {"recipe": "authors", "batch_size": 512}})
    assert finetune_settings(p)["batch_size"] == finetune_settings(p)["aux_batch_size"] == 256


def test_liu_recipe_is_the_default_and_unchanged():
    p = EnergyOODParams()
    assert p.finetune.recipe == "liu"
    ft = finetune_settings(p)
    assert ft == {"epochs": 20, "m_in": -25.0, "m_out": -7.0, "weight": 0.1, "freeze_batchnorm": False,
                  "recipe": "liu", "batch_size": 64, "aux_batch_size": None, "optimizer": "sgd", "lr": 1e-3,
                  "weight_decay": 5e-4, "momentum": 0.9, "id_augment": True, "aux_augment": False}
    det = torch.nn.Linear(4, 3)
    opt, sched = finetune_optimizer(det.parameters(), recipe="liu", epochs=2, steps_per_epoch=5,
                                    lr=1e-3, weight_decay=5e-4, optimizer="sgd", momentum=0.9)
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["nesterov"]
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 5e-4
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)


def _record_lrs(monkeypatch):
    """The learning rate of every optimizer step `finetune` takes."""
    lrs = []

    def recording(*args, **kwargs):
        opt, sched = finetune_optimizer(*args, **kwargs)
        step = sched.step

        def logged_step(*a, **k):  # right after an optimizer step: the lr it used
            lrs.append(opt.param_groups[0]["lr"])
            return step(*a, **k)

        sched.step = logged_step
        return opt, sched

    monkeypatch.setattr(training, "finetune_optimizer", recording)
    return lrs


def _tiny_sets(n_id, n_aux):
    x, y = _toy((4,), n_id, 0)
    xo, _ = _toy((4,), n_aux, 1, shift=2.0)
    cpu = torch.device("cpu")
    return LayerBatches("l", y, cpu, acts=x), LayerBatches("l", torch.zeros(n_aux, dtype=torch.long), cpu, acts=xo)


def test_authors_recipe_steps_the_schedule_per_iteration(monkeypatch):
    lrs = _record_lrs(monkeypatch)
    train, aux = _tiny_sets(10, 20)
    # an epoch: min(10, 20) = 10 examples of each, batches of 2 + 2: 5 iterations; 4 epochs: milestone 2
    finetune(torch.nn.Linear(4, 3), train, aux, epochs=4, batch_size=2, aux_batch_size=2, lr=1e-3,
             weight_decay=1e-5, m_in=-25.0, m_out=-7.0, weight=0.1, generator=torch.Generator().manual_seed(0),
             optimizer="adam", recipe="authors")
    assert len(lrs) == 20
    assert lrs[:2] == [1e-3, 1e-3]
    assert np.allclose(lrs[2:], 1e-4)


def test_liu_recipe_keeps_its_cosine_schedule(monkeypatch):
    lrs = _record_lrs(monkeypatch)
    train, aux = _tiny_sets(10, 6)
    finetune(torch.nn.Linear(4, 3), train, aux, epochs=2, batch_size=4, lr=1e-3, weight_decay=5e-4,
             m_in=-25.0, m_out=-7.0, weight=0.1, generator=torch.Generator().manual_seed(0))
    steps = 2 * 3  # an epoch is a pass over the 10 ID examples, the auxiliary set cycled
    assert np.allclose(lrs, [1e-3 * 0.5 * (1 + np.cos(np.pi * s / steps)) for s in range(steps)])


def test_disjoint_subsets_as_the_authors_sampler():
    subsets = DisjointSubsets(10, 4, torch.Generator().manual_seed(0))
    first = [subsets.next() for _ in range(3)]
    assert [len(s) for s in first] == [4, 4, 2]  # the permutation is used up, its last subset short
    assert sorted(torch.cat(first).tolist()) == list(range(10))
    assert len(subsets.next()) == 4  # a new permutation
    exact = DisjointSubsets(6, 3, torch.Generator().manual_seed(0))
    assert sorted(torch.cat([exact.next(), exact.next()]).tolist()) == list(range(6))


def test_authors_recipe_takes_disjoint_subsets_of_both_sets():
    train, aux = _tiny_sets(6, 12)
    seen = {"id": [], "aux": []}

    class Spy(LayerBatches):
        def batches(self, batch_size, *, order=None, **kwargs):
            seen[self.layer].append(order.tolist())
            return super().batches(batch_size, order=order, **kwargs)

    train = Spy("id", train.labels, train.device, acts=train.acts)
    aux = Spy("aux", aux.labels, aux.device, acts=aux.acts)
    finetune(torch.nn.Linear(4, 3), train, aux, epochs=2, batch_size=3, aux_batch_size=3, lr=1e-3,
             weight_decay=1e-5, m_in=-25.0, m_out=-7.0, weight=0.1, generator=torch.Generator().manual_seed(0),
             optimizer="adam", recipe="authors")
    assert [sorted(o) for o in seen["id"]] == [list(range(6))] * 2  # every epoch the whole (smaller) ID set
    assert sorted(seen["aux"][0] + seen["aux"][1]) == list(range(12))  # 6 of 12 per epoch, disjoint


def test_conv_detector_upsamples_when_asked():
    det = build_detector((6, 2, 2), 4, {"width": 4, "stages": 2, "blocks": 1, "upsample_to": 8}, {})
    seen = []
    det.stem.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    assert det(torch.randn(3, 6, 2, 2)).shape == (3, 4)
    assert seen == [(3, 4, 8, 8)]


# -- in a run -------------------------------------------------------------------------------------

def _ood_runs(client):
    """The experiment, its parent runs (oldest first) and their energy_ood evaluation runs."""
    exp = client.get_experiment_by_name("tiny")
    parents = sorted(client.search_runs([exp.experiment_id], "tags.`stitchbench.kind` = 'parent'"),
                     key=lambda r: r.info.start_time)
    evals = []
    for p in parents:
        evals += client.search_runs(
            [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{p.info.run_id}' and "
            "tags.`stitchbench.plugin` = 'energy_ood' and tags.`stitchbench.kind` = 'evaluation'")
    return exp, parents, evals


def test_detectors_are_registered_once_and_reused_by_key(rerun_workspace):
    """The shared tiny run trained a detector per target layer; its identical rerun reused
    every one by key."""
    client = client_of(rerun_workspace.path)
    exp, parents, evals = _ood_runs(client)
    assert len(parents) == 2 and len(evals) == 2
    names = sorted(m.name for m in client.search_registered_models() if m.name.endswith("-energy-detector"))
    assert names == sorted(f"digits-resnet18-w4-seed{s}-{layer}-energy-detector"
                           for s in (0, 1) for layer in ("layer1.0", "layer2.1", "layer4.1"))
    for name in names:
        versions = client.search_model_versions(f"name = '{name}'")
        assert len(versions) == 1  # the second run trained nothing
        assert versions[0].tags.get("stitchbench.job_key")
    first, second = evals
    assert first.data.metrics["detectors.trained"] == 6 and first.data.metrics["detectors.reused"] == 0
    assert second.data.metrics["detectors.trained"] == 0 and second.data.metrics["detectors.reused"] == 6
    detector_runs = client.search_runs([exp.experiment_id], "tags.`stitchbench.kind` = 'ood_detector'")
    assert len(detector_runs) == 6
    assert all(r.data.tags["mlflow.parentRunId"] == first.info.run_id for r in detector_runs)
    sanity = {r.info.run_name: r.data.metrics["sanity_auroc"] for r in detector_runs}
    # Digits vs noise, through networks of width 4 trained for 2 epochs and detectors of one
    # block: clearly better than chance everywhere (the quick preset's detectors reach > 0.97).
    assert all(v > 0.7 for v in sanity.values()), sanity


def test_auroc_matrices_metrics_figures_and_report(rerun_workspace, cli_here):
    ws = rerun_workspace.path
    client = client_of(ws)
    _, parents, evals = _ood_runs(client)
    metrics = parents[-1].data.metrics
    for part in ("diag", "offdiag"):
        assert 0.0 <= metrics[f"ood.auroc.dm.{part}"] <= 1.0
    rid = evals[-1].info.run_id
    files = {f.path for f in client.list_artifacts(rid)}
    assert {"ood_fig2.png", "ood_energy_dm.png", "ood.json", "report.json"} <= files
    mats = {f.path for f in client.list_artifacts(rid, "matrices")}
    intra = "matrices/auroc_dm_intra_digits-resnet18-w4-seed0.npy"
    assert intra in mats and "matrices/auroc_dm_inter_digits-resnet18-w4-seed0__digits-resnet18-w4-seed1.npy" in mats
    auroc = np.load(mlflow.artifacts.download_artifacts(run_id=rid, artifact_path=intra,
                                                         tracking_uri=client.tracking_uri))
    assert auroc.shape == (3, 3) and np.all((auroc >= 0) & (auroc <= 1))
    # A DM self-stitch of a layer to itself reproduces the layer: not flagged as OOD.
    assert np.all(np.diag(auroc) < 0.6)
    # The same numbers in the report, read back as a user would.
    rep = cli_here("report", "latest", "--json", cwd=ws)
    assert rep.returncode == 0, rep.stderr[-2000:]
    ood = json.loads(rep.stdout)["ood"]
    got = ood["matrices"]["dm"]["intra"][0]
    assert got["source"] == "digits-resnet18-w4-seed0" and np.allclose(got["auroc"], auroc)
    assert ood["summary"]["dm"]["all"]["diag"] == pytest.approx(metrics["ood.auroc.dm.diag"])
    assert len(ood["detectors"]) == 6 and all(d["sanity_auroc"] > 0.7 for d in ood["detectors"])
    logged = {r.info.run_name.removeprefix("ood detector "): r.data.metrics["sanity_auroc"] for r in
              client.search_runs([parents[-1].info.experiment_id], "tags.`stitchbench.kind` = 'ood_detector'")}
    assert {d["model_name"]: d["sanity_auroc"] for d in ood["detectors"]} == pytest.approx(logged)
    text = cli_here("report", "latest", cwd=ws)
    assert text.returncode == 0 and "Energy-based OOD analysis" in text.stdout
    assert "dm" in text.stdout and "6 (0 trained, 6 reused)" in text.stdout


def test_high_accuracy_statistic_in_the_report_metrics_and_figure(rerun_workspace, cli_here):
    """The shared tiny run's report has ``ood.high_accuracy.<matcher>.<scope>`` with the five
    keys for both matchers, equal to the statistic recomputed from the report's own matrices;
    the parent run has the defined ones as metrics; the scatter figure is logged."""
    ws = rerun_workspace.path
    client = client_of(ws)
    _, parents, evals = _ood_runs(client)
    rep = cli_here("report", "latest", "--json", cwd=ws)
    assert rep.returncode == 0, rep.stderr[-2000:]
    ood = json.loads(rep.stdout)["ood"]
    metrics = parents[-1].data.metrics
    for m in ("dm", "tlm"):
        assert set(ood["high_accuracy"][m]) == {"intra", "inter", "all"}
        for scope, st in ood["high_accuracy"][m].items():
            assert set(st) == set(HIGH_ACCURACY_KEYS) and st["threshold"] == 0.9
            mats = [x for s, xs in ood["matrices"][m].items() if scope in ("all", s) for x in xs]
            want = high_accuracy_stats([x["relative_accuracy"] for x in mats], [x["auroc"] for x in mats])
            assert st == pytest.approx(want)
            n = sum(len(x["auroc"]) * (len(x["auroc"]) - 1) for x in mats)  # off-diagonal cells
            assert 0 <= st["cells"] <= n
            assert (st["mean_auroc"] is None) == (st["cells"] == 0)
            for k in ("cells", "mean_auroc", "fraction_ood", "correlation"):
                name = f"ood.high_accuracy.{m}.{scope}.{k}"
                if st[k] is None:
                    assert name not in metrics
                else:
                    assert metrics[name] == pytest.approx(st[k])
    text = cli_here("report", "latest", cwd=ws)
    assert "High-accuracy stitches (Section 4)" in text.stdout and "reading (paper:" in text.stdout
    files = {f.path for f in client.list_artifacts(evals[-1].info.run_id)}
    assert "ood_accuracy_vs_auroc.png" in files


class Recording(LocalExecutor):
    """The local executor, noting the label of every task submitted to it."""

    def __init__(self):
        self.labels = []

    def submit(self, fn, *args, label, resources=None):
        self.labels.append(label)
        return super().submit(fn, *args, label=label, resources=resources)


@pytest.mark.parametrize("recipe", ["liu", "authors"])
def test_stitched_activations_go_through_the_stitching_layer(workspace, recipe):
    """In process: an identity stitcher gives AUROC 0.5 on the diagonal (the detector sees
    exactly the target activations); a stitcher that adds a large offset to every channel
    makes the two sets separable (AUROC far from 0.5, in whichever direction the energies
    move). With either fine-tuning recipe (the authors': augmented auxiliary images,
    streamed through the network)."""
    import stitchbench
    from stitchbench import JobRun, MatrixRecord, RunContext, StitchingLayer
    from stitchbench.nn.activations import ActivationCache
    from stitchbench.plugin.manager import load_plugins
    from stitchbench.run.config import RunConfig
    from stitchbench.store import connection

    connection.connect(workspace)
    data = stitchbench.get_plugin("digits").load({}, None)
    torch.manual_seed(0)
    net = stitchbench.get_plugin("resnet18").build({"width": 4}, 10, (1, 8, 8)).eval()
    layers = ["layer1.0", "layer1.1"]
    shape = net.layer_shapes((1, 8, 8))["layer1.0"]

    def states(weight_scale, bias):
        def get(i, j):
            t = StitchingLayer(shape, shape).set_affine(weight_scale * torch.eye(shape[0]),
                                                        torch.full((shape[0],), bias))
            return t.state_dict()
        return get

    def record(measure, lookup):
        return MatrixRecord(measure=measure, plugin=measure, functional=True, higher_is_more_similar=True,
                            source="n", target="n", scope="intra", layers=layers, values=np.ones((2, 2)),
                            stitcher_state=lookup)

    ctx = RunContext(
        config=RunConfig(dataset={"name": "digits"}, networks={"architecture": {"name": "resnet18"}}),
        data=data, networks={"n": net}, network_accuracy={"n": 0.1}, layers=layers,
        matrices=[record("ident", states(1.0, 0.0)), record("offset", states(1.0, 25.0))],
        device=torch.device("cpu"), workspace=workspace, cache=ActivationCache(), plugins=load_plugins(),
        executor=Recording(),
    )
    params = stitchbench.get_plugin("energy_ood").Params.model_validate(
        {**OOD_PARAMS, "auxiliary": {"name": "noise", "params": {"n_train": 300, "n_test": 100}},
         # what is checked needs no well-trained detector: the identity stitcher gives the
         # detector exactly the target activations, the offset one activations far from them
         "pretrain": {"epochs": 1, "batch_size": 128, "lr": 0.003},
         "finetune": {"epochs": 1, "batch_size": 128, "optimizer": "sgd", "lr": 0.03, "recipe": recipe}})
    exp = connection.experiment_id(mlflow.MlflowClient(), "inproc", workspace)
    with mlflow.start_run(experiment_id=exp) as run:
        ctx = ctx.for_evaluation("energy_ood", JobRun(run.info.run_id, "evaluation energy_ood", None))
        res = stitchbench.get_plugin("energy_ood").run(ctx, params)
    # The detectors were trained as tasks of the run's executor, one per (network, layer).
    assert ctx.executor.labels == [f"OOD detector n-{layer}" for layer in layers]
    mats = {m: res.report["matrices"][m]["intra"][0]["auroc"] for m in ("ident", "offset")}
    assert np.allclose(np.diag(mats["ident"]), 0.5)
    off = np.asarray(mats["offset"])
    assert np.all(np.abs(off - 0.5) > 0.4), off
    assert abs(res.metrics["ood.auroc.offset.offdiag"] - 0.5) > 0.4
