"""Base networks: trained once per key, registered in the MLflow model registry, reused.

A network is registered under a name that says what it is (``digits-resnet18-w16-seed0``);
each version carries its job key as the tag ``stitchbench.job_key``. A later run with the
same settings finds the version by name and key and loads its weights (a state dict, read
with ``weights_only=True``, so no pickled code runs) instead of training again.

Training is a task (`train_network`: plan pieces and data in, a `NetworkResult` out) that
an executor runs anywhere; the driver looks up finished networks before submitting, and
does every MLflow write (`finish_training`).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import tracking, worker
from .config import TrainingConfig
from .executors import Executor, Future
from .network import StitchableNetwork
from .plan import NetworkSpec, Plan, PluginUse
from .runs import child_run
from .training import accuracy, train_classifier
from .worker import NetworkResult, build_network

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


def find_registered(client: Any, spec: NetworkSpec) -> Any | None:
    try:
        versions = client.search_model_versions(f"name = '{spec.model_name}'")
    except Exception:  # noqa: BLE001 - no such registered model yet
        return None
    matches = [v for v in versions if v.tags.get(tracking.TAG_KEY) == spec.key and v.run_id]
    matches.sort(key=lambda v: int(v.version), reverse=True)
    for v in matches:
        run = client.get_run(v.run_id)
        if run.info.status == "FINISHED" and run.data.tags.get(tracking.TAG_COMPLETE) == "1":
            return v
    return None


def load_state_dict(run_id: str) -> dict[str, torch.Tensor]:
    path = tracking.download(run_id, STATE_DICT_ARTIFACT)
    return torch.load(path, map_location="cpu", weights_only=True)


def reuse_network(plan: Plan, spec: NetworkSpec, client: Any, device: torch.device) -> TrainedNetwork | None:
    """The network of ``spec`` loaded from the registry when a finished version with the
    same key exists (and put in this process's `worker.state`), else None."""
    found = find_registered(client, spec)
    if found is None:
        return None
    net = build(plan, spec, device)
    try:
        net.load_state_dict(load_state_dict(found.run_id))
    except Exception as e:  # noqa: BLE001 - damaged or refused (pickled code) weights are never trusted
        log.warning("%s version %s: its stored weights cannot be loaded (%s: %s); training it again",
                    spec.model_name, found.version, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return None
    net.eval()
    acc = found.tags.get("test_accuracy")
    acc = float(acc) if acc is not None else accuracy(net, plan.data, device=device)
    worker.state().add(spec.key, net)
    log.info("reusing %s version %s (key %s)", spec.model_name, found.version, spec.key)
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
    import mlflow

    cfg = plan.config.networks.training
    tags = {tracking.TAG_KIND: "network", tracking.TAG_KEY: spec.key, tracking.TAG_PLUGIN: plan.architecture.name}
    with child_run(f"network {spec.model_name}", tags) as run:
        mlflow.log_params({
            "architecture": plan.architecture.name,
            **{f"architecture.{k}": v for k, v in plan.architecture.params_dict().items()},
            "dataset": plan.dataset.name,
            "seed": spec.seed,
            **{f"training.{k}": v for k, v in cfg.model_dump(mode="json").items()},
        })
        result: NetworkResult = future.result()
        if not live:
            for epoch, metrics in enumerate(result.history):
                mlflow.log_metrics(metrics, step=epoch + 1)
        acc = result.test_accuracy
        mlflow.log_metric("test_accuracy", acc)
        net = worker.state().network(plan.architecture, result, plan.data, device)
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "state_dict.pt"
            torch.save(result.state_dict, p)
            mlflow.log_artifact(str(p), "network")
        version = _register(plan, spec, net, run.info.run_id, acc)
        mlflow.set_tag(tracking.TAG_COMPLETE, "1")
        log.info("trained %s: test accuracy %.4f (registered version %s)", spec.model_name, acc, version)
    return TrainedNetwork(spec, net, acc, run.info.run_id, reused=False)


def _register(plan: Plan, spec: NetworkSpec, net: StitchableNetwork, run_id: str, acc: float) -> str:
    """Log the network as an MLflow model (pt2: a traced graph, no pickle) and register it.

    Falls back to registering the state-dict artifact when the network cannot be exported."""
    import contextlib
    import io

    import mlflow

    tags = {tracking.TAG_KEY: spec.key, "test_accuracy": repr(float(acc)), "seed": str(spec.seed)}
    example = next(iter(torch.utils.data.DataLoader(plan.data.test, batch_size=2)))[0].float()
    example = example.to(next(net.parameters()).device)
    chatter = io.StringIO()  # MLflow prints "Successfully registered model ..." to stderr
    try:
        with contextlib.redirect_stderr(chatter), contextlib.redirect_stdout(chatter):
            info = mlflow.pytorch.log_model(
                net,
                name="model",
                input_example=example.cpu().numpy(),
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                export_model=True,
                serialization_format="pt2",
            )
            mv = mlflow.register_model(info.model_uri, spec.model_name, tags=tags)
    except Exception as e:  # noqa: BLE001 - an architecture torch.export cannot trace
        log.warning("could not export %s as an MLflow model (%s); registering its state dict", spec.model_name, e)
        client = mlflow.MlflowClient()
        try:
            client.create_registered_model(spec.model_name)
        except Exception as exists:  # noqa: BLE001 - already exists
            log.debug("registered model %s: %s", spec.model_name, exists)
        source = f"{mlflow.get_run(run_id).info.artifact_uri}/network"
        mv = client.create_model_version(spec.model_name, source=source, run_id=run_id, tags=tags)
    return str(mv.version)
