"""The extension points of stitchbench: one registration hook per plugin kind.

A plugin is a module (or any object) that implements some of the hooks below, marked with
`stitchbench.hookimpl`. Every hook receives a ``register`` callback; the plugin calls it
once per object it provides. The core calls each plugin's implementation separately, so
every registered object is recorded with the plugin (and distribution) it came from, and
errors name that plugin.

Example, a complete third-party plugin in one file::

    import numpy as np
    import stitchbench

    class CosineOfMeans(stitchbench.SimilarityIndex):
        '''Cosine similarity of the mean activation vectors (needs p1 == p2).'''
        name = "cosine_of_means"
        higher_is_more_similar = True

        def compute(self, A, B):
            a, b = np.asarray(A, float).mean(0), np.asarray(B, float).mean(0)
            return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    @stitchbench.hookimpl
    def register_similarity_indices(register):
        register(CosineOfMeans())

Registered names are unique across all kinds; they are what ``--plugin NAME``, configs,
reports and metric keys use. Keep module-level imports light (no torch): ``stitchbench
plugins list`` imports every plugin module, and it must stay fast. An architecture keeps
its network class (a `stitchbench.StitchableNetwork`, which needs torch) in another module
of its package and imports that module inside ``build()``.

docs/plugins.md describes every kind's interface, with a complete, tested example of each
(docs/examples/); ``stitchbench plugins new KIND NAME`` writes a package to start from and
``stitchbench plugins check NAME`` checks a plugin the way a run does.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("stitchbench")


@hookspec
def register_datasets(register: Callable[[stitchbench.DatasetPlugin], None]) -> None:  # noqa: F821
    """Register data sets: call ``register(dataset)`` with a `stitchbench.DatasetPlugin`
    instance for each one.

    A dataset plugin's ``load(params, data_dir, download)`` returns a
    `stitchbench.LoadedDataset` (train / test splits of ``(image, label)`` pairs, the number
    of classes, the image shape ``(C, H, W)`` and an optional batch augmentation);
    ``info(params)`` may return a `stitchbench.DatasetInfo` without loading anything (for
    ``--dry-run``). Auxiliary out-of-distribution sets set ``auxiliary = True``. Called once
    per plugin when plugins are loaded.
    """


@hookspec
def register_architectures(register: Callable[[stitchbench.ArchitecturePlugin], None]) -> None:  # noqa: F821
    """Register network architectures: call ``register(architecture)`` with a
    `stitchbench.ArchitecturePlugin` instance for each one.

    An architecture's ``build(params, num_classes, image_shape)`` returns a
    `stitchbench.StitchableNetwork`: an ``nn.Module`` with ordered ``layer_names``,
    ``front(x, layer)`` = f<=i(x), ``back(h, layer)`` = g>j(h) and
    ``activations(x, layers)`` (every requested layer from one forward pass). Called once
    per plugin when plugins are loaded.
    """


@hookspec
def register_matchers(register: Callable[[stitchbench.Matcher], None]) -> None:  # noqa: F821
    """Register stitching matchers: call ``register(matcher)`` with a `stitchbench.Matcher`
    instance for each one.

    A matcher's ``fit(problem, params)`` receives a `stitchbench.StitchingProblem` (source
    network and layer, target network and layer, the data, the device) and returns a fitted
    `stitchbench.StitchingLayer` (made by ``problem.new_layer()``; its ``fit_info`` is kept
    with the matrix). The core checks it (the two shapes, finite parameters), evaluates the
    stitched network and records the relative accuracy under the matcher's ``measure()``.
    Called once per plugin when plugins are loaded.
    """


@hookspec
def register_similarity_indices(register: Callable[[stitchbench.SimilarityIndex], None]) -> None:  # noqa: F821
    """Register structural similarity indices: call ``register(index)`` with a
    `stitchbench.SimilarityIndex` instance for each one.

    An index has ``compute(A, B, params=None) -> float`` for two activation matrices whose
    rows are the same examples (A: (n, ...), B: (n, ...), numpy or torch; ``params`` its
    validated `Params`, None for the defaults), a bool ``higher_is_more_similar`` and, when
    ``compute(A, B) != compute(B, A)``, ``symmetric = False``. It may override
    ``matrix(sources, targets, context)`` to fill a whole matrix from per-layer statistics
    computed once (``context.params`` holds its params). Every value must be finite: raise
    an error saying why instead of returning NaN. Called once per plugin when plugins are
    loaded.
    """


@hookspec
def register_evaluations(register: Callable[[stitchbench.Evaluation], None]) -> None:  # noqa: F821
    """Register evaluations: call ``register(evaluation)`` with a `stitchbench.Evaluation`
    instance for each one.

    An evaluation's ``run(context, params)`` receives a `stitchbench.RunContext` (the
    run's networks, similarity matrices and data, through the core) and returns a
    `stitchbench.EvaluationResult` (metrics, tables, figures and an optional section of
    ``stitchbench report``). Called once per plugin when plugins are loaded.
    """
