"""One run of ``energy_ood``: a detector per target (network, layer), reused by key or
trained as a task of the run's executor; then, for every cell of every stitching matrix,
how well the detector's energies separate the target activations g<=j(x) (in
distribution, the positive class) from the stitched activations T(f<=i(x)) of the same
test images."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import stitchbench
from stitchbench import EvaluationResult, MatrixRecord, RunContext

from .detectors import detector_code_version, new_detector
from .figures import fig1c, fig2, fig_accuracy_vs_auroc
from .metrics import (
    HIGH_ACCURACY_KEYS,
    detector_energies,
    diag_offdiag_means,
    energy,
    high_accuracy_stats,
    ood_scores,
    pooled_means,
)
from .params import EnergyOODParams
from .report import build_report, format_report, matrix_stem, ordered_measures
from .training import ActivationSource, DetectorTask, LayerBatches, fits_in_memory, train_detector_task

log = logging.getLogger(__name__)

#: Where a detector's weights are in its job's run (the registered model version's folder).
DETECTOR_DIR = "detector"
DETECTOR_ARTIFACT = f"{DETECTOR_DIR}/state_dict.pt"


@dataclass
class Detector:
    """A trained detector of one (network, layer) and what it said."""

    network: str
    layer: str
    model_name: str
    key: str
    module: torch.nn.Module
    version: str
    run_id: str
    reused: bool
    energy_id: np.ndarray | None = None  # (N,) energies of the target's test activations
    energy_aux: np.ndarray | None = None  # (M,) energies of held-out auxiliary activations
    sanity: dict[str, float] = field(default_factory=dict)
    id_accuracy: float = float("nan")


@dataclass
class MatrixResult:
    """The OOD scores of every cell of one stitching matrix (each (n, n), source layer i,
    target layer j) and the detectors' energies of the stitched activations (n, n, N)."""

    record: MatrixRecord
    auroc: np.ndarray
    aupr: np.ndarray
    fpr95: np.ndarray
    energies: np.ndarray
    diag: float
    offdiag: float

    @property
    def stem(self) -> str:
        return matrix_stem(self.record)


class Analysis:
    """One run of the evaluation (kept apart so the plugin object stays stateless)."""

    def __init__(self, context: RunContext, p: EnergyOODParams, records: list[MatrixRecord]):
        self.ctx = context
        self.p = p
        self.records = records
        self.device = context.device
        self.shapes = context.layer_shapes()
        self.detectors: dict[tuple[str, str], Detector] = {}
        self.seed = int(context.config.seed)
        self._aux: Any = None
        self._aux_resolved: dict[str, Any] | None = None
        self._sources: dict[str, ActivationSource] = {}
        self._keys: dict[tuple[str, str], tuple[str, str, dict[str, Any]]] = {}
        self._code: dict[int, str] = {}  # detector code version by activation rank (conv 3, tokens 2)

    # -- the auxiliary set ----------------------------------------------------------------
    def aux_params(self) -> dict[str, Any]:
        """The auxiliary set's name and resolved params (part of every detector's key)."""
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
        """The auxiliary set (a `LoadedDataset`), loaded on first use."""
        if self._aux is None:
            self.aux_params()
            cfg = self.ctx.config
            data_dir = Path(cfg.data_dir).expanduser() if cfg.data_dir else None
            if getattr(self._aux_obj, "needs_data_dir", False) and data_dir is None:
                raise stitchbench.UsageError(
                    f"the auxiliary OOD set {self._aux_obj.name!r} is read from disk: pass --data-dir DIR"
                )
            aux = self._aux_obj.load(self._aux_validated, data_dir, bool(cfg.download))
            if tuple(aux.image_shape) != tuple(self.ctx.data.image_shape):
                raise stitchbench.UsageError(
                    f"the auxiliary OOD set {self._aux_obj.name!r} has images of shape {tuple(aux.image_shape)}, "
                    f"the in-distribution set {self.ctx.data.name!r} {tuple(self.ctx.data.image_shape)}; they must match"
                )
            self._aux = aux
        return self._aux

    # -- activations -----------------------------------------------------------------------
    def sources(self, net_name: str) -> ActivationSource:
        found = self._sources.get(net_name)
        if found is None:
            found = self._sources[net_name] = ActivationSource(
                self.p, self.shapes, self.device, self.ctx.networks[net_name], self.ctx.data, self.aux,
                lambda split, n: self.ctx.activations(net_name, split, n),
            )
        return found

    def layer_batches(self, net_name: str, layer: str, which: str) -> LayerBatches:
        return self.sources(net_name).batches(layer, which)

    # -- detectors ---------------------------------------------------------------------------
    def settings(self, layer: str) -> dict[str, Any]:
        """Everything that determines a detector besides the target network (for its key):
        the layer and its shape, the detector's settings and code, its training, the
        auxiliary set and the seed."""
        shape = tuple(self.shapes[layer])
        arch = self.p.resnet if len(shape) == 3 else self.p.vit
        return {
            "layer": layer,
            "shape": list(shape),
            "detector": {"kind": "resnet" if len(shape) == 3 else "vit", **arch.model_dump(mode="json")},
            "code": self.detector_code(shape),
            "pretrain": self.p.pretrain.model_dump(mode="json"),
            "finetune": self.p.finetune.model_dump(mode="json"),
            "auxiliary": self.aux_params(),
            "seed": self.seed,
        }

    def detector_code(self, shape: tuple[int, ...]) -> str:
        """`detector_code_version`, hashed once per kind of activation (conv or tokens)."""
        if len(shape) not in self._code:
            self._code[len(shape)] = detector_code_version(shape)
        return self._code[len(shape)]

    def build(self, layer: str) -> torch.nn.Module:
        return new_detector(self.p, tuple(self.shapes[layer]), self.ctx.data.num_classes, self.seed, self.device)

    def detector_key(self, net_name: str, layer: str) -> tuple[str, str, dict[str, Any]]:
        """(registered model name, job key, the settings the key hashes), made once."""
        if (net_name, layer) not in self._keys:
            settings = self.settings(layer)
            key = stitchbench.job_key("energy_detector", network=self.ctx.network_key(net_name), **settings)
            self._keys[(net_name, layer)] = (f"{net_name}-{layer}-energy-detector", key, settings)
        return self._keys[(net_name, layer)]

    def reuse_detector(self, net_name: str, layer: str) -> Detector | None:
        """The detector of (network, layer) from its finished job, scored; None when there
        is none (or its weights cannot be read: it is trained again)."""
        model_name, key, _ = self.detector_key(net_name, layer)
        found = self.ctx.find_job(key)
        if found is None:
            return None
        det = self.build(layer)
        try:
            det.load_state_dict(found.load_state_dict(DETECTOR_ARTIFACT))
        except Exception as e:  # noqa: BLE001 - damaged weights are never trusted
            log.warning("OOD detector %s (run %s): its stored weights cannot be loaded (%s); training it again",
                        model_name, found.run_id, e)
            return None
        det.eval()
        log.info("reusing OOD detector %s version %s (key %s)", model_name, found.model_version, key)
        d = Detector(net_name, layer, model_name, key, det, str(found.model_version), found.run_id, reused=True)
        self.score_detector(d)
        return d

    def submit_detector(self, net_name: str, layer: str) -> Any:
        """A task of the run's executor that trains the detector of (network, layer)."""
        task = DetectorTask(
            network=net_name, layer=layer, params=self.p.model_dump(mode="json"), seed=self.seed,
            device=str(self.device), num_classes=int(self.ctx.data.num_classes),
            shapes={k: list(v) for k, v in self.shapes.items()},
        )
        aux = self.ctx.share(stitchbench.job_key("energy_ood_aux", **self.aux_params()), self.aux())
        return self.ctx.submit(train_detector_task, task, self.ctx.network_input(net_name), self.ctx.data_input(), aux,
                               label=f"OOD detector {net_name}-{layer}")

    def score_detector(self, d: Detector) -> None:
        """ID test energies, held-out auxiliary energies and the sanity scores of ``d``."""
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
        """The detector a task trained, as a job of its own: params, training curves,
        sanity scores and weights in its run, registered in the model registry."""
        model_name, key, settings = self.detector_key(net_name, layer)
        det = self.build(layer)
        det.load_state_dict(trained["state"])
        det.eval()
        with self.ctx.job_run(f"ood detector {model_name}", key=key, kind="ood_detector") as job:
            job.log_params(flat_dict(settings) | {"network": net_name})
            d = Detector(net_name, layer, model_name, key, det, "", job.run_id, reused=False)
            self.score_detector(d)
            job.log_history(trained["pretrain"])
            job.log_history(trained["finetune"])
            job.log_metrics({**{f"sanity_{k}": float(d.sanity[k]) for k in ("auroc", "aupr", "fpr95")},
                             "id_test_accuracy": d.id_accuracy})
            job.log_state_dict(det.state_dict(), DETECTOR_ARTIFACT)
            d.version = job.register_weights(model_name, DETECTOR_DIR, {
                "network": net_name,
                "layer": layer,
                "sanity_auroc": f"{d.sanity['auroc']:.6f}",
                "id_test_accuracy": f"{d.id_accuracy:.6f}",
            })
        log.info("trained OOD detector %s (sanity AUROC %.4f, ID accuracy %.3f; registered version %s)",
                 model_name, d.sanity["auroc"], d.id_accuracy, d.version)
        return d

    def obtain_detectors(self) -> None:
        """Every target (network, layer) of the records gets its detector: reused ones are
        loaded here; the others are trained as tasks of the run's executor (in parallel on
        Ray) and logged here as they finish."""
        wanted: list[tuple[str, str]] = list(dict.fromkeys(
            (rec.target, layer) for rec in self.records for layer in rec.layers))
        with stitchbench.progress_bar(total=len(wanted), desc="energy_ood detectors", unit="detector") as bar:
            training: dict[Any, tuple[str, str]] = {}
            for net_name, layer in wanted:
                d = self.reuse_detector(net_name, layer)
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

    # -- stitched activations -----------------------------------------------------------------
    def stitched_energies(self, rec: MatrixRecord) -> np.ndarray:
        """Energies (n, n, N) of detector (target, layer j) on T_ij(f<=i(x)) for every cell."""
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
        bs = self.p.eval_batch_size
        n_test = len(self.ctx.data.test)
        n = n_test if self.p.n_examples is None else min(n_test, self.p.n_examples)
        if fits_in_memory(self.shapes, n, self.p.memory_limit_mb):
            acts = self.ctx.activations(name, "test", self.p.n_examples)
            for start in range(0, n, bs):
                yield {layer: acts[layer][start : start + bs] for layer in layers}
            return
        for x, _ in stitchbench.iterate_batches(self.ctx.data.test, bs, limit=n):
            yield {k: v.float() for k, v in net.activations(x.to(self.device), layers).items()}

    def score_matrix(self, rec: MatrixRecord) -> MatrixResult:
        e_st = self.stitched_energies(rec)
        n = len(rec.layers)
        cells = [[ood_scores(self.detectors[(rec.target, rec.layers[j])].energy_id, e_st[i, j])
                  for j in range(n)] for i in range(n)]
        auroc = np.array([[c.auroc for c in row] for row in cells])
        diag, offdiag = diag_offdiag_means(auroc)
        return MatrixResult(rec, auroc, np.array([[c.aupr for c in row] for row in cells]),
                            np.array([[c.fpr95 for c in row] for row in cells]), e_st, diag, offdiag)

    # -- the whole analysis ------------------------------------------------------------------------
    def run(self) -> EvaluationResult:
        t0 = time.perf_counter()
        self.obtain_detectors()
        t_detectors = time.perf_counter() - t0
        results = []
        with stitchbench.progress_bar(total=len(self.records), desc="energy_ood matrices", unit="matrix") as bar:
            for rec in self.records:
                results.append(self.score_matrix(rec))
                bar.update(1)
        self.log_outputs(results)

        measures = ordered_measures({r.record.plugin for r in results})
        summary, metrics, run_metrics = summarise(results, measures)
        high = high_accuracy(results, measures, self.p.high_accuracy_threshold, self.p.ood_auroc)
        metrics.update(high_accuracy_metrics(high))
        sanity = [d.sanity["auroc"] for d in self.detectors.values()]
        run_metrics["sanity_auroc.min"] = min(sanity)
        run_metrics["sanity_auroc.mean"] = float(np.mean(sanity))
        run_metrics["detectors.trained"] = sum(not d.reused for d in self.detectors.values())
        run_metrics["detectors.reused"] = sum(d.reused for d in self.detectors.values())
        run_metrics["seconds.detectors"] = t_detectors

        figures = self.figures(results, measures)
        figures["ood_accuracy_vs_auroc"] = fig_accuracy_vs_auroc(
            results, measures, high, self.p.high_accuracy_threshold, self.p.ood_auroc)
        report = build_report(results, summary, measures, self.aux_params(), list(self.detectors.values()),
                              self.p.min_sanity_auroc, high, self.p.ood_auroc)
        run_metrics["seconds"] = time.perf_counter() - t0
        self.ctx.log_metrics(run_metrics)
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

    def log_outputs(self, results: list[MatrixResult]) -> None:
        """Per matrix the AUROC, AUPR and FPR@95 matrices; every energy (Fig. 1c's data) in
        ``ood/energies.npz``."""
        energies: dict[str, np.ndarray] = {}
        for res in results:
            rec = res.record
            for what in ("auroc", "aupr", "fpr95"):
                self.ctx.log_array(getattr(res, what), f"matrices/{what}_{res.stem}", header=rec.layers,
                                   index=rec.layers)
            energies[f"stitched.{res.stem}"] = res.energies
        for (net_name, layer), d in self.detectors.items():
            energies[f"id.{net_name}.{layer}"] = d.energy_id
            energies[f"aux.{net_name}.{layer}"] = d.energy_aux
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "energies.npz"
            np.savez_compressed(path, **energies)
            self.ctx.log_file(path, "ood")

    def figures(self, results: list[MatrixResult], measures: list[str]) -> dict[str, Any]:
        figures: dict[str, Any] = {"ood_fig2": fig2(results, measures)}
        fig_layer = self.figure_layer(results[0].record.layers)
        for m in measures:
            res = self.figure_record(results, m)
            if res is not None:
                d = self.detectors[(res.record.target, res.record.layers[fig_layer])]
                figures[f"ood_energy_{m}"] = fig1c(res, fig_layer, d, self.aux_params()["name"])
        if self.p.heatmaps:
            for res in results:
                rec = res.record
                title = f"OOD AUROC ({rec.plugin}, {rec.scope}): {rec.source} -> {rec.target}"
                figures[f"heatmaps/auroc_{res.stem}"] = stitchbench.heatmap(res.auroc, rec.layers, title=title)
        return figures

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

    def figure_record(self, results: list[MatrixResult], measure: str) -> MatrixResult | None:
        mine = [r for r in results if r.record.plugin == measure]
        scoped = [r for r in mine if r.record.scope == self.p.figure_scope]
        return (scoped or mine or [None])[0]


def summarise(results: list[MatrixResult], measures: list[str]
              ) -> tuple[dict[str, dict[str, Any]], dict[str, float], dict[str, float]]:
    """Per matcher and scope (intra, inter, all): the mean AUROC of the diagonal and of the
    off-diagonal cells. Returns (summary, parent-run metrics ``ood.auroc.<matcher>.<part>``,
    the evaluation run's per-scope metrics)."""
    summary: dict[str, dict[str, Any]] = {}
    metrics: dict[str, float] = {}
    run_metrics: dict[str, float] = {}
    for m in measures:
        mine = [r for r in results if r.record.plugin == m]
        summary[m] = {}
        for scope in ("intra", "inter", "all"):
            sel = mine if scope == "all" else [r for r in mine if r.record.scope == scope]
            if not sel:
                continue
            diag, off = pooled_means([r.auroc for r in sel])
            summary[m][scope] = {"diag": diag, "offdiag": off, "matrices": len(sel)}
            prefix = f"ood.auroc.{m}" if scope == "all" else f"ood.auroc.{m}.{scope}"
            for part, v in (("diag", diag), ("offdiag", off)):
                if math.isfinite(v):
                    (metrics if scope == "all" else run_metrics)[f"{prefix}.{part}"] = v
    return summary, metrics, run_metrics


def high_accuracy(results: list[MatrixResult], measures: list[str], threshold: float, ood_auroc: float
                  ) -> dict[str, dict[str, dict[str, Any]]]:
    """The paper's conditional statistic (`high_accuracy_stats`) per matcher and scope
    (intra, inter, and all: intra and inter pooled), over the off-diagonal cells of that
    matcher's matrices of the scope: ``{matcher: {scope: {threshold, cells, mean_auroc,
    fraction_ood, correlation}}}``, None where undefined."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for m in measures:
        mine = [r for r in results if r.record.plugin == m]
        out[m] = {}
        for scope in ("intra", "inter", "all"):
            sel = mine if scope == "all" else [r for r in mine if r.record.scope == scope]
            if sel:
                out[m][scope] = high_accuracy_stats([r.record.values for r in sel], [r.auroc for r in sel],
                                                    threshold, ood_auroc)
    return out


def high_accuracy_metrics(high: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float]:
    """Parent-run metrics ``ood.high_accuracy.<matcher>.<scope>.<cells|mean_auroc|
    fraction_ood|correlation>`` (NaN where undefined: the core leaves those out)."""
    return {
        f"ood.high_accuracy.{m}.{scope}.{k}": float("nan") if st[k] is None else float(st[k])
        for m, scopes in high.items() for scope, st in scopes.items() for k in HIGH_ACCURACY_KEYS
        if k != "threshold"
    }


def flat_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for run params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_dict(v, key + "."))
        else:
            out[key] = v
    return out
