"""Executors: the local one runs tasks lazily in order; the Ray one gives the same results
as the local one on a tiny run (a local 2-CPU Ray cluster, no network)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from stitchbench.cli import main
from stitchbench.errors import ConfigError, JobError, UsageError
from stitchbench.execution import executors
from stitchbench.execution import worker_state as worker
from stitchbench.plugin.manager import load_plugins
from stitchbench.run.config import build_config, validate
from stitchbench.run.matrix_jobs import MatrixTask, compute_stitch_matrix, merge_rows, submit_matrix
from stitchbench.run.network_jobs import TrainedNetwork, build
from stitchbench.run.plan import make_plan

from .conftest import ONE_THREAD, RUN_TINY, cli, client_of, new_tiny_workspace

# -- local executor and config (fast) -----------------------------------------------------


def _record(log: list, name: str, *deps: int) -> int:
    log.append(name)
    return len(log) + sum(deps)


def test_local_executor_runs_each_task_once_when_asked_in_order():
    ex = executors.LocalExecutor()
    calls: list[str] = []
    a = ex.submit(_record, calls, "a", label="a")
    b = ex.submit(_record, calls, "b", a, label="b")  # takes a's result
    assert calls == []  # lazy: nothing ran at submission
    assert [f.label for f in ex.as_completed([a, b])] == ["a", "b"]
    assert b.result() == 2 + 1 and calls == ["a", "b"]  # a ran first, as b's input
    assert a.result() == 1 and b.result() == 3 and calls == ["a", "b"]  # once each
    big = object()
    assert ex.share("key", big) is big


def test_executor_config_validates():
    cfg = build_config("quick")
    assert cfg.executor.name == "local" and cfg.executor.cpus_per_task == 1
    ray = build_config("quick", overrides=["executor=ray"])
    assert ray.executor.name == "ray" and ray.executor.ray_address is None
    cfg = build_config("quick", overrides=["executor.name=ray", "executor.ray_address=auto",
                                           "executor.gpus_per_task=0.25"])
    assert cfg.executor.ray_address == "auto" and cfg.executor.gpus_per_task == 0.25
    for bad, needle in [("executor.name=dask", "executor.name"), ("executor.cpus=2", "executor.cpus: unknown key"),
                        ("executor.cpus_per_task=0", "executor.cpus_per_task")]:
        with pytest.raises(ConfigError, match=needle):
            build_config("quick", overrides=[bad])
    with pytest.raises(ConfigError, match="executor.num_cpus"):
        validate({**build_config("quick").model_dump(), "executor": {"name": "ray", "num_cpus": 0}})


def test_ray_executor_without_ray_is_a_usage_error(workspace, capsys, monkeypatch):
    monkeypatch.setattr(executors, "ray_available", lambda: False)
    assert main(["run", "--dry-run", "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert 'pip install -e ".[ray]"' in err and "Traceback" not in err
    assert main(["run", "--dry-run", "--executor", "local", "--ray-address", "auto"]) == 2
    assert "--ray-address is for --executor ray" in capsys.readouterr().err


def test_dry_run_names_the_executor(workspace, capsys, monkeypatch):
    assert main(["run", "--dry-run", "--set", "executor.cpus_per_task=2"]) == 0
    assert "executor:   local" in capsys.readouterr().out
    monkeypatch.setattr(executors, "ray_available", lambda: True)  # a dry run starts no Ray
    assert main(["run", "--dry-run", "--ray-address", "auto", "--set", "executor.gpus_per_task=0.5"]) == 0
    assert "executor:   ray (cluster at auto; each job 1 CPU, 0.5 GPU)" in capsys.readouterr().out


def test_errors_raised_in_a_worker_come_back_as_themselves():
    pytest.importorskip("ray")

    def failing() -> None:
        raise JobError("lcka [intra] net", "lcka", ValueError("bad layer"))

    with pytest.raises(executors._RemoteError) as info:
        executors._run_task(failing, 1)
    carried = pickle.loads(pickle.dumps(info.value))  # as Ray ships it to the driver
    back = carried.rebuild()
    assert type(back) is JobError and back.exit_code == 1
    assert str(back) == "job lcka [intra] net (plugin lcka) failed: ValueError: bad layer"
    usage = pickle.loads(pickle.dumps(_remote(UsageError("no such layer")))).rebuild()
    assert type(usage) is UsageError and usage.exit_code == 2 and str(usage) == "no such layer"


def _remote(err: Exception) -> executors._RemoteError:
    def raise_it() -> None:
        raise err

    try:
        executors._run_task(raise_it, 1)
    except executors._RemoteError as e:
        return e
    raise AssertionError("no error")


def test_job_keys_do_not_depend_on_the_executor(monkeypatch):
    monkeypatch.setattr(executors, "ray_available", lambda: True)
    plugins = load_plugins()
    small = ["networks.training.epochs=1", "stitching.layers=[0, 7]"]
    local = make_plan(build_config("quick", overrides=small), plugins)
    ray = make_plan(build_config("quick", overrides=[*small, "executor.name=ray", "executor.cpus_per_task=2"]), plugins)
    assert [n.key for n in local.networks] == [n.key for n in ray.networks]
    assert [j.key for j in local.jobs] == [j.key for j in ray.jobs] and local.jobs
    assert "executor:   ray (local cluster; each job 2 CPU, 1 GPU on cuda)" in ray.describe()


def test_a_network_travels_as_its_state_dict():
    """What a Ray worker gets of a reused network (its weights) rebuilds the same network."""
    plugins = load_plugins()
    plan = make_plan(build_config("quick", overrides=["networks.architecture.params.width=4"]), plugins)
    spec = plan.networks[1]
    net = build(plan, spec, torch.device("cpu"))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5)  # not the seeded initialisation any more
    net.eval()
    trained = TrainedNetwork(spec, net, 0.75, "run", reused=True)
    assert trained.as_input(with_weights=False).state_dict is None
    shipped = pickle.loads(pickle.dumps(trained.as_input(with_weights=True)))
    rebuilt = worker.WorkerState().network(plan.architecture, shipped, plan.data, torch.device("cpu"))
    assert rebuilt is not net and not rebuilt.training and shipped.test_accuracy == 0.75
    x = plan.data.test.images[:16]
    assert torch.equal(rebuilt(x), net(x))


def test_a_stitching_matrix_in_parts_is_the_matrix_in_one_task(tmp_path):
    """Ray splits a stitching matrix by source layer when it has more slots than jobs; the
    parts merged are the matrix filled by one task, stitchers in the same order."""
    plugins = load_plugins()
    cfg = build_config("quick", overrides=["networks.architecture.params.width=4", "stitching.layers=[0, 3, 7]",
                                           "stitching.params.dm.k=40", "stitching.matchers=[dm]"])
    plan = make_plan(cfg, plugins)
    job = next(j for j in plan.jobs if j.scope == "inter")
    nets = [TrainedNetwork(s, build(plan, s, torch.device("cpu")).eval(), 0.5, "run", reused=True).as_input(True)
            for s in (job.source, job.target)]
    task = MatrixTask(job, plan.architecture, plan.layers, cfg.seed, "cpu", 256, 120)
    worker.reset()
    whole = compute_stitch_matrix(task, plan.data, *nets)
    assert whole.rows == [0, 1, 2] and whole.values.shape == (3, 3)
    ex = executors.LocalExecutor()
    futures = submit_matrix(job, plan, ex, plan.data, *nets, torch.device("cpu"), tmp_path, parts=2)
    assert [f.label.split(" from ")[1] for f in futures] == ["layer1.0..layer2.1", "layer4.1..layer4.1"]
    worker.reset()  # each part starts from nothing, as on a fresh Ray worker
    merged = merge_rows(job, 3, [f.result() for f in reversed(futures)])
    np.testing.assert_array_equal(merged.values, whole.values)
    assert list(merged.stitchers) == list(whole.stitchers)
    assert all(torch.equal(merged.stitchers[k], whole.stitchers[k]) for k in whole.stitchers)
    assert len(list((tmp_path / "mlruns" / "cache" / job.key).glob("cell_*.pt"))) == 9  # resumable
    worker.clear()


# -- Ray against local on the shared tiny run -----------------------------------------------


def _matrices(ws, parent_id):
    """(plugin, source, target) -> values of every matrix the run used (computed or reused)."""
    client = client_of(ws)
    jobs = json.loads(Path(client.download_artifacts(parent_id, "jobs.json")).read_text())
    out = {}
    for j in jobs:
        tags = client.get_run(j["run_id"]).data.tags
        key = (tags["stitchbench.plugin"], tags["stitchbench.source"], tags["stitchbench.target"])
        out[key] = np.load(client.download_artifacts(j["run_id"], "matrix/values.npy"))
    return out


def _assert_close(got, want, where="report"):
    """Equal structure and text, numbers to float tolerance; timings and run ids are skipped."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), where
        for k in want:
            if "seconds" not in str(k) and k not in ("run_id", "start_time"):
                _assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for n, (a, b) in enumerate(zip(got, want)):
            _assert_close(a, b, f"{where}[{n}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9, nan_ok=True), where
    else:
        assert got == want, where


#: What the Ray run computes: DM and every index (the Ding test requires them) with their
#: layer identification, the OOD detectors and the Ding probes: every kind of task.
RAY_PLUGINS = ("--plugin", "dm", "--plugin", "lcka", "--plugin", "mean_norm", "--plugin", "energy_ood",
               "--plugin", "ding_specificity")


def test_ray_gives_the_same_results_as_local(shared_run_waiter, tmp_path, monkeypatch, cli_here):
    """Part of the shared tiny run again, fresh, on a local 2-CPU Ray cluster: networks,
    matrices, OOD detectors and Ding probes as Ray tasks (the registered third-party index
    shipped to the workers). Every number equals the local run's (both one torch thread)."""
    pytest.importorskip("ray")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    ray_ws = new_tiny_workspace(tmp_path / "ray")
    p = cli(*RUN_TINY, *RAY_PLUGINS, "--executor", "ray", "--set", "executor.num_cpus=2", cwd=ray_ws, env=ONE_THREAD)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "networks trained 2, reused 0" in p.stdout and "matrix jobs computed 18, reused 0" in p.stdout, p.stdout
    ray_id = p.stdout.split("run ", 1)[1].split()[0]
    local_run = shared_run_waiter()  # the same run, local: computed meanwhile, in the background
    local_ws, local_id = local_run.path, local_run.run_id

    ray, local = (json.loads(cli_here("report", rid, "--json", cwd=ws).stdout)
                  for ws, rid in ((ray_ws, ray_id), (local_ws, local_id)))
    # Table 1 of the measures the Ray run computed
    measures = {"dm_func", "lcka", "mean_norm", "pwcca", "opd", "dm_struct"}
    assert set(ray["layer_identification"]["intra"]) == measures
    for scope in ("intra", "inter"):
        _assert_close(ray["layer_identification"][scope],
                      {m: local["layer_identification"][scope][m] for m in measures}, scope)
    # the OOD analysis of the DM matrices (detectors trained as Ray tasks)
    assert len(ray["ood"]["detectors"]) == 6 and not any(d["reused"] for d in ray["ood"]["detectors"])
    for part in ("detectors", "layers", "auxiliary"):
        _assert_close(ray["ood"][part], local["ood"][part], part)
    _assert_close(ray["ood"]["summary"]["dm"], local["ood"]["summary"]["dm"], "ood summary")
    _assert_close(ray["ood"]["matrices"]["dm"], local["ood"]["matrices"]["dm"], "ood matrices")
    # the specificity test (probes as Ray tasks)
    _assert_close(ray["ding"]["specificity"], local["ding"]["specificity"], "ding")
    got, want = _matrices(ray_ws, ray_id), _matrices(local_ws, local_id)
    assert len(got) == 18 and set(got) <= set(want)
    for key in got:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-9, err_msg=str(key))
    client = client_of(ray_ws)
    parent = client.get_run(ray_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["stitchbench.executor"].startswith("ray")
    local_metrics = client_of(local_ws).get_run(local_id).data.metrics
    assert parent.data.metrics == pytest.approx({k: local_metrics[k] for k in parent.data.metrics}, rel=1e-6)
    kids = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{ray_id}'")
    assert kids and all(k.info.status == "FINISHED" for k in kids)
    nets = [k for k in kids if k.data.tags["stitchbench.kind"] == "network"]
    assert len(nets) == 2 and all(len(client.get_metric_history(n.info.run_id, "loss")) == 2 for n in nets)
    nets = {"digits-resnet18-w4-seed0", "digits-resnet18-w4-seed1"}
    detectors = {f"{n}-{layer}-energy-detector" for n in nets for layer in ("layer1.0", "layer2.1", "layer4.1")}
    assert {m.name for m in client.search_registered_models()} == nets | detectors
