"""``stitchbench plugins new KIND NAME [--dir DIR]``: write a plugin package to start from.

The package is a complete, working plugin of the kind (not a stub): a pyproject whose
entry point registers it, the plugin module with a small real implementation, a test that
runs `stitchbench.testing.check_plugin` and checks what the plugin computes, and a README.
``cd DIR && pip install -e . && pytest`` passes as written; the user then edits the
module. Light at import time (no torch, no MLflow), as the rest of the command line.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

from ..errors import StitchbenchError, UsageError

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

#: Per kind: the suffix of the class name, the hook, a one-line summary for the README.
_KIND = {
    "dataset": ("Dataset", "register_datasets", "synthetic stripe images, the class their orientation"),
    "architecture": ("Architecture", "register_architectures", "a small CNN with four stitchable conv blocks"),
    "matcher": ("Matcher", "register_matchers", "a least-squares affine stitching map"),
    "similarity_index": ("Index", "register_similarity_indices", "linear CKA"),
    "evaluation": ("Evaluation", "register_evaluations", "the mean diagonal of every similarity matrix"),
}


def new_plugin(args: argparse.Namespace) -> int:
    """Write the package for ``args.kind`` / ``args.name`` into ``args.dir`` (default
    ``./stitchbench-<name>``); print what was written and what to do next. Exit status 0;
    a bad name or a non-empty target directory is a `UsageError` (exit status 2)."""
    kind, name = args.kind, args.name
    if kind not in _KIND:
        raise UsageError(f"unknown plugin kind {kind!r}; the kinds are {', '.join(_KIND)}")
    _check_name(name)
    dist = "stitchbench-" + name.replace("_", "-")
    target = Path(args.dir).expanduser() if getattr(args, "dir", None) else Path.cwd() / dist
    if not target.is_absolute():
        target = Path.cwd() / target
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} exists and is not a directory; choose another with --dir")
    if target.is_dir() and any(target.iterdir()):
        raise UsageError(f"{target} exists and is not empty; choose another directory with --dir "
                         "(or remove it)")
    files = render(kind, name)
    for rel, text in files.items():
        path = target / rel
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8", newline="\n")
        except OSError as e:
            raise UsageError(f"cannot write {path}: {e.strerror or e}") from e
    print(f"wrote the {kind} plugin {name!r} (distribution {dist}) in {target}:")
    for rel in files:
        print(f"  {rel}")
    print("\nnext steps:")
    print(f"  cd {target} && pip install -e . && pytest")
    print(f"  stitchbench plugins list --kind {kind}    # lists {name}")
    print(f"then edit stitchbench_{name}/__init__.py (the class {class_name(kind, name)}).")
    return 0


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise UsageError(f"invalid plugin name {name!r}: use letters, digits and _, starting with a "
                         "letter (it names the package stitchbench_<name> too)")
    module = f"stitchbench_{name}"
    if importlib.util.find_spec(module) is not None:
        raise UsageError(f"a module called {module} is already importable here; choose another name")
    try:
        from ..plugin.manager import load_plugins

        known = load_plugins().infos.get(name)
    except StitchbenchError:  # a broken plugin set: the clash check is a courtesy, not a must
        known = None
    if known is not None:
        raise UsageError(f"a plugin called {name!r} already exists ({known.kind}, {known.origin}); "
                         "plugin names are unique across kinds: choose another")


def class_name(kind: str, name: str) -> str:
    """``my_index`` (similarity_index) -> ``MyIndex``; the kind's suffix is added unless
    the name already ends with it (``blobs`` (dataset) -> ``BlobsDataset``)."""
    camel = "".join(part[:1].upper() + part[1:] for part in name.split("_") if part)
    suffix = _KIND[kind][0]
    return camel if camel.endswith(suffix) else camel + suffix


def render(kind: str, name: str) -> dict[str, str]:
    """The package's files (relative path -> text) for a ``kind`` plugin called ``name``."""
    pkg = f"stitchbench_{name}"
    subs = {
        "<<name>>": name,
        "<<pkg>>": pkg,
        "<<dist>>": "stitchbench-" + name.replace("_", "-"),
        "<<Class>>": class_name(kind, name),
        "<<Net>>": class_name(kind, name).removesuffix("Architecture") + "Net",
        "<<kind>>": kind,
        "<<hook>>": _KIND[kind][1],
        "<<summary>>": _KIND[kind][2],
    }
    files = {
        "pyproject.toml": _PYPROJECT,
        "README.md": _README,
        f"{pkg}/__init__.py": _MODULES[kind],
        f"tests/test_{name}.py": _TESTS[kind],
    }
    if kind == "architecture":
        files[f"{pkg}/_network.py"] = _NETWORK
    return {rel: _fill(text, subs) for rel, text in files.items()}


def _fill(text: str, subs: dict[str, str]) -> str:
    for key, value in subs.items():
        text = text.replace(key, value)
    return text.lstrip("\n")


# -- the common files --------------------------------------------------------------------

_PYPROJECT = '''
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "<<dist>>"
version = "0.1.0"
description = "stitchbench <<kind>> plugin <<name>>: <<summary>>"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["stitchbench"]

[project.optional-dependencies]
test = ["pytest>=8"]

# stitchbench finds plugins through this entry-point group: the key is the plugin's name,
# the value the module whose @stitchbench.hookimpl function registers it.
[project.entry-points.stitchbench]
<<name>> = "<<pkg>>"

[tool.setuptools]
packages = ["<<pkg>>"]

[tool.pytest.ini_options]
testpaths = ["tests"]

# stitchbench's own lint settings (`ruff check .`).
[tool.ruff]
line-length = 110
target-version = "py311"
'''

_README = '''
# <<dist>>

The stitchbench <<kind>> plugin `<<name>>`: <<summary>>. A working starting point:
edit it into your own <<kind>>.

## Install and test

```sh
pip install -e .                          # registers the entry point (pyproject.toml)
stitchbench plugins list --kind <<kind>>  # lists <<name>>
pytest                                    # conformance checks, and what it computes
```

`stitchbench plugins check <<name>>` runs the same conformance checks as the test.

## Where to edit

- `<<pkg>>/__init__.py`: the class `<<Class>>` (its `Params` are what a run config
  passes it) and the `<<hook>>` hook that registers it. Keep the module's
  imports light (no torch at import time): `stitchbench plugins list` imports it.
- `tests/test_<<name>>.py`: `check_plugin` checks the plugin the way a run does; the
  other tests check what it computes: change them with the code.
- `pyproject.toml`: the distribution's name and version. The key under
  `[project.entry-points.stitchbench]` is the plugin's name: keep it equal to the
  class's `name`.

The plugin API (`stitchbench.DatasetPlugin`, `StitchableNetwork`, `StitchingProblem`,
`SimilarityIndex`, `RunContext`, ...) is described in stitchbench's docs/plugins.md.
'''

# -- dataset ------------------------------------------------------------------------------

_DATASET = '''
"""The ``<<name>>`` dataset plugin for stitchbench.

Synthetic images of sinusoidal stripes whose orientation is the class, with a random
phase, a random colour per channel and Gaussian pixel noise: learnable by a small CNN in a
few epochs, generated offline in milliseconds. Replace `make_split` (or `load`) with the
code that reads your data; keep ``info`` in agreement with what ``load`` returns.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import stitchbench
from pydantic import Field

if TYPE_CHECKING:
    import torch

#: (C, H, W) of one image.
IMAGE_SHAPE = (3, 32, 32)


def make_split(
    n: int, num_classes: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (n, C, H, W) float32 and their labels (n,) int64, from ``seed``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    c, h, w = IMAGE_SHAPE
    labels = torch.randint(0, num_classes, (n,), generator=g)
    angle = labels.double() * math.pi / num_classes
    phase = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
        indexing="ij",
    )
    along = xs * torch.cos(angle)[:, None, None] + ys * torch.sin(angle)[:, None, None]
    stripes = torch.sin(2 * math.pi * along / 6.0 + phase[:, None, None])  # (n, H, W)
    colour = 0.5 + torch.rand(n, c, 1, 1, generator=g, dtype=torch.float64)
    images = colour * stripes[:, None] + noise * torch.randn(
        n, c, h, w, generator=g, dtype=torch.float64
    )
    return images.float(), labels


class <<Class>>(stitchbench.DatasetPlugin):
    """Synthetic stripe images, class = stripe orientation (3x32x32, generated offline)."""

    name = "<<name>>"

    class Params(stitchbench.Params):
        n_train: int = Field(2000, ge=1, description="number of training images")
        n_test: int = Field(500, ge=1, description="number of test images")
        num_classes: int = Field(4, ge=2, le=12, description="orientations (classes)")
        noise: float = Field(0.5, ge=0, description="std of the Gaussian pixel noise")
        seed: int = Field(0, ge=0, description="train uses 2*seed, test 2*seed+1")

    #: Small sizes for the conformance checks (`stitchbench plugins check`).
    check_params: ClassVar[dict[str, Any]] = {"n_train": 64, "n_test": 32}

    def _params(self, params: Any) -> Any:
        if isinstance(params, self.Params):
            return params
        return self.Params.model_validate(params or {})

    def info(self, params: Any) -> stitchbench.DatasetInfo:
        """Classes, image shape and split sizes, known without generating anything."""
        p = self._params(params)
        return stitchbench.DatasetInfo(
            num_classes=p.num_classes, image_shape=IMAGE_SHAPE,
            n_train=p.n_train, n_test=p.n_test,
        )

    def load(
        self, params: Any, data_dir: Path | None = None, download: bool = False
    ) -> stitchbench.LoadedDataset:
        """Generate both splits (``data_dir`` and ``download`` are not used)."""
        p = self._params(params)
        train = make_split(p.n_train, p.num_classes, p.noise, 2 * p.seed)
        test = make_split(p.n_test, p.num_classes, p.noise, 2 * p.seed + 1)
        return stitchbench.LoadedDataset(
            name=self.name,
            num_classes=p.num_classes,
            image_shape=IMAGE_SHAPE,
            train=stitchbench.TensorSplit(*train),
            test=stitchbench.TensorSplit(*test),
            augment=None,
            description=self.describe(),
        )


@stitchbench.hookimpl
def register_datasets(register):
    register(<<Class>>())
'''

_DATASET_TEST = '''
"""Tests of the ``<<name>>`` dataset plugin."""

import stitchbench
from stitchbench.testing import check_plugin

from <<pkg>> import <<Class>>


def test_passes_the_conformance_checks():
    check_plugin(<<Class>>())


def test_is_registered_through_its_entry_point():
    plugin = stitchbench.get_plugin("<<name>>")
    assert isinstance(plugin, <<Class>>)


def test_load_gives_the_sizes_and_shapes_info_promises():
    ds = <<Class>>()
    params = ds.Params(n_train=40, n_test=20, num_classes=3)
    data = ds.load(params)
    info = ds.info(params)
    assert (len(data.train), len(data.test)) == (info.n_train, info.n_test) == (40, 20)
    assert data.num_classes == info.num_classes == 3
    x, _ = data.train[0]
    assert tuple(x.shape) == tuple(data.image_shape) == tuple(info.image_shape)
    assert 0 <= int(data.train.labels.min()) <= int(data.train.labels.max()) < 3
    again = ds.load(params)  # the same seed gives the same images
    assert bool((again.test.images == data.test.images).all())
'''

# -- architecture -----------------------------------------------------------------------

_ARCHITECTURE = '''
"""The ``<<name>>`` architecture plugin for stitchbench.

A small CNN (see `_network.py`): a 3x3 conv stem, four conv blocks (the stitchable
layers; the second and fourth halve the resolution and double the channels), global
average pooling and a linear head. This module stays light (no torch at import time:
``stitchbench plugins list`` imports it); the network's module is imported in ``build``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import stitchbench
from pydantic import Field

if TYPE_CHECKING:
    from ._network import <<Net>>


class <<Class>>(stitchbench.ArchitecturePlugin):
    """A small CNN: conv stem, four conv-BN-ReLU blocks (stitchable), pooled linear head."""

    name = "<<name>>"

    class Params(stitchbench.Params):
        width: int = Field(16, ge=1, description="channels of the first block")

    def _params(self, params: Any) -> Any:
        if isinstance(params, self.Params):
            return params
        return self.Params.model_validate(params or {})

    def build(
        self, params: Any, num_classes: int, image_shape: tuple[int, int, int]
    ) -> <<Net>>:
        from ._network import <<Net>>

        p = self._params(params)
        return <<Net>>(num_classes, in_channels=image_shape[0], width=p.width)

    def tag(self, params: Any) -> str:
        """A short name for these settings, used in model names (e.g. ``<<name>>-w16``)."""
        return f"{self.name}-w{self._params(params).width}"


@stitchbench.hookimpl
def register_architectures(register):
    register(<<Class>>())
'''

_NETWORK = '''
"""The network of the ``<<name>>`` architecture (imports torch: imported in ``build``)."""

from __future__ import annotations

import stitchbench
from torch import nn


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class <<Net>>(stitchbench.StitchableNetwork):
    """stem -> blocks (stitchable: ``block1`` .. ``block4``) -> head.

    With ``width`` w and an H x W input the layers are w x H x W, 2w x H/2 x W/2,
    2w x H/2 x W/2 and 4w x H/4 x W/4. `stitchbench.StitchableNetwork` provides
    ``forward``, ``front``, ``back`` and ``activations`` from ``stem``, ``blocks`` (an
    ``nn.ModuleList``: a plain list would hide the parameters), ``head`` and
    ``layer_names`` (one per block).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16):
        super().__init__()
        w = width
        self.stem = conv_bn_relu(in_channels, w)
        self.blocks = nn.ModuleList([
            conv_bn_relu(w, w),
            conv_bn_relu(w, 2 * w, stride=2),
            conv_bn_relu(2 * w, 2 * w),
            conv_bn_relu(2 * w, 4 * w, stride=2),
        ])
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes)
        )
        self.layer_names = ["block1", "block2", "block3", "block4"]
'''

_ARCHITECTURE_TEST = '''
"""Tests of the ``<<name>>`` architecture plugin."""

import stitchbench
import torch
from stitchbench.testing import check_plugin

from <<pkg>> import <<Class>>


def test_passes_the_conformance_checks():
    check_plugin(<<Class>>())


def test_is_registered_through_its_entry_point():
    plugin = stitchbench.get_plugin("<<name>>")
    assert isinstance(plugin, <<Class>>)


def test_forward_and_layer_shapes():
    arch = <<Class>>()
    params = arch.Params(width=4)
    net = arch.build(params, num_classes=10, image_shape=(3, 32, 32)).eval()
    with torch.no_grad():
        logits = net(torch.randn(5, 3, 32, 32))
    assert tuple(logits.shape) == (5, 10)
    assert net.layer_shapes((3, 32, 32)) == {
        "block1": (4, 32, 32), "block2": (8, 16, 16),
        "block3": (8, 16, 16), "block4": (16, 8, 8),
    }
    assert arch.tag(params) == "<<name>>-w4"
'''

# -- matcher ------------------------------------------------------------------------------

_MATCHER = '''
"""The ``<<name>>`` matcher plugin for stitchbench.

Least squares: the affine stitching map T (a 1x1 convolution after resizing the source to
the target's spatial size, or a per-token linear map) that best reproduces the target
layer's activations from the source layer's over K training images, every spatial
position (or token) one equation. Torch is imported inside the methods: ``stitchbench
plugins list`` imports this module.
"""

from __future__ import annotations

from typing import Any

import stitchbench
from pydantic import Field


class <<Class>>(stitchbench.Matcher):
    """Least-squares affine stitching map from source to target activations (K images)."""

    name = "<<name>>"

    class Params(stitchbench.Params):
        k: int = Field(100, ge=1, description="training images the map is fitted on")

    def _params(self, params: Any) -> Any:
        if isinstance(params, self.Params):
            return params
        return self.Params.model_validate(params or {})

    def fit(
        self, problem: stitchbench.StitchingProblem, params: Any = None
    ) -> stitchbench.StitchingLayer:
        import torch

        p = self._params(params)
        layer = problem.new_layer()  # the affine layer for the two activation shapes
        k = min(p.k, len(problem.data.train))
        with torch.no_grad():
            # The same k training images (the run's fixed order) through both networks.
            src = problem.activations(problem.source, problem.source_layer, "train_sample", k)
            tgt = problem.activations(problem.target, problem.target_layer, "train_sample", k)
            # prepare(): the input of the affine map (the source resized to the target's
            # spatial size); to_rows(): one row per image and position (or token).
            X = stitchbench.to_rows(layer.prepare(src)).double().cpu()
            Y = stitchbench.to_rows(tgt).double().cpu()
            X1 = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], dim=1)
            solution = torch.linalg.lstsq(X1, Y, driver="gelsd").solution  # (in+1, out)
            weight, bias = solution[:-1].T, solution[-1]
            spread = float((Y - Y.mean(0)).pow(2).sum())
            residual = float(((X1 @ solution - Y) ** 2).sum()) / max(spread, 1e-30)
        layer.set_affine(weight.float(), bias.float())
        # JSON-able facts about the fit, kept with the matrix (matrix/fit_info.json).
        layer.fit_info = {"k": k, "rows": len(X), "relative_residual": residual}
        return layer

    def estimate_cost(self, params: Any, info: stitchbench.DatasetInfo) -> stitchbench.Cost:
        """For ``--dry-run``: forward passes over the k images and over the test split."""
        k = min(self._params(params).k, info.n_train)
        return stitchbench.Cost(forward_images=k + info.n_test)


@stitchbench.hookimpl
def register_matchers(register):
    register(<<Class>>())
'''

_MATCHER_TEST = '''
"""Tests of the ``<<name>>`` matcher plugin."""

import stitchbench
import torch
from stitchbench.testing import check_plugin, fake_problem

from <<pkg>> import <<Class>>


def test_passes_the_conformance_checks():
    check_plugin(<<Class>>())


def test_is_registered_through_its_entry_point():
    plugin = stitchbench.get_plugin("<<name>>")
    assert isinstance(plugin, <<Class>>)


def test_fitted_map_predicts_the_target_better_than_zero():
    # b0 (4 x 8 x 8) of one tiny network -> b2 (8 x 4 x 4) of another
    problem = fake_problem("b0", "b2")
    layer = <<Class>>().fit(problem, <<Class>>.Params(k=100)).eval()
    src = problem.activations(problem.source, problem.source_layer, "test")
    tgt = problem.activations(problem.target, problem.target_layer, "test")
    with torch.no_grad():
        error = float(((layer(src) - tgt) ** 2).mean())
    assert error < 0.5 * float((tgt**2).mean())  # the zero map's error
    assert layer.fit_info["k"] == 100
'''

# -- similarity index ------------------------------------------------------------------------

_INDEX = '''
"""The ``<<name>>`` similarity index plugin for stitchbench.

Linear CKA (Kornblith et al., 2019): for column-centred X (n, p1) and Y (n, p2),
||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), in [0, 1], 1 for identical representations,
invariant to orthogonal transforms and isotropic scaling. Conv maps (n, C, H, W) become
rows by flattening or by averaging over positions (``pooling``). Takes numpy arrays or
torch tensors; numpy is imported inside ``compute``.
"""

from __future__ import annotations

from typing import Any, Literal

import stitchbench
from pydantic import Field


class <<Class>>(stitchbench.SimilarityIndex):
    """Linear CKA of two representations (1 = identical up to rotation and scale)."""

    name = "<<name>>"
    higher_is_more_similar = True

    class Params(stitchbench.Params):
        pooling: Literal["flatten", "mean"] = Field(
            "flatten",
            description="how (n, C, H, W) maps become rows: flatten C*H*W, or mean over H, W",
        )

    def _params(self, params: Any) -> Any:
        if isinstance(params, self.Params):
            return params
        return self.Params.model_validate(params or {})

    def compute(self, A: Any, B: Any, params: Any = None) -> float:
        import numpy as np

        p = self._params(params)
        X, Y = _rows(A, p.pooling), _rows(B, p.pooling)
        if len(X) != len(Y):
            raise ValueError(f"A has {len(X)} rows but B has {len(Y)}: rows are examples")
        X = X - X.mean(axis=0)
        Y = Y - Y.mean(axis=0)
        # The Gram form costs n x n, the feature form p x p: take the smaller.
        if X.shape[1] + Y.shape[1] < 2 * len(X):
            cross = np.linalg.norm(Y.T @ X) ** 2
            norm_x, norm_y = np.linalg.norm(X.T @ X), np.linalg.norm(Y.T @ Y)
        else:
            K, L = X @ X.T, Y @ Y.T
            cross = float((K * L).sum())
            norm_x, norm_y = np.linalg.norm(K), np.linalg.norm(L)
        if norm_x == 0 or norm_y == 0:
            raise ValueError("a representation is constant over the examples: CKA is undefined")
        return float(cross / (norm_x * norm_y))


def _rows(A: Any, pooling: str) -> Any:
    """(n, ...) numpy array or torch tensor -> (n, p) float64 numpy array."""
    import numpy as np

    if hasattr(A, "detach"):  # a torch tensor
        A = A.detach().cpu().double().numpy()
    a = np.asarray(A, dtype=np.float64)
    if a.ndim == 4 and pooling == "mean":
        a = a.mean(axis=(2, 3))
    return a.reshape(len(a), -1)


@stitchbench.hookimpl
def register_similarity_indices(register):
    register(<<Class>>())
'''

_INDEX_TEST = '''
"""Tests of the ``<<name>>`` similarity index plugin."""

import numpy as np
import stitchbench
import torch
from stitchbench.testing import check_plugin

from <<pkg>> import <<Class>>


def test_passes_the_conformance_checks():
    check_plugin(<<Class>>())


def test_is_registered_through_its_entry_point():
    plugin = stitchbench.get_plugin("<<name>>")
    assert isinstance(plugin, <<Class>>)


def test_identical_rotated_and_independent_inputs():
    rs = np.random.RandomState(0)
    index = <<Class>>()
    A = rs.randn(200, 10)
    Q, _ = np.linalg.qr(rs.randn(10, 10))  # an orthogonal map
    assert abs(index.compute(A, A) - 1.0) < 1e-9
    assert abs(index.compute(A, 3.0 * A @ Q) - 1.0) < 1e-9
    assert index.compute(A, rs.randn(200, 10)) < 0.3
    conv = rs.randn(50, 3, 4, 4)
    same = index.compute(torch.from_numpy(conv), conv, index.Params(pooling="mean"))
    assert abs(same - 1.0) < 1e-6
'''

# -- evaluation --------------------------------------------------------------------------

_EVALUATION = '''
"""The ``<<name>>`` evaluation plugin for stitchbench.

Reads the run's similarity matrices (stitching and index matrices alike) and reports the
mean of each one's diagonal: how similar a layer is to the same layer (of the same
network: ``intra``, of another network: ``inter``), per measure. ``offset`` k compares
layer i with layer i + k instead. Numpy is imported inside ``run``.
"""

from __future__ import annotations

from typing import Any

import stitchbench
from pydantic import Field


class <<Class>>(stitchbench.Evaluation):
    """Mean diagonal of every similarity matrix (layer vs the same layer), per measure."""

    name = "<<name>>"
    #: Runs whenever the run produces matrices (it only reads them).
    summarises_matrices = True

    class Params(stitchbench.Params):
        offset: int = Field(0, ge=0, description="diagonal k: layer i vs layer i + k")

    def _params(self, params: Any) -> Any:
        if isinstance(params, self.Params):
            return params
        return self.Params.model_validate(params or {})

    def run(
        self, context: stitchbench.RunContext, params: Any
    ) -> stitchbench.EvaluationResult:
        import numpy as np

        p = self._params(params)
        rows = []
        for m in context.matrices:
            diagonal = np.diagonal(np.asarray(m.values, dtype=float), offset=p.offset)
            if diagonal.size:
                rows.append({"measure": m.measure, "scope": m.scope, "source": m.source,
                             "target": m.target, "mean_diagonal": float(diagonal.mean())})
        summary: dict[str, dict[str, float]] = {}  # scope -> measure -> mean
        for scope in ("intra", "inter"):
            for measure in context.measures():
                values = [r["mean_diagonal"] for r in rows
                          if r["scope"] == scope and r["measure"] == measure]
                if values:
                    summary.setdefault(scope, {})[measure] = float(np.mean(values))
        metrics = {f"{self.name}.{scope}.{measure}": v
                   for scope, by_measure in summary.items() for measure, v in by_measure.items()}
        return stitchbench.EvaluationResult(
            metrics=metrics,
            tables={self.name: {"offset": p.offset, "matrices": rows}},
            report_key=self.name,
            report=summary,
            report_text=_text(summary, p.offset),
        )

    def estimate_cost(self, params: Any, plan: stitchbench.PlanSummary) -> list:
        return []  # reads the matrices only


def _text(summary: dict[str, dict[str, float]], offset: int) -> str:
    measures = list(dict.fromkeys(m for by_measure in summary.values() for m in by_measure))
    w = max([len(m) for m in measures] + [7])
    lines = [f"Mean diagonal (offset {offset}) of the similarity matrices",
             f"{'measure':{w}} {'intra':>10} {'inter':>10}"]
    for m in measures:
        cells = [summary.get(s, {}).get(m) for s in ("intra", "inter")]
        text = [f"{c:10.4f}" if c is not None else f"{'-':>10}" for c in cells]
        lines.append(f"{m:{w}} {text[0]} {text[1]}")
    return "\\n".join(lines)


@stitchbench.hookimpl
def register_evaluations(register):
    register(<<Class>>())
'''

_EVALUATION_TEST = '''
"""Tests of the ``<<name>>`` evaluation plugin."""

import stitchbench
from stitchbench.testing import check_plugin, fake_context

from <<pkg>> import <<Class>>


def test_passes_the_conformance_checks():
    check_plugin(<<Class>>())


def test_is_registered_through_its_entry_point():
    plugin = stitchbench.get_plugin("<<name>>")
    assert isinstance(plugin, <<Class>>)


def test_reports_the_mean_diagonal_of_the_fake_matrices():
    # fake_context(): untrained tiny networks with a synthetic stitching matrix
    # (fake_func) and index matrix (fake_index), values 1 - |i - j| / 3
    ev = <<Class>>()
    result = ev.run(fake_context(), ev.Params())
    assert result.metrics["<<name>>.intra.fake_index"] == 1.0
    assert result.metrics["<<name>>.inter.fake_func"] == 1.0
    shifted = ev.run(fake_context(), ev.Params(offset=1))
    assert abs(shifted.metrics["<<name>>.intra.fake_index"] - 2 / 3) < 1e-9
    assert "fake_index" in result.report_text
'''

_MODULES = {
    "dataset": _DATASET,
    "architecture": _ARCHITECTURE,
    "matcher": _MATCHER,
    "similarity_index": _INDEX,
    "evaluation": _EVALUATION,
}
_TESTS = {
    "dataset": _DATASET_TEST,
    "architecture": _ARCHITECTURE_TEST,
    "matcher": _MATCHER_TEST,
    "similarity_index": _INDEX_TEST,
    "evaluation": _EVALUATION_TEST,
}
