"""The bundled matchers ``dm`` (direct matching) and ``tlm`` (task loss matching).

DM: planted affine maps are recovered, the solution is numpy's pinv on the same rows (also
the minimum-norm one for a rank-deficient source), streaming equals the one-shot solve,
float32 and float64 inputs agree, the low-rank approximation has the asked rank, and a
self-stitch is the identity. TLM: it lowers the training loss from its DM init, leaves
both networks untouched, and really runs the *target's* back half.

The networks are tiny StitchableNetworks defined here, on a synthetic 8x8 data set.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pydantic
import pytest
import torch
import torch.nn.functional as F
from stitchbench_plugins.matchers._lstsq import GramAccumulator, PinvAccumulator, QRAccumulator
from stitchbench_plugins.matchers.dm import DirectMatching
from stitchbench_plugins.matchers.tlm import TaskLossMatching
from torch import nn

import stitchbench
from stitchbench import LowRankProjection
from stitchbench.errors import DivergenceError
from stitchbench.nn.data import LoadedDataset, TensorSplit, random_crop_flip
from stitchbench.nn.network import StitchableNetwork
from stitchbench.nn.stitching import StitchingLayer, StitchingProblem, to_rows

SOLVERS = ["qr", "gram"]


# -- tiny networks and data --------------------------------------------------------------
class TinyConvNet(StitchableNetwork):
    """(1, 8, 8) -> b0 (c, 8, 8) -> b1 (2c, 4, 4) -> b2 (2c, 4, 4) -> logits; BatchNorm everywhere."""

    def __init__(self, c: int = 6, num_classes: int = 4):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())

        self.stem = block(1, c, 1)
        self.blocks = nn.ModuleList([block(c, c, 1), block(c, 2 * c, 2), block(2 * c, 2 * c, 1)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, num_classes))
        self.layer_names = ["b0", "b1", "b2"]


class TinyTokenNet(StitchableNetwork):
    """(1, 8, 8) -> 4 patch tokens + cls token, width d -> residual MLP blocks -> cls -> logits."""

    def __init__(self, d: int = 8, depth: int = 2, num_classes: int = 4):
        super().__init__()
        self.stem = _Patchify(d)
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(
                    _Residual(
                        nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
                    )
                )
                for _ in range(depth)
            ]
        )
        self.head = _ClsHead(d, num_classes)
        self.layer_names = [f"t{i}" for i in range(depth)]


class _Patchify(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(16, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 5, d) * 0.1)

    def forward(self, x):
        p = x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(x.shape[0], 4, 16)
        t = self.proj(p)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1) + self.pos


class _Residual(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return x + self.f(x)


class _ClsHead(nn.Module):
    def __init__(self, d, k):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, k)

    def forward(self, x):
        return self.fc(self.norm(x)[:, 0])


def synthetic_data(
    n_train: int = 384, n_test: int = 128, noise: float = 0.9, augment: bool = True
) -> LoadedDataset:
    """Four classes of smooth 8x8 prototypes under heavy noise (hard enough to leave TLM room)."""
    g = torch.Generator().manual_seed(0)
    protos = F.avg_pool2d(torch.randn(4, 1, 10, 10, generator=g), 3, 1)  # (4, 1, 8, 8)

    def split(n):
        y = torch.randint(0, 4, (n,), generator=g)
        return TensorSplit(protos[y] + noise * torch.randn(n, 1, 8, 8, generator=g), y)

    return LoadedDataset(
        name="synthetic",
        num_classes=4,
        image_shape=(1, 8, 8),
        train=split(n_train),
        test=split(n_test),
        augment=random_crop_flip(padding=1, flip=False) if augment else None,
    )


def train(net: StitchableNetwork, data: LoadedDataset, epochs: int = 8, seed: int = 0) -> StitchableNetwork:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.train), generator=g)
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            loss = F.cross_entropy(net(data.train.images[idx]), data.train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: one thread is as fast, and it avoids OpenMP's stalls when
    the (2-core) machine is busy with other processes."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def data():
    return synthetic_data()


@pytest.fixture(scope="module")
def conv_nets(data):
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(train(TinyConvNet(), data, seed=seed))
    return nets


@pytest.fixture(scope="module")
def token_nets(data):
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(train(TinyTokenNet(), data, epochs=4, seed=seed))
    return nets


def problem(source, s_layer, target, t_layer, data, **kw) -> StitchingProblem:
    return StitchingProblem(
        source=source, source_layer=s_layer, target=target, target_layer=t_layer, data=data, **kw
    )


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def pinv_solution(
    X: torch.Tensor, Y: torch.Tensor, rtol: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """numpy's minimum-norm solution pinv([X, 1]) Y on the rows of activations X, Y."""
    A = to_rows(torch.as_tensor(X)).double().numpy()
    A = np.hstack([A, np.ones((A.shape[0], 1))])
    B = to_rows(torch.as_tensor(Y)).double().numpy()
    rtol = max(A.shape) * np.finfo(float).eps if rtol is None else rtol
    theta = np.linalg.pinv(A, rtol=rtol) @ B
    return theta[:-1].T, theta[-1]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- DM: exact recovery and agreement with numpy -------------------------------------------
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("kind", ["conv", "conv_resize", "tokens"])
def test_dm_recovers_planted_affine_map(kind, solver):
    g = gen(1)
    if kind == "conv":
        X = torch.randn(12, 5, 6, 6, generator=g, dtype=torch.float64)
        W, b = (
            torch.randn(3, 5, generator=g, dtype=torch.float64),
            torch.randn(3, generator=g, dtype=torch.float64),
        )
        Y = torch.einsum("oc,nchw->nohw", W, X) + b[:, None, None]
    elif kind == "conv_resize":
        X = torch.randn(12, 5, 4, 4, generator=g, dtype=torch.float64)
        W, b = (
            torch.randn(7, 5, generator=g, dtype=torch.float64),
            torch.randn(7, generator=g, dtype=torch.float64),
        )
        up = F.interpolate(X, size=(8, 8), mode="bilinear", align_corners=False)
        Y = torch.einsum("oc,nchw->nohw", W, up) + b[:, None, None]
    else:
        X = torch.randn(12, 7, 6, generator=g, dtype=torch.float64)
        W, b = (
            torch.randn(4, 6, generator=g, dtype=torch.float64),
            torch.randn(4, generator=g, dtype=torch.float64),
        )
        Y = X @ W.T + b
    T = stitchbench.get_plugin("dm").fit_activations(X, Y, {"solver": solver})
    assert isinstance(T, StitchingLayer)
    assert rel(T.weight.detach(), W) < 1e-6 and rel(T.bias.detach(), b) < 1e-6
    with torch.no_grad():
        out = T(X)
    assert out.shape == Y.shape and rel(out, Y) < 1e-6
    assert T.fit_info["residual"] < 1e-12


def test_dm_float32_input_and_default_params():
    """The DESIGN.md call: float32 tensors, no params; T(X) has Y's shape."""
    X, Y = torch.randn(8, 5, 4, 4, generator=gen(2)), torch.randn(8, 3, 4, 4, generator=gen(3))
    T = stitchbench.get_plugin("dm").fit_activations(X, Y)
    with torch.no_grad():
        assert T(X).shape == Y.shape
    assert T.weight.dtype == torch.float32
    assert 0 < T.fit_info["residual"] < 1
    assert T.fit_info["rows"] == 8 * 16


@pytest.mark.parametrize("solver", SOLVERS)
def test_dm_equals_numpy_lstsq_and_pinv(solver):
    g = gen(4)
    X = torch.randn(30, 6, 5, 5, generator=g) * torch.linspace(0.5, 2, 6)[:, None, None] + 1.5
    Y = torch.tanh(torch.randn(30, 4, 5, 5, generator=g) + X[:, :4])
    T = DirectMatching().fit_activations(X, Y, {"solver": solver})
    W, b = pinv_solution(X, Y)
    assert rel(T.weight.detach(), W) < 1e-6 and rel(T.bias.detach(), b) < 1e-6
    A = np.hstack([to_rows(X).double().numpy(), np.ones((30 * 25, 1))])
    theta, *_ = np.linalg.lstsq(A, to_rows(Y).double().numpy(), rcond=None)
    assert rel(T.weight.detach(), theta[:-1].T) < 1e-6
    # The reported residual is the normalised one, computed here directly.
    Yr = to_rows(Y).double().numpy()
    direct = ((A @ theta - Yr) ** 2).sum() / ((Yr - Yr.mean(0)) ** 2).sum()
    assert T.fit_info["residual"] == pytest.approx(direct, rel=1e-6)
    assert T.fit_info["residual_uncentred"] == pytest.approx(
        ((A @ theta - Yr) ** 2).sum() / (Yr**2).sum(), rel=1e-6
    )


@pytest.mark.parametrize("solver", SOLVERS)
def test_dm_rank_deficient_source_gives_pinv_minimum_norm(solver):
    """A channel that is a combination of others and a constant non-zero channel: the
    least-squares solutions form an affine family; pinv's is the one of least ‖W‖² + ‖b‖²
    (the constant channel shares the bias), not merely the least ‖W‖."""
    g = gen(5)
    X = torch.randn(20, 5, 4, 4, generator=g, dtype=torch.float64)
    X[:, 3] = 2 * X[:, 0] - X[:, 1]
    X[:, 4] = 3.0
    Y = torch.randn(20, 3, 4, 4, generator=g, dtype=torch.float64) + X[:, :3] + 5
    T = DirectMatching().fit_activations(X, Y, {"solver": solver})
    W, b = pinv_solution(X, Y, rtol=1e-10)
    assert T.fit_info["rank"] == 4  # [X, 1]: 6 columns, 2 dependencies
    assert rel(T.weight.detach(), W) < 1e-6 and rel(T.bias.detach(), b) < 1e-6
    # The minimum-norm W alone (with b = ȳ - W x̄) is another solution, with a larger ‖(W, b)‖.
    Xr, Yr = to_rows(X).numpy(), to_rows(Y).numpy()
    Wc = (np.linalg.pinv(Xr - Xr.mean(0), rtol=1e-10) @ (Yr - Yr.mean(0))).T
    bc = Yr.mean(0) - Wc @ Xr.mean(0)
    assert np.allclose(
        np.hstack([Xr, np.ones((len(Xr), 1))]) @ np.vstack([Wc.T, bc]),
        np.hstack([Xr, np.ones((len(Xr), 1))]) @ np.vstack([W.T, b]),
    )
    assert np.sum(Wc**2) + np.sum(bc**2) > 1.5 * (np.sum(W**2) + np.sum(b**2))


@pytest.mark.parametrize("solver", SOLVERS)
def test_float32_and_float64_inputs_agree(solver):
    X32 = torch.randn(16, 4, 5, 5, generator=gen(6)) + 0.5
    Y32 = torch.randn(16, 3, 5, 5, generator=gen(7)) + X32[:, :3] * 2
    T32 = DirectMatching().fit_activations(X32, Y32, {"solver": solver})
    T64 = DirectMatching().fit_activations(X32.double(), Y32.double(), {"solver": solver})
    assert T32.weight.dtype == torch.float32 and T64.weight.dtype == torch.float64
    assert rel(T32.weight.detach(), T64.weight.detach()) < 1e-6
    assert rel(T32.bias.detach(), T64.bias.detach()) < 1e-6


def test_streaming_accumulators_equal_one_shot():
    """Rows fed in uneven batches give the solution of all rows at once (float64 level)."""
    g = gen(8)
    X = torch.randn(1000, 9, generator=g, dtype=torch.float64) * 3 + 2
    Y = X[:, :4] @ torch.randn(4, 5, generator=g, dtype=torch.float64) + torch.randn(
        1000, 5, generator=g, dtype=torch.float64
    )
    for make in (lambda: QRAccumulator(9, 5), lambda: GramAccumulator(9, 5)):
        one, many = make(), make()
        one.update(X, Y)
        for a, b in [(0, 1), (1, 64), (64, 65), (65, 700), (700, 1000)]:
            many.update(X[a:b], Y[a:b])
        f1, f2 = one.solve(), many.solve()
        assert many.n == 1000
        assert rel(f2.weight, f1.weight) < 1e-10 and rel(f2.bias, f1.bias) < 1e-10
        assert f2.residual == pytest.approx(f1.residual, rel=1e-9)


@pytest.mark.parametrize("nets", ["conv_nets", "token_nets"])
def test_dm_fit_streams_k_all_and_large_k(nets, data, request):
    """fit(): the in-memory path, the streaming path for a K over the memory cap, and
    K='all' with small batches all equal a one-shot fit of the same activations."""
    a, b = request.getfixturevalue(nets)
    s_layer, t_layer = a.layer_names[0], b.layer_names[-1]
    prob = problem(a, s_layer, b, t_layer, data)
    dm = DirectMatching()
    in_memory = dm.fit(prob, {"k": 100})
    streamed = dm.fit(prob, {"k": 100, "batch_size": 7, "cache_limit_mb": 0})
    x, _ = prob.sample_images(100)
    with torch.no_grad():
        ref = dm.fit_activations(a.front(x, s_layer), b.front(x, t_layer))
    for T in (in_memory, streamed):
        assert rel(T.weight.detach(), ref.weight.detach()) < 1e-6
        assert rel(T.bias.detach(), ref.bias.detach()) < 1e-6
    assert in_memory.fit_info["k"] == 100 and in_memory.fit_info["rows"] == ref.fit_info["rows"]

    everything = dm.fit(prob, {"k": "all", "batch_size": 50})
    with torch.no_grad():
        ref_all = dm.fit_activations(a.front(data.train.images, s_layer), b.front(data.train.images, t_layer))
    assert everything.fit_info["k"] == len(data.train)
    assert rel(everything.weight.detach(), ref_all.weight.detach()) < 1e-6
    assert everything.fit_info["residual"] == pytest.approx(ref_all.fit_info["residual"], rel=1e-6)


def test_dm_fit_restores_network_modes(conv_nets, data):
    a, b = conv_nets
    a.train()
    try:
        DirectMatching().fit(problem(a, "b0", b, "b1", data), {"k": 20, "cache_limit_mb": 0})
        assert a.training and not b.training
    finally:
        a.eval()


def test_dm_rejects_non_finite_and_mismatched_input():
    dm = DirectMatching()
    X, Y = torch.randn(4, 3, 2, 2), torch.randn(4, 2, 2, 2)
    for bad in (float("nan"), float("inf")):
        Xb = X.clone()
        Xb[1, 0, 0, 0] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            dm.fit_activations(Xb, Y)
        Yb = Y.clone()
        Yb[0, 1, 1, 1] = bad
        with pytest.raises(ValueError, match="target"):
            dm.fit_activations(X, Yb)
    with pytest.raises(ValueError, match="examples"):
        dm.fit_activations(X, Y[:3])
    with pytest.raises(ValueError, match="cannot stitch"):
        dm.fit_activations(X, torch.randn(4, 4, 2))
    with pytest.raises(pydantic.ValidationError):
        dm.fit_activations(X, Y, {"k": 0})
    with pytest.raises(pydantic.ValidationError):
        dm.fit_activations(X, Y, {"solver": "svd"})


# -- DM: the authors' cut-off (float32 pinv) ------------------------------------------------
_EPS32 = torch.finfo(torch.float32).eps


def _nearly_dependent(kind: str, seed: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 activations X whose rows [X, 1] have two singular values near 1e-5·s_max
    (two channels almost copies of others), and a target Y that uses those two directions:
    below float32 pinv's default cut-off (rows·eps32 ≈ 1e-4 at 1000 rows), far above
    float64's."""
    g = gen(seed)
    shape = {"conv": (40, 6, 5, 5), "conv_resize": (40, 6, 3, 3), "tokens": (40, 25, 6)}[kind]
    X = torch.randn(*shape, generator=g, dtype=torch.float64) + 0.5
    ch = 1 if X.ndim == 4 else 2  # the channel axis
    Xc = X.movedim(ch, -1)
    tiny = 1e-5 * torch.randn(Xc.shape[:-1] + (2,), generator=g, dtype=torch.float64)
    Xc[..., 4:] = Xc[..., :2] + tiny
    X = Xc.movedim(-1, ch).contiguous()
    base = F.interpolate(X, size=(5, 5), mode="bilinear", align_corners=False) if kind == "conv_resize" else X
    bc = base.movedim(ch, -1)
    # the second and third outputs need the small directions (x4 - x0, x5 - x1 are ~1e-5)
    Y = torch.stack(
        [
            bc[..., 0] - bc[..., 2],
            1e5 * (bc[..., 4] - bc[..., 0]),
            bc[..., 3] + 3e4 * (bc[..., 5] - bc[..., 1]),
        ],
        -1,
    )
    Y = Y + 0.01 * torch.randn(Y.shape, generator=g, dtype=torch.float64)
    return X.float(), Y.movedim(-1, ch).contiguous().float()


def _authors_rows(X: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 design [X, 1] (bias column last, as the authors' ps_inv) and target rows,
    built as DM builds them: the resize (when Y is larger) in float64, then channels-last."""
    Xd = X.double()
    if X.ndim == 4 and X.shape[2:] != Y.shape[2:]:
        Xd = F.interpolate(Xd, size=Y.shape[2:], mode="bilinear", align_corners=False)
    rows = to_rows(Xd).float()
    A = torch.cat([rows, torch.ones(rows.shape[0], 1)], dim=1)
    return A, to_rows(Y).float()


@pytest.mark.parametrize("kind", ["conv", "conv_resize", "tokens"])
def test_dm_authors_cutoff_equals_float32_torch_pinv(kind):
    """cutoff: authors is the authors' ps_inv: float32 torch.linalg.pinv([X, 1]) @ Y on the
    same rows (default tolerance); it differs measurably from the exact solve here."""
    X, Y = _nearly_dependent(kind)
    dm = stitchbench.get_plugin("dm")
    T = dm.fit_activations(X, Y, {"cutoff": "authors"})
    A, B = _authors_rows(X, Y)
    theta = torch.linalg.pinv(A) @ B  # (C1 + 1, C2): [Wᵀ; b]
    assert rel(T.weight.detach(), theta[:-1].T) < 1e-5 and rel(T.bias.detach(), theta[-1]) < 1e-5
    n, p1 = A.shape
    s = torch.linalg.svdvals(A.double())
    assert T.fit_info["rank"] == 5 == int((s > _EPS32 * n * s[0]).sum())  # 7 columns, 2 cut
    assert T.fit_info["rcond"] == pytest.approx(_EPS32 * max(n, p1))
    assert (T.fit_info["cutoff"], T.fit_info["solver"], T.fit_info["rows"]) == ("authors", "pinv_float32", n)
    # The residual is reported against these rows, in float64.
    r = A.double() @ theta.double() - B.double()
    Bd = B.double()
    assert T.fit_info["residual"] == pytest.approx(
        float((r**2).sum() / ((Bd - Bd.mean(0)) ** 2).sum()), rel=1e-4
    )
    # `solver` plays no part
    G = dm.fit_activations(X, Y, {"cutoff": "authors", "solver": "gram"})
    assert torch.equal(G.weight, T.weight) and torch.equal(G.bias, T.bias)
    # The exact solve keeps the two small directions: a different map, a smaller residual.
    E = dm.fit_activations(X, Y)
    assert E.fit_info["rank"] == 7 and E.fit_info["cutoff"] == "exact"
    assert rel(T.weight.detach(), E.weight.detach()) > 0.1
    assert E.fit_info["residual"] < 0.5 * T.fit_info["residual"]


def test_dm_authors_cutoff_explicit_rcond_and_well_conditioned_case():
    """An explicit rcond is torch's rtol; on a well-conditioned source the two cut-offs
    agree to float32 accuracy."""
    X, Y = _nearly_dependent("conv")
    A, B = _authors_rows(X, Y)
    T = DirectMatching().fit_activations(X, Y, {"cutoff": "authors", "rcond": 1e-7})
    theta = torch.linalg.pinv(A, rtol=1e-7) @ B
    assert T.fit_info["rank"] == 7 and T.fit_info["rcond"] == 1e-7
    assert rel(T.weight.detach(), theta[:-1].T) < 1e-3  # float32 on a condition number of ~1e5
    g = gen(13)
    Xw = torch.randn(30, 5, 4, 4, generator=g) + 1.0
    Yw = torch.randn(30, 3, 4, 4, generator=g) + Xw[:, :3]
    a = DirectMatching().fit_activations(Xw, Yw, {"cutoff": "authors"})
    e = DirectMatching().fit_activations(Xw, Yw)
    assert rel(a.weight.detach(), e.weight.detach()) < 1e-5 and rel(a.bias.detach(), e.bias.detach()) < 1e-5


def test_dm_exact_is_the_default_and_unchanged():
    assert DirectMatching.Params().cutoff == "exact"
    X, Y = _nearly_dependent("conv")
    a = DirectMatching().fit_activations(X, Y)
    b = DirectMatching().fit_activations(X, Y, {"cutoff": "exact", "solver": "qr"})
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    W, bias = pinv_solution(X, Y)  # float64 pinv, eps·max(rows, cols)
    assert rel(a.weight.detach(), W) < 1e-5 and rel(a.bias.detach(), bias) < 1e-5
    with pytest.raises(pydantic.ValidationError, match="cutoff"):
        DirectMatching.Params.model_validate({"cutoff": "float32"})


def test_dm_authors_cutoff_low_rank_source_and_target():
    """rank / target_rank with the authors' cut-off: the (float64) low-rank approximation of
    the rows, then float32 pinv on it; the projection is installed as with `exact`."""
    g = gen(14)
    X = (
        torch.randn(24, 6, 4, 4, generator=g, dtype=torch.float64)
        * torch.linspace(3, 0.5, 6, dtype=torch.float64)[:, None, None]
    )
    Y = torch.tanh(torch.einsum("oc,nchw->nohw", torch.randn(5, 6, generator=g, dtype=torch.float64), X))
    T = DirectMatching().fit_activations(X.float(), Y.float(), {"rank": 2, "cutoff": "authors"})
    assert isinstance(T.source_transform, LowRankProjection) and T.fit_info["rank"] == 3
    A, B = _authors_rows(_lra(X, 2).float(), Y.float())
    theta = torch.linalg.pinv(A) @ B
    assert rel(T.weight.detach(), theta[:-1].T) < 1e-4 and rel(T.bias.detach(), theta[-1]) < 1e-4
    E = DirectMatching().fit_activations(X.float(), Y.float(), {"rank": 2})
    assert rel(T.weight.detach(), E.weight.detach()) < 1e-4  # nothing left near the cut
    Tt = DirectMatching().fit_activations(X.float(), Y.float(), {"target_rank": 2, "cutoff": "authors"})
    A, B = _authors_rows(X.float(), _lra(Y, 2).float())
    theta = torch.linalg.pinv(A) @ B
    assert rel(Tt.weight.detach(), theta[:-1].T) < 1e-4


def test_pinv_accumulator_batches_and_dtype():
    """Rows fed in batches are solved together; float64 rows are stored as float32."""
    X, Y = _nearly_dependent("tokens")
    A, B = _authors_rows(X, Y)
    acc = PinvAccumulator(6, 3)
    rows = to_rows(X).double()
    for a, b in [(0, 1), (1, 300), (300, 1000)]:
        acc.update(rows[a:b], B[a:b])
    assert acc.n == 1000 and acc.rows()[0].dtype == torch.float32
    fit = acc.solve()
    theta = torch.linalg.pinv(A) @ B
    assert rel(fit.weight, theta[:-1].T) < 1e-5 and fit.rank == 5


def test_dm_and_tlm_pass_the_authors_cutoff_through(conv_nets, data):
    """fit() on a problem (cached and streamed activations) and TLM's DM initialisation
    both use `dm.cutoff`."""
    a, b = conv_nets
    prob = problem(a, "b0", b, "b2", data)
    dm = DirectMatching()
    cached = dm.fit(prob, {"k": 30, "cutoff": "authors"})
    streamed = dm.fit(prob, {"k": 30, "cutoff": "authors", "batch_size": 7, "cache_limit_mb": 0})
    x, _ = prob.sample_images(30)
    with torch.no_grad():
        ref = dm.fit_activations(a.front(x, "b0"), b.front(x, "b2"), {"cutoff": "authors"})
    for T in (cached, streamed):
        assert T.fit_info["cutoff"] == "authors"
        assert rel(T.weight.detach(), ref.weight.detach()) < 1e-5
    T = TaskLossMatching().fit(prob, {"epochs": 0, "dm": {"k": 30, "cutoff": "authors"}})
    assert torch.equal(T.weight, cached.weight) and T.fit_info["dm"]["cutoff"] == "authors"
    assert TaskLossMatching.Params.model_validate({"dm": {"cutoff": "authors"}}).dm.cutoff == "authors"


# -- DM: low-rank approximation ------------------------------------------------------------
def _lra(X: torch.Tensor, r: int) -> torch.Tensor:
    """The authors' low-rank approximation (channels-last rows, centre, SVD, zero, add back)."""
    rows = to_rows(X).double()
    mean = rows.mean(0)
    U, s, Vh = torch.linalg.svd(rows - mean, full_matrices=False)
    s[r:] = 0
    out = (U * s) @ Vh + mean
    if X.ndim == 4:
        n, c, h, w = X.shape
        return out.reshape(n, h, w, c).permute(0, 3, 1, 2)
    return out.reshape(X.shape)


@pytest.mark.parametrize("solver", SOLVERS)
def test_dm_low_rank_source(solver):
    g = gen(9)
    X = (
        torch.randn(24, 6, 4, 4, generator=g, dtype=torch.float64)
        * torch.linspace(3, 0.5, 6, dtype=torch.float64)[:, None, None]
    )
    Y = torch.tanh(torch.einsum("oc,nchw->nohw", torch.randn(5, 6, generator=g, dtype=torch.float64), X))
    r = 2
    T = DirectMatching().fit_activations(X, Y, {"rank": r, "solver": solver})
    proj = T.source_transform
    assert isinstance(proj, LowRankProjection) and proj.rank == r
    assert T.fit_info["source_rank"] == r and T.fit_info["rank"] == r + 1
    # The projection is the reference's low-rank approximation on the sample...
    with torch.no_grad():
        reduced = proj(X)
    assert rel(reduced, _lra(X, r)) < 1e-6
    centred = to_rows(reduced) - to_rows(reduced).mean(0)
    assert torch.linalg.matrix_rank(centred, rtol=1e-8) == r
    # ...the map is pinv on the reduced source...
    W, b = pinv_solution(_lra(X, r), Y, rtol=1e-8)
    assert rel(T.weight.detach(), W) < 1e-6 and rel(T.bias.detach(), b) < 1e-6
    # ...and at evaluation the (new) source is reduced to rank r before the map.
    X_new = torch.randn(5, 6, 4, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = T(X_new)
        unreduced = T.affine(X_new)
    assert rel(out, T.affine(proj(X_new)).detach()) < 1e-12 and rel(out, unreduced) > 1e-3
    centred_out = to_rows(out) - to_rows(out).mean(0)
    assert torch.linalg.matrix_rank(centred_out, rtol=1e-8) == r


def test_dm_low_rank_target_and_full_rank_is_identity():
    g = gen(10)
    X = torch.randn(20, 7, 9, generator=g)
    Y = torch.randn(20, 7, 6, generator=g) + X[..., :6]
    T = DirectMatching().fit_activations(X, Y, {"target_rank": 2})
    with torch.no_grad():
        out = to_rows(T(X)).double()
    assert torch.linalg.matrix_rank(out - out.mean(0), rtol=1e-5) == 2
    W, _ = pinv_solution(X, _lra(Y, 2))
    assert rel(T.weight.detach(), W) < 1e-6
    # rank >= channels means no reduction (the ranks list of a sensitivity test starts there)
    full = DirectMatching().fit_activations(X, Y, {"rank": 9})
    plain = DirectMatching().fit_activations(X, Y)
    assert full.source_transform is None and rel(full.weight.detach(), plain.weight.detach()) < 1e-6


def test_dm_low_rank_fit_commutes_with_resize():
    """The projection is fitted on the resized rows but applied before the resize: the
    stitched output equals the map applied to the reduced, resized source."""
    g = gen(11)
    X = torch.randn(10, 5, 4, 4, generator=g, dtype=torch.float64)
    Y = torch.randn(10, 3, 8, 8, generator=g, dtype=torch.float64)
    T = DirectMatching().fit_activations(X, Y, {"rank": 2})
    up = F.interpolate(X, size=(8, 8), mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert rel(T(X), T.affine(T.source_transform(up))) < 1e-12


# -- DM: self-stitching ---------------------------------------------------------------------
@pytest.mark.parametrize("nets", ["conv_nets", "token_nets"])
def test_dm_self_stitch_is_identity(nets, data, request):
    net = request.getfixturevalue(nets)[0]
    layer = net.layer_names[1] if nets == "conv_nets" else net.layer_names[0]
    prob = problem(net, layer, net, layer, data)
    T = DirectMatching().fit(prob)
    assert T.fit_info["residual"] < 1e-10
    with torch.no_grad():
        h = net.front(data.test.images, layer)
        live = to_rows(h).var(0) > 1e-12  # dead ReLU channels carry no information
        W = T.weight.detach()[live][:, live]
        assert torch.allclose(W, torch.eye(int(live.sum())), atol=1e-4)
        assert torch.allclose(T(h), h, atol=1e-4)
        stitched = prob.stitched(T)(data.test.images)
        assert torch.equal(stitched.argmax(1), net(data.test.images).argmax(1))


# -- TLM -----------------------------------------------------------------------------------
def _train_loss(prob: StitchingProblem, T: StitchingLayer) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(prob.stitched(T)(prob.data.train.images), prob.data.train.labels))


def _snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def tlm_run(conv_nets, data):
    """One TLM fit between the corresponding middle layers of two networks, with the
    networks' state, gradient flags and modes recorded around it."""
    a, b = conv_nets
    a.stem[0].weight.requires_grad_(False)  # an unusual flag, to be restored as it was
    a.train()  # a mode that must be restored too
    for p in [*a.parameters(), *b.parameters()]:
        p.grad = None  # left over from their own training
    flags = {id(p): p.requires_grad for net in (a, b) for p in net.parameters()}
    before = (_snapshot(a), _snapshot(b))
    prob = problem(a, "b1", b, "b1", data)
    params = {"epochs": 6, "batch_size": 64, "lr": 1e-2, "dm": {"k": 100}}
    T = TaskLossMatching().fit(prob, params)
    after = (_snapshot(a), _snapshot(b))
    modes = (a.training, b.training)
    flags_after = {id(p): p.requires_grad for net in (a, b) for p in net.parameters()}
    grads = [p.grad for net in (a, b) for p in net.parameters()]
    a.eval()
    a.stem[0].weight.requires_grad_(True)
    return {
        "prob": prob,
        "T": T,
        "before": before,
        "after": after,
        "modes": modes,
        "flags": flags,
        "flags_after": flags_after,
        "grads": grads,
        "params": params,
    }


def test_tlm_lowers_training_loss_from_dm_init(tlm_run):
    prob, T = tlm_run["prob"], tlm_run["T"]
    init = DirectMatching().fit(prob, tlm_run["params"]["dm"])
    assert T.fit_info["dm"]["residual"] == pytest.approx(init.fit_info["residual"])
    loss_dm, loss_tlm = _train_loss(prob, init), _train_loss(prob, T)
    assert loss_tlm < 0.9 * loss_dm, (loss_dm, loss_tlm)
    assert not torch.equal(T.weight, init.weight)
    losses = T.fit_info["loss_per_epoch"]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_tlm_leaves_networks_untouched(tlm_run):
    for before, after in zip(tlm_run["before"], tlm_run["after"]):
        assert before.keys() == after.keys()
        for k in before:  # parameters and BatchNorm buffers (running stats, batch counts)
            assert torch.equal(before[k], after[k]), k
    assert any("running_mean" in k for k in tlm_run["before"][1])
    assert all(g is None for g in tlm_run["grads"])
    assert tlm_run["flags_after"] == tlm_run["flags"]
    assert list(tlm_run["flags"].values()).count(False) == 1
    assert tlm_run["modes"] == (True, False)
    T = tlm_run["T"]
    assert all(p.requires_grad and p.grad is None for p in T.parameters()) and not T.training


def test_tlm_uses_the_targets_back_half(tlm_run, conv_nets, data):
    """The stitched network runs f<=i of the source and g>j of the *target*: changing the
    target after its layer changes the output; changing the source after its layer, or
    the target before its layer, does not."""
    a, b = conv_nets
    prob, T = tlm_run["prob"], tlm_run["T"]
    x = data.test.images[:32]

    def output():
        with torch.no_grad():
            return prob.stitched(T)(x)

    base = output()

    def changed(param: torch.Tensor) -> bool:
        saved = param.detach().clone()
        with torch.no_grad():
            param.add_(torch.randn(param.shape, generator=gen(12)))
        try:
            return not torch.allclose(output(), base)
        finally:
            with torch.no_grad():
                param.copy_(saved)

    assert changed(b.blocks[2][0].weight) and changed(b.head[2].weight)  # the target's receiver
    assert not changed(a.blocks[2][0].weight) and not changed(a.head[2].weight)  # source after its layer
    assert not changed(b.blocks[1][0].weight) and not changed(b.stem[0].weight)  # target up to its layer
    assert changed(a.blocks[1][0].weight) and changed(a.stem[0].weight)  # the source's front half
    assert torch.equal(output(), base)


def test_tlm_cache_matches_uncached(conv_nets, data):
    """Without augmentation the source activations are cached; the epochs are the same
    batches in the same order, so the result equals the uncached one."""
    a, b = conv_nets
    prob = problem(a, "b1", b, "b1", data)
    params = {"epochs": 2, "batch_size": 100, "augment": False, "dm": {"k": 50}}
    cached = TaskLossMatching().fit(prob, params)
    plain = TaskLossMatching().fit(prob, {**params, "cache_source": False})
    assert cached.fit_info["source_cached"] and not plain.fit_info["source_cached"]
    assert rel(cached.weight.detach(), plain.weight.detach()) < 1e-5
    augmented = TaskLossMatching().fit(prob, {**params, "augment": True, "epochs": 1})
    assert not augmented.fit_info["source_cached"] and augmented.fit_info["augment"]


@pytest.mark.parametrize("augment", [True, False], ids=["augmented", "cached"])
def test_tlm_fit_many_equals_one_fit_per_cell(conv_nets, data, augment):
    """A row of cells trained together (the source half computed once per batch) gives
    each cell the stitcher it gets alone; cells with another source go in their own group,
    and the result keeps the problems' order."""
    a, b = conv_nets
    params = {"epochs": 2, "batch_size": 128, "augment": augment, "dm": {"k": 60}}
    probs = [problem(a, "b1", b, t, data) for t in b.layer_names] + [problem(a, "b0", a, "b2", data)]
    a.train()  # a mode to restore
    together = TaskLossMatching().fit_many(probs, params)
    assert a.training and not b.training
    a.eval()
    assert [T.fit_info["trained_together"] for T in together] == [3, 3, 3, 1]
    assert all(T.fit_info["source_cached"] is not augment for T in together)
    for prob, T in zip(probs, together):
        alone = TaskLossMatching().fit(prob, params)
        assert T.target_shape == prob.target_shape
        for k, v in alone.state_dict().items():
            torch.testing.assert_close(T.state_dict()[k], v, rtol=0, atol=1e-6)
        assert T.fit_info["loss_per_epoch"] == pytest.approx(alone.fit_info["loss_per_epoch"], rel=1e-6)


def _accuracy(prob: StitchingProblem, T: StitchingLayer) -> float:
    with torch.no_grad():
        return float((prob.stitched(T)(prob.data.test.images).argmax(1) == prob.data.test.labels).float().mean())


def test_tlm_bfloat16_and_channels_last_stay_within_documented_tolerances(conv_nets, data):
    """bfloat16 autocast and channels-last change only how the receiver computes: the
    stitcher stays float32, the networks come back contiguous and unchanged, and the
    trained T is the float32 one up to the tolerances docs/matchers.md states (channels-last:
    relative 1e-4; bfloat16: T relative 5e-2, final loss relative 1e-2, test accuracy 0.03)."""
    a, b = conv_nets
    prob = problem(a, "b0", b, "b1", data)
    params = {"epochs": 3, "batch_size": 64, "lr": 1e-2, "dm": {"k": 100}}
    before = _snapshot(b)
    ref = TaskLossMatching().fit(prob, params)
    cl = TaskLossMatching().fit(prob, {**params, "channels_last": True})
    bf = TaskLossMatching().fit(prob, {**params, "precision": "bfloat16"})
    assert all(p.is_contiguous() for net in (a, b) for p in net.parameters())
    assert all(torch.equal(v, before[k]) for k, v in b.state_dict().items())
    assert cl.fit_info["channels_last"] and bf.fit_info["precision"] == "bfloat16"
    assert bf.weight.dtype == torch.float32
    assert rel(cl.weight.detach(), ref.weight.detach()) < 1e-4
    assert 0 < rel(bf.weight.detach(), ref.weight.detach()) < 5e-2
    assert abs(_accuracy(prob, bf) - _accuracy(prob, ref)) <= 0.03
    assert bf.fit_info["loss"] == pytest.approx(ref.fit_info["loss"], rel=1e-2)
    with pytest.raises(ValueError, match="float16 needs a CUDA device"):
        TaskLossMatching().fit(prob, {**params, "precision": "float16"})


def test_tlm_token_network(token_nets, data):
    a, b = token_nets
    prob = problem(a, "t0", b, "t1", data)
    T = TaskLossMatching().fit(prob, {"epochs": 1, "batch_size": 128, "dm": {"k": 60}})
    with torch.no_grad():
        assert prob.stitched(T)(data.test.images[:4]).shape == (4, 4)


def test_tlm_divergence_raises(conv_nets, data):
    a, b = conv_nets
    prob = problem(a, "b0", b, "b1", data)
    with pytest.raises(DivergenceError, match=r"non-finite training loss in epoch [123]/3 .*b0 -> .*b1"):
        TaskLossMatching().fit(prob, {"epochs": 3, "lr": 1e30, "dm": {"k": 20}})


def test_tlm_zero_epochs_is_dm(conv_nets, data):
    a, b = conv_nets
    prob = problem(a, "b0", b, "b1", data)
    T = TaskLossMatching().fit(prob, {"epochs": 0, "dm": {"k": 30}})
    D = DirectMatching().fit(prob, {"k": 30})
    assert torch.equal(T.weight, D.weight) and T.fit_info["loss"] is None


def test_tlm_params():
    p = TaskLossMatching.Params.model_validate({"dm": {"k": 40, "rank": 3}, "epochs": 2})
    assert p.dm.k == 40 and p.dm.rank == 3 and p.lr == 1e-3 and p.weight_decay == 1e-5
    d = TaskLossMatching.Params()
    assert (d.epochs, d.batch_size, d.dm.k, d.augment) == (30, 256, 100, True)
    with pytest.raises(pydantic.ValidationError):
        TaskLossMatching.Params.model_validate({"dm": {"kk": 1}})


# -- on a GPU ------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dm_and_tlm_on_cuda(conv_nets, data):
    cuda = torch.device("cuda")
    a, b = (copy.deepcopy(net).to(cuda) for net in conv_nets)
    on_gpu = problem(a, "b0", b, "b1", data, device=cuda)
    on_cpu = problem(conv_nets[0], "b0", conv_nets[1], "b1", data)
    for solver in SOLVERS:
        for extra in ({}, {"k": "all", "batch_size": 50}, {"rank": 3}):
            params = {"solver": solver, **extra}
            G, C = DirectMatching().fit(on_gpu, params), DirectMatching().fit(on_cpu, params)
            assert G.weight.device.type == "cuda"
            assert rel(G.weight.detach().cpu(), C.weight.detach()) < 1e-5
    # the authors' float32 pinv on the GPU (this pair is well conditioned: no value near the cut)
    G, C = (DirectMatching().fit(prob, {"cutoff": "authors"}) for prob in (on_gpu, on_cpu))
    assert G.weight.device.type == "cuda" and G.fit_info["rank"] == C.fit_info["rank"]
    assert rel(G.weight.detach().cpu(), C.weight.detach()) < 1e-4
    T = TaskLossMatching().fit(on_gpu, {"epochs": 1, "batch_size": 128, "dm": {"k": 50}})
    assert T.weight.device.type == "cuda" and T.fit_info["loss"] is not None
    for extra in ({"precision": "float16"}, {"precision": "bfloat16", "channels_last": True}):
        M = TaskLossMatching().fit(on_gpu, {"epochs": 1, "batch_size": 128, "dm": {"k": 50}, **extra})
        assert M.weight.dtype == torch.float32 and M.fit_info["loss"] == pytest.approx(T.fit_info["loss"], rel=2e-2)


# -- registration --------------------------------------------------------------------------
def test_matchers_are_registered_and_import_no_torch():
    assert isinstance(stitchbench.get_plugin("dm"), DirectMatching)
    assert isinstance(stitchbench.get_plugin("tlm"), TaskLossMatching)
    kinds = {i.name: i.kind for i in stitchbench.list_plugins("matcher")}
    assert kinds.get("dm") == "matcher" and kinds.get("tlm") == "matcher"
    code = (
        "import sys, stitchbench_plugins.matchers.dm, stitchbench_plugins.matchers.tlm; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
