"""Network jobs: base networks trained once per key, registered in the MLflow model
registry, reused.

A network is registered under a name that says what it is (``digits-resnet18-w16-seed0``),
each version tagged with its job key. A later run with the same settings finds the
finished job by key (`find_finished_job`) and loads its weights (a state dict, read with
``weights_only=True``, so no pickled code runs) instead of training again.

Training is a task (`train_network`: plan pieces and data in, a `NetworkResult` out) that
an executor runs anywhere; the driver looks up finished networks before submitting, and
does every MLflow write (`finish_training`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..execution import worker_state as worker
from ..execution.executors import Executor, Future
from ..execution.worker_state import NetworkResult, build_network
from ..nn.network import StitchableNetwork
from ..nn.training import accuracy, train_classifier
from ..store.jobs import find_finished_job, job_run
from .config import TrainingConfig
from .plan import NetworkSpec, Plan, PluginUse

log = logging.getLogger(__name__)
STATE_DICT_ARTIFACT = "network/state_dict.pt"


@dataclass
class TrainedNetwork:
    spec: NetworkSpec
    net: StitchableNetwork
    test_accuracy: float
    run_id: str
    reused: bool

    def as_input(self, with_weights: bool) -> NetworkResult:
        """What matrix jobs take of this network; its weights only when they run elsewhere."""
        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()} if with_weights else None
        return NetworkResult(self.spec.key, self.spec.model_name, self.spec.seed, self.test_accuracy, state)


def build(plan: Plan, spec: NetworkSpec, device: torch.device) -> StitchableNetwork:
    return build_network(plan.architecture, spec.seed, plan.data, device)


def reuse_network(plan: Plan, spec: NetworkSpec, client: Any, device: torch.device) -> TrainedNetwork | None:
    """The network of ``spec`` loaded from its finished job (same key), if there is one (and
    put in this process's `worker.state`), else None."""
    found = find_finished_job(spec.key, client)
    if found is None:
        return None
    net = build(plan, spec, device)
    try:
        net.load_state_dict(found.load_state_dict(STATE_DICT_ARTIFACT))
    except Exception as e:  # noqa: BLE001 - damaged or refused (pickled code) weights are never trusted
        log.warning("%s (run %s): its stored weights cannot be loaded (%s: %s); training it again",
                    spec.model_name, found.run_id, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return None
    net.eval()
    acc = found.metrics.get("test_accuracy")
    acc = float(acc) if acc is not None else accuracy(net, plan.data, device=device)
    worker.state().add(spec.key, net)
    log.info("reusing %s from run %s (key %s)", spec.model_name, found.run_id, spec.key)
    return TrainedNetwork(spec, net, acc, found.run_id, reused=True)


# -- the task -----------------------------------------------------------------------------


@dataclass
class TrainTask:
    """One network to train (plain, picklable data)."""

    spec: NetworkSpec
    architecture: PluginUse
    training: TrainingConfig
    device: str


def train_network(
    task: TrainTask, data: Any, on_epoch: Callable[[int, dict[str, float]], None] | None = None
) -> NetworkResult:
    """Build the network of ``task.spec`` (seeded) and train it on ``data`` (a
    `LoadedDataset`). Returns its state dict (CPU), test accuracy and per-epoch metrics;
    the trained network also stays in this process's `worker.state`. Writes nothing."""
    spec = task.spec
    device = torch.device(task.device)
    net = build_network(task.architecture, spec.seed, data, device)
    history = train_classifier(
        net, data, task.training, seed=spec.seed, device=device, on_epoch=on_epoch, desc=f"train {spec.model_name}"
    )
    acc = history[-1]["test_accuracy"] if history else accuracy(net, data, device=device)
    net.eval()
    worker.state().add(spec.key, net)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    return NetworkResult(spec.key, spec.model_name, spec.seed, acc, state, history)


def _log_epoch(epoch: int, metrics: dict[str, float]) -> None:
    """Live epoch metrics to the active (the network's) run; local executor only."""
    import mlflow

    mlflow.log_metrics(metrics, step=epoch + 1)


def submit_training(plan: Plan, spec: NetworkSpec, executor: Executor, data: Any, device: torch.device) -> Future:
    """Submit the training of ``spec``; ``data`` is the data set (or its shared handle)."""
    task = TrainTask(spec, plan.architecture, plan.config.networks.training, str(device))
    on_epoch = _log_epoch if executor.in_process else None
    return executor.submit(train_network, task, data, on_epoch, label=f"network {spec.model_name}")


def finish_training(plan: Plan, spec: NetworkSpec, future: Future, device: torch.device, *, live: bool) -> TrainedNetwork:
    """In the driver: the network's nested run around the task's result (with the local
    executor the training runs right here, inside the run, and ``live`` epoch metrics were
    logged as it went), then its weights, model and registry version."""
    cfg = plan.config.networks.training
    with job_run(f"network {spec.model_name}", kind="network", plugin=plan.architecture.name, key=spec.key) as job:
        job.log_params({
            "architecture": plan.architecture.name,
            **{f"architecture.{k}": v for k, v in plan.architecture.params_dict().items()},
            "dataset": plan.dataset.name,
            "seed": spec.seed,
            **{f"training.{k}": v for k, v in cfg.model_dump(mode="json").items()},
        })
        result: NetworkResult = future.result()
        if not live:
            job.log_history(result.history)
        acc = result.test_accuracy
        job.log_metrics({"test_accuracy": acc})
        net = worker.state().network(plan.architecture, result, plan.data, device)
        job.log_state_dict(result.state_dict or {}, STATE_DICT_ARTIFACT)
        example = next(iter(torch.utils.data.DataLoader(plan.data.test, batch_size=2)))[0].float()
        version = job.log_model(net, example.numpy(), spec.model_name, fallback_dir="network",
                                tags={"test_accuracy": repr(float(acc)), "seed": str(spec.seed)})
        log.info("trained %s: test accuracy %.4f (registered version %s)", spec.model_name, acc, version)
    return TrainedNetwork(spec, net, acc, job.run_id, reused=False)
