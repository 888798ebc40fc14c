"""Benchmarks of the matchers against their baselines (not part of the default test run).

    .venv/bin/python -m pytest benchmarks/test_bench_matchers.py --benchmark-only -s

(b) Direct matching: the streaming solvers (QR of [1, X, Y], and the centred normal
    equations) against numpy's pinv of the stacked rows, in time and in peak memory.
    Shapes (chosen for a 2-core CPU): K = 512 "images" of source activations (48, 16, 16)
    and target activations (32, 16, 16), i.e. 131,072 equations, 48 -> 32 channels, fed
    in batches of 32 images. Peak memory is the rise of the process's peak resident set
    (Linux VmHWM, reset through /proc/self/clear_refs) in a fresh subprocess per method,
    so it counts numpy's and torch's allocations alike; it is measured again at 2K images
    to show that the streaming solvers' memory does not grow with K.
(c) Task loss matching: one epoch of `tlm` against its floor, the receiver's forward and
    backward (plus T's Adam step) on source activations computed beforehand. Shapes: 2,048
    images 3x16x16, a 5-block conv net of width 16 with BatchNorm, batch 128. One cell
    alone (block 1 of one network to block 1 of another), and a matrix row (block 1 to
    each of the five blocks) trained together by ``fit_many`` as the pipeline trains it,
    against the sum of its cells' floors. Epoch times are TLM's own (``fit_info``
    ``seconds_per_epoch``: the DM initialisation and the one-off source cache are not in
    them; the cache's cost is printed apart); medians over interleaved rounds.

Everything is timed on one thread (see ``one_thread``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stitchbench.nn.network import StitchableNetwork


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Time on one core: this 2-core machine is shared, and OpenMP's spin-waiting makes
    two-thread timings erratic whenever another process runs. numpy's BLAS and torch are
    both limited, so the comparison stays fair."""
    from threadpoolctl import threadpool_limits

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(saved)


# -- (b) streaming DM vs pinv ---------------------------------------------------------------
K, BATCH, C1, C2, HW = 512, 32, 48, 32, 16


def batches(k: int = K):
    """The activations of ``k`` images batch by batch, generated on the fly (as a forward
    pass would)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(C2, C1, generator=g) / C1**0.5
    for _ in range(k // BATCH):
        x = torch.relu(torch.randn(BATCH, C1, HW, HW, generator=g) + 0.3)
        y = torch.einsum("oc,nchw->nohw", W, x) + 0.1 * torch.randn(BATCH, C2, HW, HW, generator=g)
        yield x, y


def solve_streaming(solver: str, data=None):
    from stitchbench_plugins.matchers._lstsq import make_accumulator

    from stitchbench.nn.stitching import to_rows

    acc = make_accumulator(solver, C1, C2)
    for x, y in data if data is not None else batches():
        acc.update(to_rows(x), to_rows(y))
    fit = acc.solve()
    return fit.weight.numpy(), fit.bias.numpy()


def solve_pinv(data=None):
    from stitchbench.nn.stitching import to_rows

    xs, ys = [], []
    for x, y in data if data is not None else batches():
        xs.append(to_rows(x).double().numpy())
        ys.append(to_rows(y).double().numpy())
    X, Y = np.concatenate(xs), np.concatenate(ys)
    del xs, ys
    A = np.hstack([X, np.ones((X.shape[0], 1))])
    theta = np.linalg.pinv(A, rtol=max(A.shape) * np.finfo(float).eps) @ Y
    return theta[:-1].T, theta[-1]


METHODS = {
    "stream_qr": lambda data=None: solve_streaming("qr", data),
    "stream_gram": lambda data=None: solve_streaming("gram", data),
    "pinv_stacked": solve_pinv,
}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_memory_mib(method: str, k: int = K) -> float:
    """Run ``method`` on ``k`` images in a fresh interpreter; its peak RSS rise in MiB."""
    out = subprocess.run(
        [sys.executable, __file__, "peak", method, str(k)], capture_output=True, text=True, check=True
    ).stdout
    return float(out.strip().splitlines()[-1])


def _best_of(fn, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS needs Linux /proc")
def test_bench_dm_streaming_vs_pinv(benchmark):
    data = list(batches())  # generated once, so the timings compare only the solves
    ref = np.column_stack(METHODS["pinv_stacked"](data))  # (q, p + 1): [W, b]
    for name in ("stream_qr", "stream_gram"):  # the same solution, to float64 accuracy
        got = np.column_stack(METHODS[name](data))
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-8, name

    benchmark.group = "dm solve"
    benchmark.pedantic(METHODS["stream_qr"], args=(data,), rounds=3, iterations=1)
    times = {name: _best_of(lambda f=f: f(data)) for name, f in METHODS.items()}
    peaks = {name: peak_memory_mib(name) for name in METHODS}
    peaks_2k = {name: peak_memory_mib(name, 2 * K) for name in METHODS}
    print(f"\n[dm] {K} images, {K * HW * HW} equations, {C1} -> {C2} channels, batches of {BATCH} images")
    for name in METHODS:
        print(
            f"[dm] {name:13s} time {times[name]:7.3f} s ({times[name] / times['pinv_stacked']:5.2f}x pinv)   "
            f"peak memory +{peaks[name]:7.1f} MiB ({peaks[name] / peaks['pinv_stacked']:5.3f}x pinv); "
            f"with {2 * K} images +{peaks_2k[name]:7.1f} MiB"
        )


# -- (c) a TLM epoch vs its floor --------------------------------------------------------------
N_TLM, WIDTH, BATCH_TLM = 2048, 16, 128


class SmallConvNet(StitchableNetwork):
    """(3, 16, 16) -> 5 conv blocks with BatchNorm (width w; 2w at 8x8) -> logits."""

    def __init__(self, w: int = WIDTH, num_classes: int = 10):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.stem = block(3, w, 1)
        self.blocks = nn.ModuleList(
            [
                block(w, w, 1),
                block(w, w, 1),
                block(w, 2 * w, 2),
                block(2 * w, 2 * w, 1),
                block(2 * w, 2 * w, 1),
            ]
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, num_classes))
        self.layer_names = [f"block{i}" for i in range(5)]


def _network(seed: int) -> SmallConvNet:
    torch.manual_seed(seed)
    net = SmallConvNet().train()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        for _ in range(3):
            net(torch.randn(256, 3, 16, 16))
    return net.eval()


def _problems(target_layers: list[str]):
    from stitchbench.nn.data import LoadedDataset, TensorSplit, random_crop_flip
    from stitchbench.nn.stitching import StitchingProblem

    g = torch.Generator().manual_seed(0)
    split = TensorSplit(
        torch.randn(N_TLM, 3, 16, 16, generator=g), torch.randint(0, 10, (N_TLM,), generator=g)
    )
    test = TensorSplit(torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g))
    data = LoadedDataset("bench", 10, (3, 16, 16), split, test, augment=random_crop_flip(padding=2))
    source, target = _network(0), _network(1)
    return [
        StitchingProblem(source=source, source_layer="block1", target=target, target_layer=t, data=data)
        for t in target_layers
    ]


def _floor(prob):
    """One epoch of the floor for one cell: the receiver's forward + backward and T's Adam
    step on the source activations of the (unaugmented) training split computed beforehand."""
    from stitchbench_plugins.matchers.dm import DirectMatching

    from stitchbench.nn.stitching import frozen

    layer = DirectMatching().fit(prob, {"k": 100})
    with torch.no_grad():
        H = prob.source.front(prob.data.train.images, prob.source_layer)
    labels = prob.data.train.labels
    stitched = prob.stitched(layer)
    optimiser = torch.optim.Adam(layer.parameters(), lr=1e-3, weight_decay=1e-5)

    def epoch():
        with frozen(prob.source, prob.target):
            stitched.train()
            order = torch.randperm(H.shape[0])
            for start in range(0, H.shape[0], BATCH_TLM):
                idx = order[start : start + BATCH_TLM]
                loss = F.cross_entropy(stitched.forward_from_source(H[idx]), labels[idx])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
            stitched.eval()

    return epoch


def test_bench_tlm_epoch_vs_floor(benchmark):
    """One cell alone (block1 -> block1), then a whole row (block1 -> each of the five
    blocks) trained together by ``fit_many``, against the sum of the row's floors."""
    from stitchbench_plugins.matchers.tlm import TaskLossMatching

    row = _problems([f"block{i}" for i in range(5)])
    cell = row[1]
    floors = {p.target_layer: _floor(p) for p in row}
    single = {
        "augmented (source recomputed)": {"augment": True},
        "no augmentation, cached": {"augment": False},
        "no augmentation, not cached": {"augment": False, "cache_source": False},
    }
    together = {
        "row augmented (source recomputed)": {"augment": True},
        "row no augmentation, not cached": {"augment": False, "cache_source": False},
    }
    tlm = TaskLossMatching()
    base = {"batch_size": BATCH_TLM, "epochs": 2, "dm": {"k": 100}}
    for f in floors.values():
        f()  # warm-up
    floor_times: dict[str, list[float]] = {name: [] for name in floors}
    epochs: dict[str, list[float]] = {name: [] for name in [*single, *together]}
    cache_seconds = 0.0
    for _ in range(3):  # interleaved, so that a busy machine slows every variant alike
        for name, f in floors.items():
            floor_times[name].append(_best_of(f, rounds=1))
        for name, extra in single.items():
            info = tlm.fit(cell, {**base, **extra}).fit_info
            epochs[name] += info["seconds_per_epoch"]
            cache_seconds = max(cache_seconds, info["cache_seconds"])
        for name, extra in together.items():
            layers = tlm.fit_many(row, {**base, **extra})
            assert {T.fit_info["trained_together"] for T in layers} == {len(row)}
            epochs[name] += layers[0].fit_info["seconds_per_epoch"]
    benchmark.group = "tlm epoch"
    benchmark.pedantic(floors[cell.target_layer], rounds=3, iterations=1)
    floor = {name: float(np.median(ts)) for name, ts in floor_times.items()}
    row_floor = sum(floor.values())
    print(f"\n[tlm] {N_TLM} images 3x16x16, width-{WIDTH} conv net, batch {BATCH_TLM}; medians of 3 rounds")
    print("[tlm] floor (receiver fwd+bwd + T's step, precomputed source), s/epoch: "
          + ", ".join(f"block1 -> {k} {v:.3f}" for k, v in floor.items()) + f"; row sum {row_floor:.3f}")
    for name in single:
        t = float(np.median(epochs[name]))
        f = floor[cell.target_layer]
        print(f"[tlm] one cell, {name:31s} {t:.3f} s/epoch ({t / f:.2f}x its floor)")
    for name in together:
        t = float(np.median(epochs[name]))
        print(f"[tlm] {len(row)} cells, {name:31s} {t:.3f} s/epoch ({t / row_floor:.2f}x the row's floors)")
    print(f"[tlm] building the source cache (once per fit): {cache_seconds:.3f} s")


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "peak":
    # Warm up (imports, BLAS/LAPACK initialisation) on a tiny problem, then measure.
    import stitchbench_plugins.matchers._lstsq  # noqa: F401

    np.linalg.pinv(np.ones((8, 3)))
    torch.linalg.qr(torch.ones(8, 3, dtype=torch.float64))
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    METHODS[sys.argv[2]](batches(int(sys.argv[3])))
    print((_status_kib("VmHWM") - before) / 1024)
