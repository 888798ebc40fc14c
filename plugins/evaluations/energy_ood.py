"""Energy-based OOD analysis of stitched representations (paper Section 4, Fig. 1b/1c, Fig. 2).

For every target (network, layer) of the run's stitching matrices, a dedicated detector
network is trained on that layer's activations (Liu et al. 2020: cross-entropy
pre-training with the images' labels, then fine-tuning with an energy-margin loss against
the activations of an auxiliary OOD set), registered in the MLflow model registry and
reused by key. Each detector then scores, for every cell (i, j) of every stitching matrix,
how well its energies separate the target activations g<=j(x) (in distribution, the
positive class) from the stitched activations T(f<=i(x)) of the same test images: AUROC
0.5 means the stitched representation is in distribution, 1.0 that it is fully separable.

The torch code lives in `._ood_detectors` and `._ood_metrics` and is imported inside the
methods, so listing plugins does not import torch.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

import stitchbench
from stitchbench import Evaluation, EvaluationResult, Params

from ._network_keys import network_key

log = logging.getLogger(__name__)

DETECTOR_ARTIFACT_DIR = "detector"
DETECTOR_ARTIFACT = f"{DETECTOR_ARTIFACT_DIR}/state_dict.pt"
#: Bump when a change here would change what a trained detector is.
DETECTOR_VERSION = 1
#: The order of the rows of the Fig. 2 layout (matcher names); other matchers follow.
MEASURE_ORDER = ("tlm", "dm")


# -- parameters ---------------------------------------------------------------------------------


class AuxiliaryParams(Params):
    """The auxiliary OOD set: any registered dataset plugin, usually an ``auxiliary`` one."""

    name: str = Field("noise", description="dataset plugin of the auxiliary OOD images")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="its params; a set with an `image_shape` param gets the in-distribution set's shape unless given",
    )

    @model_validator(mode="after")
    def _known_set(self) -> AuxiliaryParams:
        try:
            obj = stitchbench.get_plugin(self.name, "dataset")
        except stitchbench.StitchbenchError as e:
            raise ValueError(f"auxiliary set {self.name!r}: {e}") from None
        try:
            obj.Params.model_validate(self.params or {})
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()
            )
            raise ValueError(f"invalid params for the auxiliary set {self.name!r}: {problems}") from None
        return self


class PretrainParams(Params):
    """Cross-entropy pre-training on the layer's activations with the images' labels."""

    epochs: int = Field(100, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    augment: bool = Field(
        True,
        description="apply the dataset's training augmentation (if it has one); the activations are then "
        "computed batch by batch through the frozen network",
    )


class FinetuneParams(Params):
    """Energy-margin fine-tuning (Liu et al. 2020) with auxiliary OOD activations."""

    epochs: int = Field(20, ge=0)
    m_in: float = Field(-25.0, description="margin: in-distribution energies are pushed below it")
    m_out: float = Field(-7.0, description="margin: auxiliary OOD energies are pushed above it")
    weight: float = Field(0.1, ge=0, description="weight of the energy-margin term")
    batch_size: int | None = Field(None, ge=1, description="ID batch size (null: pretrain.batch_size)")
    aux_batch_size: int | None = Field(None, ge=1, description="auxiliary batch size (null: the ID batch size)")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="Liu et al.: SGD, Nesterov momentum 0.9")
    lr: float = Field(1e-3, gt=0, description="initial learning rate (cosine schedule to 0)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only")
    weight_decay: float = Field(5e-4, ge=0)
    freeze_batchnorm: bool = Field(
        False,
        description="keep BatchNorm statistics from pre-training (Liu et al. update them on the mixed ID/OOD batches)",
    )


class ResNetDetectorParams(Params):
    """Detector of conv activations: width 64, 4 stages x 2 blocks, 32x32 input is ResNet-18 as the authors use."""

    width: int = Field(64, ge=1, description="channels of the first stage (stages: w, 2w, 4w, 8w)")
    stages: int = Field(4, ge=1, le=4)
    blocks: int = Field(2, ge=1, description="residual blocks per stage")
    upsample_to: int | None = Field(32, ge=1, description="bilinear resize of the input to this size (null: as it comes)")


class ViTDetectorParams(Params):
    """Detector of token activations: ViT blocks reading token 0 (the authors: 12 ViT-Ti blocks)."""

    width: int | None = Field(None, ge=1, description="token width (null: the layer's; else a linear projection first)")
    depth: int = Field(12, ge=1)
    num_heads: int = Field(3, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)


class EnergyOODParams(Params):
    auxiliary: AuxiliaryParams = Field(default_factory=AuxiliaryParams)
    pretrain: PretrainParams = Field(default_factory=PretrainParams)
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)
    resnet: ResNetDetectorParams = Field(default_factory=ResNetDetectorParams)
    vit: ViTDetectorParams = Field(default_factory=ViTDetectorParams)
    temperature: float = Field(1.0, gt=0, description="T of the energy -T logsumexp(logits / T) used for scoring")
    n_examples: int | None = Field(None, ge=2, description="score the first n test images (null: the whole test split)")
    figure_layer: int | str = Field(0, description="target layer of the Fig. 1c plot (index into the run's layers, or a name)")
    figure_scope: Literal["intra", "inter"] = "intra"
    min_sanity_auroc: float = Field(
        0.9, ge=0, le=1, description="warn when a detector separates ID from held-out auxiliary data worse than this"
    )
    eval_batch_size: int = Field(256, ge=1)
    memory_limit_mb: int = Field(
        2048, ge=0, description="hold a split's activations (all layers) in memory up to this size, else stream them"
    )
    heatmaps: bool = Field(True, description="also log one AUROC heat map per stitching matrix")


# -- the evaluation -----------------------------------------------------------------------------


@dataclass
class Detector:
    """A trained detector of one (network, layer) and what it said."""

    network: str
    layer: str
    model_name: str
    key: str
    module: Any
    version: str
    run_id: str
    reused: bool
    energy_id: Any = None  # (N,) energies of the target's test activations
    energy_aux: Any = None  # (M,) energies of held-out auxiliary activations
    sanity: dict[str, float] = field(default_factory=dict)
    id_accuracy: float = float("nan")


class EnergyOOD(Evaluation):
    """Section 4 / Fig. 2: AUROC of an energy-based OOD detector per target layer, for every stitching cell."""

    name = "energy_ood"
    summarises_matrices = False
    Params = EnergyOODParams

    def estimate_cost(self, params: Any, plan: stitchbench.PlanSummary) -> list[stitchbench.Cost]:
        """Detectors counted as networks of the run's architecture (the paper's detectors
        are ResNet-18s on activations upsampled to 32x32): pre-training epochs over the
        training split, fine-tuning epochs over it with as many auxiliary images, the
        activations recomputed per epoch when augmented; then one detector pass per test
        image and stitching cell."""
        from stitchbench import Cost

        p = params if isinstance(params, EnergyOODParams) else EnergyOODParams.model_validate(params or {})
        n, layers = plan.info.n_train, len(plan.layers)
        detectors = max(plan.stitch_targets.values(), default=0) * layers
        if not detectors:
            return []
        epochs = p.pretrain.epochs + p.finetune.epochs
        per_detector = Cost(
            train_images=(p.pretrain.epochs + 2 * p.finetune.epochs) * n,
            forward_images=(epochs if p.pretrain.augment else 1) * n + p.finetune.epochs * n,
        )
        cells = sum(plan.stitch_matrices.values()) * layers**2
        return [
            Cost(train_images=detectors * per_detector.train_images,
                 forward_images=detectors * per_detector.forward_images, jobs=detectors,
                 what="OOD detectors (pre-train + fine-tune)"),
            Cost(forward_images=cells * plan.info.n_test, jobs=cells, what="OOD scores of stitched activations"),
        ]

    def run(self, context: stitchbench.RunContext, params: Any) -> EvaluationResult:
        p = params if isinstance(params, EnergyOODParams) else EnergyOODParams.model_validate(params or {})
        records = [m for m in context.matrices if m.functional and m.stitcher_state is not None]
        if not records:
            text = (
                "Energy-based OOD analysis (Section 4): this run has no stitching matrices, so there is "
                "nothing to analyse; add a matcher (e.g. --plugin dm --plugin tlm)."
            )
            return EvaluationResult(report_key="ood", report=None, report_text=text)
        return _Analysis(context, p, records).run()


class _Analysis:
    """One run of the evaluation (kept apart so ``EnergyOOD`` stays a stateless plugin)."""

    def __init__(self, context: Any, p: EnergyOODParams, records: list[Any]):
        import torch

        self.torch = torch
        self.ctx = context
        self.p = p
        self.records = records
        self.device = context.device
        self.shapes = context.layer_shapes()
        self.detectors: dict[tuple[str, str], Detector] = {}
        self.net_keys = {name: network_key(context, name) for name in context.networks}
        self.seed = int(getattr(context.config, "seed", 0))
        self._aux = None
        self._aux_resolved: dict[str, Any] | None = None
        self._sources: dict[str, _Sources] = {}

    # -- the auxiliary set ----------------------------------------------------------------
    def aux_params(self) -> dict[str, Any]:
        if self._aux_resolved is None:
            obj = self.ctx.get_plugin(self.p.auxiliary.name)
            if getattr(obj, "kind", None) != "dataset":
                raise stitchbench.UsageError(f"energy_ood.auxiliary.name: {self.p.auxiliary.name!r} is not a dataset")
            raw = dict(self.p.auxiliary.params)
            if "image_shape" in obj.Params.model_fields and "image_shape" not in raw:
                raw["image_shape"] = list(self.ctx.data.image_shape)
            self._aux_obj = obj
            self._aux_validated = obj.Params.model_validate(raw)
            self._aux_resolved = {"name": obj.name, "params": self._aux_validated.model_dump(mode="json")}
        return self._aux_resolved

    def aux(self) -> Any:
        if self._aux is None:
            self.aux_params()
            cfg = self.ctx.config
            data_dir = Path(cfg.data_dir).expanduser() if getattr(cfg, "data_dir", None) else None
            if getattr(self._aux_obj, "needs_data_dir", False) and data_dir is None:
                raise stitchbench.UsageError(
                    f"the auxiliary OOD set {self._aux_obj.name!r} is read from disk: pass --data-dir DIR"
                )
            aux = self._aux_obj.load(self._aux_validated, data_dir, bool(getattr(cfg, "download", False)))
            if tuple(aux.image_shape) != tuple(self.ctx.data.image_shape):
                raise stitchbench.UsageError(
                    f"the auxiliary OOD set {self._aux_obj.name!r} has images of shape {tuple(aux.image_shape)}, "
                    f"the in-distribution set {self.ctx.data.name!r} {tuple(self.ctx.data.image_shape)}; they must match"
                )
            self._aux = aux
        return self._aux

    # -- activations -----------------------------------------------------------------------
    def _fits(self, n: int) -> bool:
        return fits_in_memory(self.shapes, n, self.p.memory_limit_mb)

    def sources(self, net_name: str) -> _Sources:
        found = self._sources.get(net_name)
        if found is None:
            found = self._sources[net_name] = _Sources(
                self.p, self.shapes, self.device, self.ctx.networks[net_name], self.ctx.data, self.aux,
                lambda split, n: self.ctx.activations(net_name, split, n),
            )
        return found

    def layer_batches(self, net_name: str, layer: str, which: str) -> Any:
        return self.sources(net_name).batches(layer, which)

    # -- detectors ---------------------------------------------------------------------------
    def settings(self, layer: str) -> dict[str, Any]:
        """Everything that determines a detector besides the target network (for its key)."""
        shape = tuple(self.shapes[layer])
        arch = self.p.resnet if len(shape) == 3 else self.p.vit
        return {
            "v": DETECTOR_VERSION,
            "layer": layer,
            "shape": list(shape),
            "detector": {"kind": "resnet" if len(shape) == 3 else "vit", **arch.model_dump(mode="json")},
            "pretrain": self.p.pretrain.model_dump(mode="json"),
            "finetune": self.p.finetune.model_dump(mode="json"),
            "auxiliary": self.aux_params(),
            "seed": self.seed,
        }

    def build(self, layer: str) -> Any:
        return new_detector(self.p, tuple(self.shapes[layer]), self.ctx.data.num_classes, self.seed, self.device)

    def detector_key(self, net_name: str, layer: str) -> tuple[str, str, dict[str, Any]]:
        from stitchbench.keys import job_key

        settings = self.settings(layer)
        key = job_key("energy_detector", network=self.net_keys[net_name], **settings)
        return f"{net_name}-{layer}-energy-detector", key, settings

    def reuse_detector(self, net_name: str, layer: str, client: Any) -> Detector | None:
        model_name, key, _ = self.detector_key(net_name, layer)
        found = find_detector(client, model_name, key)
        if found is None:
            return None
        det = self.build(layer)
        det.load_state_dict(load_detector_state(found.run_id))
        det.eval()
        log.info("reusing OOD detector %s version %s (key %s)", model_name, found.version, key)
        d = Detector(net_name, layer, model_name, key, det, str(found.version), found.run_id, reused=True)
        self.score_detector(d)
        return d

    def submit_detector(self, net_name: str, layer: str) -> Any:
        """A task of the run's executor that trains the detector of (network, layer)."""
        from stitchbench.keys import job_key

        task = DetectorTask(
            network=net_name, layer=layer, params=self.p.model_dump(mode="json"), seed=self.seed,
            device=str(self.device), num_classes=int(self.ctx.data.num_classes),
            shapes={k: list(v) for k, v in self.shapes.items()},
        )
        aux = self.ctx.share(job_key("energy_ood_aux", **self.aux_params()), self.aux())
        return self.ctx.submit(train_detector_task, task, self.ctx.network_input(net_name), self.ctx.data_input(), aux,
                               label=f"OOD detector {net_name}-{layer}")

    def score_detector(self, d: Detector) -> None:
        """ID test energies, held-out auxiliary energies and the sanity scores of ``d``."""
        from ._ood_detectors import detector_energies
        from ._ood_metrics import ood_scores

        bs = self.p.eval_batch_size
        test = self.layer_batches(d.network, d.layer, "test")
        d.energy_id, pred = detector_energies(d.module, test.batches(bs), self.p.temperature)
        d.id_accuracy = float((pred == test.labels.numpy()).mean())
        aux = self.layer_batches(d.network, d.layer, "aux_test")
        d.energy_aux, _ = detector_energies(d.module, aux.batches(bs), self.p.temperature)
        d.sanity = ood_scores(d.energy_id, d.energy_aux).as_dict()
        if d.sanity["auroc"] < self.p.min_sanity_auroc:
            log.warning(
                "OOD detector %s separates ID from held-out auxiliary data with AUROC %.3f only (< %.2f): its "
                "verdicts on stitched activations are weak; train it longer or make it larger",
                d.model_name, d.sanity["auroc"], self.p.min_sanity_auroc,
            )

    def log_detector(self, net_name: str, layer: str, trained: dict[str, Any]) -> Detector:
        """The detector a task trained, in its nested run: params, training curves, sanity
        scores, weights; registered under its key."""
        import mlflow
        from mlflow.entities import Metric

        from stitchbench import tracking
        from stitchbench.runs import child_run

        model_name, key, settings = self.detector_key(net_name, layer)
        det = self.build(layer)
        det.load_state_dict(trained["state"])
        det.eval()
        h1, h2 = trained["pretrain"], trained["finetune"]
        tags = {tracking.TAG_KIND: "ood_detector", tracking.TAG_KEY: key, tracking.TAG_PLUGIN: "energy_ood"}
        with child_run(f"ood detector {model_name}", tags) as run:
            mlflow.log_params({k: str(v)[:6000] for k, v in _flat(settings).items()} | {"network": net_name})
            d = Detector(net_name, layer, model_name, key, det, "", run.info.run_id, reused=False)
            self.score_detector(d)
            now = int(time.time() * 1000)
            metrics = [Metric(k, float(v), now, e + 1) for e, h in enumerate(h1) for k, v in h.items()]
            metrics += [Metric(k, float(v), now, e + 1) for e, h in enumerate(h2) for k, v in h.items()]
            metrics += [Metric(f"sanity_{k}", float(d.sanity[k]), now, 0) for k in ("auroc", "aupr", "fpr95")]
            metrics.append(Metric("id_test_accuracy", d.id_accuracy, now, 0))
            client = mlflow.MlflowClient()
            client.log_batch(run.info.run_id, metrics=metrics)
            state = {k: v.detach().cpu() for k, v in det.state_dict().items()}
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "state_dict.pt"
                self.torch.save(state, path)
                mlflow.log_artifact(str(path), DETECTOR_ARTIFACT_DIR)
            d.version = register_detector(client, model_name, run.info.run_id, {
                tracking.TAG_KEY: key,
                "network": net_name,
                "layer": layer,
                "sanity_auroc": f"{d.sanity['auroc']:.6f}",
                "id_test_accuracy": f"{d.id_accuracy:.6f}",
            })
            mlflow.set_tag(tracking.TAG_COMPLETE, "1")
        log.info("trained OOD detector %s (sanity AUROC %.4f, ID accuracy %.3f; registered version %s)",
                 model_name, d.sanity["auroc"], d.id_accuracy, d.version)
        return d

    # -- stitched activations -----------------------------------------------------------------
    def stitched_energies(self, rec: Any) -> Any:
        """Energies (n, n, N) of detector (target, layer j) on T_ij(f<=i(x)) for every cell."""
        import numpy as np

        from ._ood_metrics import energy

        torch = self.torch
        layers = rec.layers
        n = len(layers)
        stitchers = {(i, j): self.ctx.stitching_layer(rec, i, j) for i in range(n) for j in range(n)}
        dets = [self.detectors[(rec.target, lj)].module for lj in layers]
        src_net = self.ctx.networks[rec.source]
        out: list[list[list[Any]]] = [[[] for _ in range(n)] for _ in range(n)]
        with torch.no_grad():
            for batch in self.source_batches(rec.source, src_net, layers):
                for i, li in enumerate(layers):
                    a = batch[li].to(self.device)
                    for j in range(n):
                        logits = dets[j](stitchers[(i, j)](a))
                        out[i][j].append(energy(logits.double(), self.p.temperature).cpu())
        return np.stack([np.stack([torch.cat(out[i][j]).numpy() for j in range(n)]) for i in range(n)])

    def source_batches(self, name: str, net: Any, layers: list[str]) -> Any:
        """Per-batch dicts layer -> activations of the test images, all ``layers`` at once."""
        from stitchbench.data import iterate_batches

        bs = self.p.eval_batch_size
        n_test = len(self.ctx.data.test)
        n = n_test if self.p.n_examples is None else min(n_test, self.p.n_examples)
        if self._fits(n):
            acts = self.ctx.activations(name, "test", self.p.n_examples)
            for start in range(0, n, bs):
                yield {layer: acts[layer][start : start + bs] for layer in layers}
            return
        for x, _ in iterate_batches(self.ctx.data.test, bs, limit=n):
            yield {k: v.float() for k, v in net.activations(x.to(self.device), layers).items()}

    # -- the whole analysis ------------------------------------------------------------------------
    def run(self) -> EvaluationResult:
        import mlflow
        import numpy as np

        from stitchbench.progress import progress_bar
        from stitchbench.runs import log_array

        from ._ood_metrics import diag_offdiag_means, ood_scores

        t0 = time.perf_counter()
        client = mlflow.MlflowClient()
        wanted: list[tuple[str, str]] = []
        for rec in self.records:
            for layer in rec.layers:
                if (rec.target, layer) not in wanted:
                    wanted.append((rec.target, layer))
        with progress_bar(total=len(wanted), desc="energy_ood detectors", unit="detector") as bar:
            # Reused detectors are loaded here; the others are trained as tasks of the run's
            # executor (in parallel on Ray) and logged here as they finish.
            training: dict[Any, tuple[str, str]] = {}
            for net_name, layer in wanted:
                d = self.reuse_detector(net_name, layer, client)
                if d is None:
                    training[self.submit_detector(net_name, layer)] = (net_name, layer)
                else:
                    self.detectors[(net_name, layer)] = d
                    bar.update(1)
            for fut in self.ctx.as_completed(list(training)):
                net_name, layer = training[fut]
                self.detectors[(net_name, layer)] = self.log_detector(net_name, layer, fut.result())
                bar.update(1)
        self.detectors = {k: self.detectors[k] for k in wanted}
        t_detectors = time.perf_counter() - t0

        results = []
        energies: dict[str, Any] = {}
        with progress_bar(total=len(self.records), desc="energy_ood matrices", unit="matrix") as bar:
            for rec in self.records:
                e_st = self.stitched_energies(rec)
                n = len(rec.layers)
                cells = [[ood_scores(self.detectors[(rec.target, rec.layers[j])].energy_id, e_st[i, j])
                          for j in range(n)] for i in range(n)]
                res = {
                    "record": rec,
                    "stem": matrix_stem(rec),
                    "auroc": np.array([[c.auroc for c in row] for row in cells]),
                    "aupr": np.array([[c.aupr for c in row] for row in cells]),
                    "fpr95": np.array([[c.fpr95 for c in row] for row in cells]),
                    "energies": e_st,
                }
                res["diag"], res["offdiag"] = diag_offdiag_means(res["auroc"])
                results.append(res)
                energies[f"stitched.{res['stem']}"] = e_st
                bar.update(1)

        # -- outputs --------------------------------------------------------------------------
        for res in results:
            rec = res["record"]
            for what in ("auroc", "aupr", "fpr95"):
                log_array(res[what], f"matrices/{what}_{res['stem']}", header=rec.layers, index=rec.layers)
        for (net_name, layer), d in self.detectors.items():
            energies[f"id.{net_name}.{layer}"] = d.energy_id
            energies[f"aux.{net_name}.{layer}"] = d.energy_aux
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "energies.npz"
            np.savez_compressed(path, **energies)
            mlflow.log_artifact(str(path), "ood")

        measures = ordered_measures({r["record"].plugin for r in results})
        summary: dict[str, dict[str, Any]] = {}
        metrics: dict[str, float] = {}
        run_metrics: dict[str, float] = {}
        for m in measures:
            mine = [r for r in results if r["record"].plugin == m]
            summary[m] = {}
            for scope in ("intra", "inter", "all"):
                sel = mine if scope == "all" else [r for r in mine if r["record"].scope == scope]
                if not sel:
                    continue
                diag, off = pooled_means([r["auroc"] for r in sel])
                summary[m][scope] = {"diag": diag, "offdiag": off, "matrices": len(sel)}
                prefix = f"ood.auroc.{m}" if scope == "all" else f"ood.auroc.{m}.{scope}"
                for part, v in (("diag", diag), ("offdiag", off)):
                    if math.isfinite(v):
                        (metrics if scope == "all" else run_metrics)[f"{prefix}.{part}"] = v
        sanity = [d.sanity["auroc"] for d in self.detectors.values()]
        run_metrics["sanity_auroc.min"] = min(sanity)
        run_metrics["sanity_auroc.mean"] = float(np.mean(sanity))
        run_metrics["detectors.trained"] = sum(not d.reused for d in self.detectors.values())
        run_metrics["detectors.reused"] = sum(d.reused for d in self.detectors.values())
        run_metrics["seconds.detectors"] = t_detectors

        figures: dict[str, Any] = {"ood_fig2": fig2(results, measures)}
        fig_layer = self.figure_layer(results[0]["record"].layers)
        for m in measures:
            res = self.figure_record(results, m)
            if res is not None:
                d = self.detectors[(res["record"].target, res["record"].layers[fig_layer])]
                figures[f"ood_energy_{m}"] = fig1c(res, fig_layer, d, self.aux_params()["name"])
        if self.p.heatmaps:
            from stitchbench.plots import heatmap

            for res in results:
                rec = res["record"]
                title = f"OOD AUROC ({rec.plugin}, {rec.scope}): {rec.source} -> {rec.target}"
                figures[f"heatmaps/auroc_{res['stem']}"] = heatmap(res["auroc"], rec.layers, title=title)

        report = self.report(results, summary, measures)
        run_metrics["seconds"] = time.perf_counter() - t0
        mlflow.log_metrics(run_metrics)
        table = dict(report)
        table["seconds"] = {"total_before_figures": run_metrics["seconds"], "detectors": t_detectors}
        return EvaluationResult(
            metrics=metrics,
            tables={"ood": table},
            figures=figures,
            report_key="ood",
            report=report,
            report_text=format_report(report),
        )

    def figure_layer(self, layers: list[str]) -> int:
        fl = self.p.figure_layer
        if isinstance(fl, str) and not fl.lstrip("-").isdigit():
            if fl not in layers:
                raise stitchbench.UsageError(
                    f"energy_ood.figure_layer: {fl!r} is not a stitched layer ({', '.join(layers)})"
                )
            return layers.index(fl)
        k = int(fl)
        if not 0 <= k < len(layers):
            raise stitchbench.UsageError(
                f"energy_ood.figure_layer: {k} is out of range (the run stitches {len(layers)} layers: 0..{len(layers) - 1})"
            )
        return k

    def figure_record(self, results: list[dict], measure: str) -> dict | None:
        mine = [r for r in results if r["record"].plugin == measure]
        scoped = [r for r in mine if r["record"].scope == self.p.figure_scope]
        return (scoped or mine or [None])[0]

    def report(self, results: list[dict], summary: dict, measures: list[str]) -> dict[str, Any]:
        mats: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for r in results:
            rec = r["record"]
            mats.setdefault(rec.plugin, {}).setdefault(rec.scope, []).append({
                "source": rec.source,
                "target": rec.target,
                "auroc": r["auroc"].tolist(),
                "aupr": r["aupr"].tolist(),
                "fpr95": r["fpr95"].tolist(),
                "measure": rec.measure,
                "relative_accuracy": [[float(v) for v in row] for row in rec.values],
                "diag": r["diag"],
                "offdiag": r["offdiag"],
            })
        return {
            "layers": list(results[0]["record"].layers),
            "auxiliary": self.aux_params(),
            "matchers": measures,
            "summary": summary,
            "matrices": mats,
            "detectors": [
                {
                    "network": d.network, "layer": d.layer, "model_name": d.model_name, "version": d.version,
                    "key": d.key, "reused": d.reused, "sanity_auroc": d.sanity["auroc"],
                    "sanity_aupr": d.sanity["aupr"], "sanity_fpr95": d.sanity["fpr95"],
                    "id_test_accuracy": d.id_accuracy,
                }
                for d in self.detectors.values()
            ],
            "min_sanity_auroc": self.p.min_sanity_auroc,
        }


# -- registry ------------------------------------------------------------------------------------


# -- training a detector, as a task ----------------------------------------------------------


@dataclass
class DetectorTask:
    """One detector to train, as plain data (a task of the run's executor)."""

    network: str
    layer: str
    params: dict[str, Any]  # EnergyOODParams, dumped
    seed: int
    device: str
    num_classes: int
    shapes: dict[str, list[int]]


def train_detector_task(task: DetectorTask, net_input: Any, data: Any, aux: Any) -> dict[str, Any]:
    """Pre-train and fine-tune the detector of ``task`` (anywhere: the driver or a Ray
    worker): its CPU state dict and the two phases' per-epoch metrics. Writes nothing."""
    import torch

    from ._ood_detectors import finetune, pretrain

    p = EnergyOODParams.model_validate(task.params)
    device = torch.device(task.device)
    net = net_input.network(data, device)
    shapes = {k: tuple(v) for k, v in task.shapes.items()}
    det = new_detector(p, shapes[task.layer], task.num_classes, task.seed, device)
    sources = _Sources(p, shapes, device, net, data, lambda: aux,
                       lambda split, n: net_input.activations(data, split, n, device))
    train = sources.batches(task.layer, "train")
    aux_train = sources.batches(task.layer, "aux_train")
    g = torch.Generator().manual_seed(task.seed)
    what = f"OOD detector {task.network}-{task.layer}-energy-detector"
    h1 = pretrain(
        det, train, epochs=p.pretrain.epochs, batch_size=p.pretrain.batch_size, lr=p.pretrain.lr,
        weight_decay=p.pretrain.weight_decay, optimizer=p.pretrain.optimizer, generator=g,
        what=f"{what}: pre-training",
    )
    h2 = finetune(
        det, train, aux_train, epochs=p.finetune.epochs,
        batch_size=p.finetune.batch_size or p.pretrain.batch_size, aux_batch_size=p.finetune.aux_batch_size,
        lr=p.finetune.lr, weight_decay=p.finetune.weight_decay, momentum=p.finetune.momentum,
        optimizer=p.finetune.optimizer, m_in=p.finetune.m_in, m_out=p.finetune.m_out,
        weight=p.finetune.weight, freeze_batchnorm=p.finetune.freeze_batchnorm, generator=g,
        what=f"{what}: fine-tuning",
    )
    return {"state": {k: v.detach().cpu() for k, v in det.state_dict().items()}, "pretrain": h1, "finetune": h2}


def new_detector(p: EnergyOODParams, shape: tuple[int, ...], num_classes: int, seed: int, device: Any) -> Any:
    """A freshly initialised detector for activations of ``shape`` (seeded), on ``device``."""
    import torch

    from ._ood_detectors import build_detector

    torch.manual_seed(seed)
    return build_detector(shape, num_classes, p.resnet.model_dump(), p.vit.model_dump()).to(device)


def fits_in_memory(shapes: dict[str, Any], n: int, limit_mb: float) -> bool:
    per_example = sum(math.prod(s) for s in shapes.values()) * 4
    return n * per_example <= limit_mb * (1 << 20)


class _Sources:
    """One network's layer activations for the detectors: of the ID set (``train`` /
    ``test``) or of the auxiliary set (``aux_train`` / ``aux_test``), from memory when the
    split's activations fit (``id_acts(split, n)`` gives the ID set's, shared with the
    run), else streamed through the network."""

    def __init__(self, p: EnergyOODParams, shapes: dict[str, Any], device: Any, net: Any, data: Any,
                 aux: Any, id_acts: Any):
        self.p, self.shapes, self.device, self.net, self.data = p, shapes, device, net, data
        self.aux = aux  # a callable: the auxiliary set is loaded only when needed
        self.id_acts = id_acts
        self._aux_acts: dict[str, dict[str, Any]] = {}

    def batches(self, layer: str, which: str) -> Any:
        """`LayerBatches` of ``which`` for ``layer``."""
        from stitchbench.activations import extract

        from ._ood_detectors import LayerBatches, split_labels

        if which.startswith("aux_"):
            data, split_name = self.aux(), which[4:]
        else:
            data, split_name = self.data, which
        split = getattr(data, split_name)
        n = len(split)
        if which == "test" and self.p.n_examples is not None:
            n = min(n, self.p.n_examples)
        labels = split_labels(split)[:n]
        augment = data.augment if (which == "train" and self.p.pretrain.augment) else None
        if augment is None and fits_in_memory(self.shapes, n, self.p.memory_limit_mb):
            if which.startswith("aux_"):
                if which not in self._aux_acts:
                    self._aux_acts[which] = extract(self.net, data=data, split=split_name,
                                                    device=next(self.net.parameters()).device)
                acts = self._aux_acts[which]
            else:
                acts = self.id_acts(which, None if which == "train" else self.p.n_examples)
            return LayerBatches(layer, labels, self.device, acts=acts[layer])
        if which == "test" and n < len(split):
            import torch

            from stitchbench.data import TensorSplit

            if isinstance(split, TensorSplit):
                split = TensorSplit(split.images[:n], split.labels[:n])
            else:
                split = torch.utils.data.Subset(split, range(n))
        return LayerBatches(layer, labels, self.device, net=self.net, split=split, augment=augment)


def find_detector(client: Any, model_name: str, key: str) -> Any | None:
    """The newest registered version of ``model_name`` with job key ``key`` whose run
    finished with all its outputs, or None."""
    from stitchbench import tracking

    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except Exception:  # noqa: BLE001 - no such registered model yet
        return None
    matches = [v for v in versions if v.tags.get(tracking.TAG_KEY) == key and v.run_id]
    matches.sort(key=lambda v: int(v.version), reverse=True)
    for v in matches:
        try:
            run = client.get_run(v.run_id)
        except Exception as e:  # noqa: BLE001 - a deleted run
            log.debug("registered %s version %s: run %s unreadable (%s)", model_name, v.version, v.run_id, e)
            continue
        if run.info.status == "FINISHED" and run.data.tags.get(tracking.TAG_COMPLETE) == "1":
            return v
    return None


def load_detector_state(run_id: str) -> dict[str, Any]:
    import torch

    from stitchbench import tracking

    path = tracking.download(run_id, DETECTOR_ARTIFACT)
    return torch.load(path, map_location="cpu", weights_only=True)


def register_detector(client: Any, model_name: str, run_id: str, tags: dict[str, str]) -> str:
    """Register the run's ``detector/`` artifact folder (the state dict) as a new version."""
    try:
        client.create_registered_model(model_name)
    except Exception as exists:  # noqa: BLE001 - already registered
        log.debug("registered model %s: %s", model_name, exists)
    source = f"{client.get_run(run_id).info.artifact_uri}/{DETECTOR_ARTIFACT_DIR}"
    mv = client.create_model_version(model_name, source=source, run_id=run_id, tags=tags)
    return str(mv.version)


# -- summaries, figures, text ---------------------------------------------------------------------


def matrix_stem(rec: Any) -> str:
    who = rec.source if rec.scope == "intra" else f"{rec.source}__{rec.target}"
    return f"{rec.plugin}_{rec.scope}_{who}"


def ordered_measures(measures: set[str]) -> list[str]:
    return [m for m in MEASURE_ORDER if m in measures] + sorted(m for m in measures if m not in MEASURE_ORDER)


def pooled_means(mats: list[Any]) -> tuple[float, float]:
    """Means over every diagonal cell and over every off-diagonal cell of ``mats``."""
    import numpy as np

    diag, off = [], []
    for m in mats:
        m = np.asarray(m, dtype=float)
        mask = np.eye(m.shape[0], dtype=bool)
        diag.append(m[mask])
        off.append(m[~mask])
    d, o = np.concatenate(diag), np.concatenate(off)
    return float(d.mean()), float(o.mean()) if o.size else float("nan")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _column_title(rec: Any) -> str:
    if rec.scope == "intra":
        return f"intra: {rec.source}"
    return f"inter: {rec.source} ->\n{rec.target}"


def fig2(results: list[dict], measures: list[str]) -> Any:
    """Fig. 2's layout: per measure a row of relative-accuracy heat maps and a row of AUROC
    heat maps (TLM first, then DM), one column per stitching matrix (intra, then inter).
    Source layer on the vertical axis, target layer on the horizontal."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    by_measure = {
        m: sorted((r for r in results if r["record"].plugin == m), key=lambda r: r["record"].scope != "intra")
        for m in measures
    }
    ncols = max(len(v) for v in by_measure.values())
    nrows = 2 * len(measures)
    n = len(results[0]["record"].layers)
    cell = max(2.2, 0.3 * n + 0.8)
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols + 1.2, cell * nrows), squeeze=False)
    ticks = [str(k + 1) for k in range(n)]
    for r, m in enumerate(measures):
        for c in range(ncols):
            for k, (what, cmap, lo, hi) in enumerate((("accuracy", "viridis", 0.0, 1.0), ("auroc", "magma", 0.5, 1.0))):
                ax = axes[2 * r + k][c]
                if c >= len(by_measure[m]):
                    ax.axis("off")
                    continue
                res = by_measure[m][c]
                vals = np.asarray(res["record"].values if what == "accuracy" else res["auroc"], dtype=float)
                im = ax.imshow(vals, cmap=cmap, vmin=lo, vmax=max(hi, float(np.nanmax(vals))), origin="upper")
                ax.set_xticks(range(n), ticks, fontsize=6)
                ax.set_yticks(range(n), ticks, fontsize=6)
                if n <= 12:
                    for i in range(n):
                        for j in range(n):
                            v = vals[i, j]
                            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5,
                                    color="white" if v < (lo + hi) / 2 else "black")
                if r == 0 and k == 0:
                    ax.set_title(_column_title(res["record"]), fontsize=8)
                if c == 0:
                    label = "rel. accuracy" if what == "accuracy" else "OOD AUROC"
                    ax.set_ylabel(f"{m.upper()}\n{label}\nsource layer", fontsize=8)
                if 2 * r + k == nrows - 1:
                    ax.set_xlabel("target layer", fontsize=8)
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    fig.suptitle("Relative accuracy and OOD AUROC of stitched representations (0.5 = in distribution)", fontsize=9)
    fig.tight_layout()
    return fig


def fig1c(res: dict, j: int, det: Detector, aux_name: str) -> Any:
    """Fig. 1c: energies of detector (target, layer j). Top: ID test activations vs held-out
    auxiliary OOD activations. Bottom: the stitched activations from every source layer
    (column j of the AUROC matrix), with the ID energies for reference."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    rec = res["record"]
    e_st = res["energies"][:, j]
    allv = np.concatenate([det.energy_id, det.energy_aux, e_st.reshape(-1)])
    lo, hi = np.percentile(allv, 0.5), np.percentile(allv, 99.5)
    if not hi > lo:
        lo, hi = lo - 1.0, hi + 1.0
    bins = np.linspace(lo, hi, 60)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.0, 6.0), sharex=True)
    top.hist(det.energy_id, bins=bins, density=True, alpha=0.6, label="in distribution (test)")
    top.hist(det.energy_aux, bins=bins, density=True, alpha=0.6, label=f"auxiliary OOD ({aux_name}, held out)")
    top.set_title(f"{rec.target}, layer {rec.layers[j]}: detector sanity AUROC {det.sanity['auroc']:.3f}", fontsize=8)
    top.set_ylabel("density")
    top.legend(fontsize=7)
    cmap = plt.get_cmap("viridis")
    n = e_st.shape[0]
    for i in range(n):
        bottom.hist(e_st[i], bins=bins, density=True, histtype="step", color=cmap(i / max(1, n - 1)),
                    label=f"from layer {i + 1} (AUROC {res['auroc'][i, j]:.2f})")
    bottom.hist(det.energy_id, bins=bins, density=True, histtype="step", color="black", linestyle="--",
                label="target (ID)")
    bottom.set_title(f"{rec.plugin} stitching ({rec.scope}) into layer {j + 1}: {rec.source} -> {rec.target}",
                     fontsize=8)
    bottom.set_xlabel("energy  (higher = more OOD)")
    bottom.set_ylabel("density")
    bottom.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def format_report(report: dict[str, Any]) -> str:
    lines = [
        "Energy-based OOD analysis (Section 4): AUROC separating stitched T(f<=i(x)) from target g<=j(x)",
        "(0.5 = in distribution, 1.0 = fully separable; means over diagonal / off-diagonal cells)",
        f"{'matcher':10} {'scope':6} {'diag':>7} {'offdiag':>8} {'matrices':>9}",
    ]
    for m in report["matchers"]:
        for scope in ("intra", "inter", "all"):
            s = report["summary"].get(m, {}).get(scope)
            if s is None:
                continue
            off = f"{s['offdiag']:.3f}" if math.isfinite(s["offdiag"]) else "-"
            lines.append(f"{m:10} {scope:6} {s['diag']:7.3f} {off:>8} {s['matrices']:9d}")
    dets = report["detectors"]
    sanity = [d["sanity_auroc"] for d in dets]
    weak = [d for d in dets if d["sanity_auroc"] < report["min_sanity_auroc"]]
    lines.append(
        f"detectors: {len(dets)} ({sum(not d['reused'] for d in dets)} trained, {sum(d['reused'] for d in dets)} reused);"
        f" sanity AUROC vs held-out {report['auxiliary']['name']}: min {min(sanity):.3f}, "
        f"mean {sum(sanity) / len(sanity):.3f}"
    )
    if weak:
        lines.append(
            f"  warning: {len(weak)} detector(s) below {report['min_sanity_auroc']:.2f}: "
            + ", ".join(f"{d['network']}/{d['layer']} {d['sanity_auroc']:.3f}" for d in weak)
        )
    return "\n".join(lines)


@stitchbench.hookimpl
def register_evaluations(register):
    register(EnergyOOD())
