"""All-pairs LCKA + OPD for 2 networks x 8 ResNet-18 layers, against a naive baseline.

Run: ``.venv/bin/python -m pytest benchmarks/test_bench_indices.py --benchmark-only -s``

What is compared, in one run, on the same synthetic activations: the three matrices a
stitchbench run fills for two networks (intra net 1, intra net 2, inter 1 -> 2; 8 x 8
layers each, 192 pairs per index) with

* ``fast``: the plugins' ``matrix`` (each layer's Gram matrix / centring / pooling once);
* ``naive``: per pair, numpy float64, recomputing everything: flatten, Gram matrices
  K = XXᵀ, double centring HKH (Kornblith et al.'s recipe) for LCKA; arrange, centre,
  normalise, BᵀA and its nuclear norm for OPD.

The activations have the shapes of the CIFAR ResNet-18 blocks, (w, 32, 32) x 2,
(2w, 16, 16) x 2, (4w, 8, 8) x 2, (8w, 4, 4) x 2, float32 like a network's output. The
paper's width is w = 64; the default here is w = 16 (a quarter), so that the naive
baseline (which forms 384 Gram matrices of up to 1000 x 16384) finishes in about two
minutes on a 2-core machine. ``STITCHBENCH_BENCH_WIDTH=64`` runs the full width (about
1 GB of float32 activations per network; the baseline's Gram matrices then cost 4x more),
``STITCHBENCH_BENCH_N`` sets the number of examples (default 1000, the paper's).

On an oversubscribed machine multi-threaded OpenBLAS slows small and skinny products down
erratically (up to 100x); ``OPENBLAS_NUM_THREADS=1`` gives stable timings there.
"""

from __future__ import annotations

import os
import time
import tracemalloc

import numpy as np
import pytest
from stitchbench_plugins.indices.lcka import LinearCKA
from stitchbench_plugins.indices.opd import OrthogonalProcrustesDistance

import stitchbench

WIDTH = int(os.environ.get("STITCHBENCH_BENCH_WIDTH", "16"))
N = int(os.environ.get("STITCHBENCH_BENCH_N", "1000"))
SHAPES = [(m * WIDTH, s, s) for m, s in ((1, 32), (1, 32), (2, 16), (2, 16), (4, 8), (4, 8), (8, 4), (8, 4))]


def resnet_like(n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two 'networks' whose layers share an input-driven part (ReLU'd, float32)."""
    rng = np.random.default_rng(0)
    nets: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for shape in SHAPES:
        base = rng.standard_normal((n, *shape), dtype=np.float32)
        for k, net in enumerate(nets):
            perm = rng.permutation(shape[0])
            noise = rng.standard_normal((n, *shape), dtype=np.float32)
            net.append(np.maximum(base[:, perm] + (0.5 + 0.5 * k) * noise, 0, dtype=np.float32))
    return nets


# ------------------------------------------------------------------------- naive


def naive_lcka(a: np.ndarray, b: np.ndarray) -> float:
    x = a.reshape(len(a), -1).astype(np.float64)
    y = b.reshape(len(b), -1).astype(np.float64)
    kx, ky = x @ x.T, y @ y.T

    def centre(k: np.ndarray) -> np.ndarray:
        return k - k.mean(axis=0, keepdims=True) - k.mean(axis=1, keepdims=True) + k.mean()

    kx, ky = centre(kx), centre(ky)
    return float((kx * ky).sum() / (np.linalg.norm(kx) * np.linalg.norm(ky)))


def naive_opd(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape == b.shape:  # the reference arrangement: per position, else pooled
        x = a.transpose(0, 2, 3, 1).reshape(-1, a.shape[1]).astype(np.float64)
        y = b.transpose(0, 2, 3, 1).reshape(-1, b.shape[1]).astype(np.float64)
    else:
        x, y = a.astype(np.float64).mean(axis=(2, 3)), b.astype(np.float64).mean(axis=(2, 3))
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    return float(2 - 2 * np.linalg.svd(y.T @ x, compute_uv=False).sum())


# ------------------------------------------------------------------------- drivers


def pipeline_pairs(net1, net2):
    """The (sources, targets) of the three matrices of a two-network run."""
    return [(net1, net1), (net2, net2), (net1, net2)]


def naive_all(net1, net2) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {}
    for name, fn in (("lcka", naive_lcka), ("opd", naive_opd)):
        t = time.perf_counter()
        out[name] = [np.array([[fn(a, b) for b in tg] for a in src]) for src, tg in pipeline_pairs(net1, net2)]
        TIMES[("naive", name)] = time.perf_counter() - t
    return out


def fast_all(net1, net2) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {}
    for name, idx in (("lcka", LinearCKA()), ("opd", OrthogonalProcrustesDistance())):
        ctx = stitchbench.IndexContext(params=idx.params)
        t = time.perf_counter()
        out[name] = [idx.matrix(src, tg, ctx) for src, tg in pipeline_pairs(net1, net2)]
        TIMES[("fast", name)] = time.perf_counter() - t
    return out


TIMES: dict[tuple[str, str], float] = {}


def measured(fn, *args):
    """(result, seconds, peak traced bytes) of one call."""
    tracemalloc.start()
    t = time.perf_counter()
    try:
        result = fn(*args)
        seconds = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, seconds, peak


@pytest.fixture(scope="module")
def networks():
    return resnet_like(N)


def test_all_pairs_lcka_opd(benchmark, networks):
    net1, net2 = networks
    act_mb = sum(a.nbytes for a in net1 + net2) / 2**20
    naive, naive_s, naive_peak = measured(naive_all, net1, net2)
    naive_times = {k: TIMES[("naive", k)] for k in ("lcka", "opd")}
    fast, fast_s, fast_peak = measured(fast_all, net1, net2)
    fast_times = {k: TIMES[("fast", k)] for k in ("lcka", "opd")}
    # the pytest-benchmark record of the fast path (one round, no tracemalloc)
    benchmark.pedantic(fast_all, args=(net1, net2), rounds=1, iterations=1)

    for name in ("lcka", "opd"):
        for m_fast, m_naive in zip(fast[name], naive[name]):
            np.testing.assert_allclose(m_fast, m_naive, atol=1e-8, rtol=0)
    ratio = naive_s / fast_s
    print(
        f"\n[indices benchmark] 2 networks x 8 ResNet-18 layers (width {WIDTH}, n = {N}, "
        f"{act_mb:.0f} MiB float32 activations); 3 matrices x 64 pairs per index\n"
        f"  naive : {naive_s:8.2f} s (lcka {naive_times['lcka']:.2f} s, opd {naive_times['opd']:.2f} s), "
        f"peak traced memory {naive_peak / 2**20:8.1f} MiB\n"
        f"  fast  : {fast_s:8.2f} s (lcka {fast_times['lcka']:.2f} s, opd {fast_times['opd']:.2f} s), "
        f"peak traced memory {fast_peak / 2**20:8.1f} MiB\n"
        f"  speed ratio naive/fast: {ratio:.1f}x (lcka {naive_times['lcka'] / fast_times['lcka']:.1f}x, "
        f"opd {naive_times['opd'] / fast_times['opd']:.1f}x); values equal to 1e-8"
    )
    assert ratio >= 5, f"the all-pairs path is only {ratio:.1f}x faster than the naive baseline"
