"""Base networks: trained once per key, registered in the MLflow model registry, reused.

A network is registered under a name that says what it is (``digits-resnet18-w16-seed0``);
each version carries its job key as the tag ``stitchbench.job_key``. A later run with the
same settings finds the version by name and key and loads its weights (a state dict, read
with ``weights_only=True``, so no pickled code runs) instead of training again.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import tracking
from .network import StitchableNetwork
from .plan import NetworkSpec, Plan
from .runs import child_run
from .training import accuracy, train_classifier

log = logging.getLogger(__name__)
STATE_DICT_ARTIFACT = "network/state_dict.pt"


@dataclass
class TrainedNetwork:
    spec: NetworkSpec
    net: StitchableNetwork
    test_accuracy: float
    run_id: str
    reused: bool


def build(plan: Plan, spec: NetworkSpec, device: torch.device) -> StitchableNetwork:
    torch.manual_seed(spec.seed)
    net = plan.architecture.obj.build(plan.architecture.params, plan.data.num_classes, tuple(plan.data.image_shape))
    return net.to(device)


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


def ensure_network(plan: Plan, spec: NetworkSpec, client: Any, device: torch.device) -> TrainedNetwork:
    """The trained network of ``spec``: loaded from the registry when a finished version
    with the same key exists, trained (and registered) otherwise."""
    net = build(plan, spec, device)
    found = find_registered(client, spec)
    if found is not None:
        net.load_state_dict(load_state_dict(found.run_id))
        net.eval()
        acc = found.tags.get("test_accuracy")
        acc = float(acc) if acc is not None else accuracy(net, plan.data, device=device)
        log.info("reusing %s version %s (key %s)", spec.model_name, found.version, spec.key)
        return TrainedNetwork(spec, net, acc, found.run_id, reused=True)
    return _train(plan, spec, net, client, device)


def _train(plan: Plan, spec: NetworkSpec, net: StitchableNetwork, client: Any, device: torch.device) -> TrainedNetwork:
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

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            mlflow.log_metrics(metrics, step=epoch + 1)

        history = train_classifier(
            net, plan.data, cfg, seed=spec.seed, device=device, on_epoch=on_epoch, desc=f"train {spec.model_name}"
        )
        acc = history[-1]["test_accuracy"] if history else accuracy(net, plan.data, device=device)
        mlflow.log_metric("test_accuracy", acc)
        net.eval()
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "state_dict.pt"
            torch.save(state, p)
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
