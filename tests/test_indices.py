"""The bundled similarity indices lcka, pwcca and opd (issue 4).

Independent references in this file are written from the definitions (QR-based CCA,
explicit Procrustes rotation, dense numpy) rather than from the code under test.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes
from scipy.stats import ortho_group
from stitchbench_plugins.indices import _linalg
from stitchbench_plugins.indices._arrange import Arranged, arrange, pair_layouts
from stitchbench_plugins.indices._linalg import CrossMoments, LayerStatistics
from stitchbench_plugins.indices.lcka import LinearCKA
from stitchbench_plugins.indices.opd import OrthogonalProcrustesDistance
from stitchbench_plugins.indices.pwcca import PWCCA

import stitchbench

INDICES = {"lcka": LinearCKA, "opd": OrthogonalProcrustesDistance, "pwcca": PWCCA}


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def related(n: int = 300, p1: int = 12, p2: int = 9, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two generic, partly related (n, p) matrices with non-zero means."""
    r = rng(seed)
    z = r.standard_normal((n, 6))
    a = z @ r.standard_normal((6, p1)) + 0.5 * r.standard_normal((n, p1)) + 3.0
    b = z @ r.standard_normal((6, p2)) + 0.8 * r.standard_normal((n, p2)) - 1.0
    return a, b


def conv_pair(seed: int = 0, n: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two conv activations of equal shape and one of another shape (relu'd)."""
    r = rng(seed)
    a = np.maximum(r.standard_normal((n, 4, 3, 3)), 0)
    b = np.maximum(a + 0.5 * r.standard_normal(a.shape), 0)
    c = np.maximum(r.standard_normal((n, 6, 2, 2)) + a.mean(axis=(1, 2, 3))[:, None, None, None], 0)
    return a, b, c


# --------------------------------------------------------------------- independent refs


def centred(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(axis=0)


def ref_lcka(a: np.ndarray, b: np.ndarray) -> float:
    a, b = centred(a), centred(b)
    return float(np.linalg.norm(b.T @ a) ** 2 / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)))


def ref_cca(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Canonical correlations and PWCCA weights (k = min(p1, p2) directions) via QR."""
    a, b = centred(a), centred(b)
    qa, _ = np.linalg.qr(a)
    qb, _ = np.linalg.qr(b)
    u, rho, _ = np.linalg.svd(qa.T @ qb, full_matrices=False)
    h = qa @ u  # unit-norm canonical variates of A
    alpha = np.abs(h.T @ a).sum(axis=1)
    return rho, alpha


def ref_pwcca(a: np.ndarray, b: np.ndarray) -> float:
    rho, alpha = ref_cca(a, b)
    return float(1 - alpha @ rho / alpha.sum())


def ref_opd_rotation(a: np.ndarray, b: np.ndarray) -> float:
    """OPD as the residual after the explicit optimal rotation (needs p1 == p2)."""
    a, b = centred(a), centred(b)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    r, _ = orthogonal_procrustes(a, b)
    return float(np.linalg.norm(b - a @ r) ** 2)


# --------------------------------------------------------------------- registration


def test_plugins_are_registered_with_their_direction():
    for name, cls in INDICES.items():
        idx = stitchbench.get_plugin(name)
        assert isinstance(idx, cls)
        assert idx.kind == "similarity_index"
    assert stitchbench.get_plugin("lcka").higher_is_more_similar is True
    assert stitchbench.get_plugin("pwcca").higher_is_more_similar is False
    assert stitchbench.get_plugin("opd").higher_is_more_similar is False


def test_plugin_modules_import_neither_torch_nor_scipy():
    code = (
        "import sys\n"
        "import stitchbench_plugins.indices.lcka, stitchbench_plugins.indices.opd, "
        "stitchbench_plugins.indices.pwcca\n"
        "print('torch' in sys.modules, 'scipy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_compute_returns_python_float():
    a, b = related()
    for cls in INDICES.values():
        assert type(cls().compute(a, b)) is float


# --------------------------------------------------------------------- values


def test_kornblith_demo_value():
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    for form in ("auto", "gram", "feature"):
        assert round(LinearCKA(form=form).compute(x, y), 5) == 0.55761
    assert LinearCKA().compute(x, y) == pytest.approx(ref_lcka(x, y), abs=1e-13)


@pytest.mark.parametrize("make", [lambda: related()[0], lambda: conv_pair()[0]])
def test_identical_inputs(make):
    x = make()
    assert LinearCKA().compute(x, x) == pytest.approx(1.0, abs=1e-12)
    assert OrthogonalProcrustesDistance().compute(x, x) == pytest.approx(0.0, abs=1e-12)
    assert PWCCA().compute(x, x) == pytest.approx(0.0, abs=1e-12)
    # a copy is a different object: no shared statistics, same answer
    y = x.copy()
    assert LinearCKA().compute(x, y) == pytest.approx(1.0, abs=1e-12)
    assert OrthogonalProcrustesDistance().compute(x, y) == pytest.approx(0.0, abs=1e-12)
    assert PWCCA().compute(x, y) == pytest.approx(0.0, abs=1e-12)


def test_lcka_and_opd_invariant_to_rotation_and_scaling():
    a, b = related(p1=10, p2=10)
    q = ortho_group.rvs(10, random_state=3)
    for cls in (LinearCKA, OrthogonalProcrustesDistance):
        v = cls().compute(a, b)
        assert cls().compute(a @ q, b) == pytest.approx(v, abs=1e-12)
        assert cls().compute(a, 7.5 * b) == pytest.approx(v, abs=1e-12)
        assert cls().compute(0.01 * (a @ q), b) == pytest.approx(v, abs=1e-12)
    # not invariant to a generic invertible map (this is what the two tests above can detect)
    m = rng(4).standard_normal((10, 10))
    assert abs(LinearCKA().compute(a @ m, b) - LinearCKA().compute(a, b)) > 1e-3


def test_cca_invariant_to_invertible_maps():
    a, b = related()
    r = rng(5)
    ma = r.standard_normal((a.shape[1], a.shape[1]))
    mb = r.standard_normal((b.shape[1], b.shape[1]))
    base = PWCCA().canonical(a, b)
    mapped = PWCCA().canonical(a @ ma, b @ mb + 4.0)
    np.testing.assert_allclose(mapped.rho, base.rho, atol=1e-10)
    # the weights come from A's neurons: a map of B alone leaves PWCCA unchanged
    assert PWCCA().compute(a, b @ mb) == pytest.approx(base.distance, abs=1e-10)


def test_opd_equals_residual_after_explicit_rotation():
    for seed in range(3):
        a, b = related(p1=8, p2=8, seed=seed)
        assert OrthogonalProcrustesDistance().compute(a, b) == pytest.approx(ref_opd_rotation(a, b), abs=1e-12)


@pytest.mark.parametrize("p1,p2", [(5, 9), (9, 9), (9, 5)])
def test_pwcca_matches_qr_reference(p1, p2):
    a, b = related(p1=p1, p2=p2)
    res = PWCCA().canonical(a, b)
    rho, alpha = ref_cca(a, b)
    assert res.rho.shape == (min(p1, p2),)  # the p1 > p2 rule: only matched directions
    np.testing.assert_allclose(res.rho, rho, atol=1e-10)
    np.testing.assert_allclose(res.weights, alpha / alpha.sum(), atol=1e-10)
    assert res.distance == pytest.approx(ref_pwcca(a, b), abs=1e-10)


def test_pwcca_is_not_symmetric():
    a, b = related()
    assert abs(PWCCA().compute(a, b) - PWCCA().compute(b, a)) > 1e-3
    assert PWCCA().compute(a, b) > 0


def test_float32_and_float64_agree():
    a, b = related(seed=7)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    for cls in INDICES.values():
        assert cls().compute(a32, b32) == pytest.approx(cls().compute(a32.astype(np.float64), b32.astype(np.float64)),
                                                      abs=1e-12)
        assert cls().compute(a32, b32) == pytest.approx(cls().compute(a, b), abs=1e-6)


def test_gram_and_feature_forms_agree():
    a, b = related(n=60, p1=20, p2=30)
    for cls in (LinearCKA, OrthogonalProcrustesDistance):
        g, f = cls(form="gram").compute(a, b), cls(form="feature").compute(a, b)
        assert g == pytest.approx(f, abs=1e-10)
    # conv and token layouts through column blocks (Gram) and row blocks (feature)
    a, b, _ = conv_pair()
    t1, t2 = rng(8).standard_normal((2, 30, 5, 4))
    for x, y, arr in ((a, b, "reference"), (a, b, "pooled"), (t1, t2, "reference"), (t1, t2, "flatten")):
        for cls in (LinearCKA, OrthogonalProcrustesDistance):
            g = cls(form="gram", arrangement=arr).compute(x, y)
            assert g == pytest.approx(cls(form="feature", arrangement=arr).compute(x, y), abs=1e-10)
    # p > n: auto picks the Gram form; it still equals the dense reference
    a, b = related(n=30, p1=50, p2=40)
    assert LinearCKA().compute(a, b) == pytest.approx(ref_lcka(a, b), abs=1e-12)
    assert OrthogonalProcrustesDistance().compute(a, b) == pytest.approx(
        OrthogonalProcrustesDistance(form="feature").compute(a, b), abs=1e-10)


# --------------------------------------------------------------------- matrix


def layers(n: int = 50, seed: int = 1) -> list[np.ndarray]:
    r = rng(seed)
    x = np.maximum(r.standard_normal((n, 3, 4, 4)), 0)
    return [
        x,
        np.maximum(x + 0.3 * r.standard_normal(x.shape), 0),
        np.maximum(r.standard_normal((n, 5, 2, 2)) + x[:, :1, ::2, ::2], 0).astype(np.float32),
        np.maximum(r.standard_normal((n, 5, 2, 2)), 0),
        r.standard_normal((n, 7, 6)),  # tokens
    ]


@pytest.mark.parametrize("name", ["lcka", "opd", "pwcca"])
@pytest.mark.parametrize("arrangement", ["reference", "pooled"])
def test_matrix_equals_pairwise_compute(name, arrangement):
    cls = INDICES[name]
    idx = cls(arrangement=arrangement)
    src, tgt = layers(seed=1), layers(seed=2)
    ctx = stitchbench.IndexContext(params=idx.params)
    for sources, targets in ((src, src), (src, tgt)):
        m = idx.matrix(sources, targets, ctx)
        expected = np.array([[idx.compute(a, b) for b in targets] for a in sources])
        np.testing.assert_allclose(m, expected, atol=1e-10, rtol=0)


def test_matrix_reads_each_layer_once(monkeypatch):
    """All-pairs matrices compute per-layer statistics once: no block of any layer's
    activations is read twice (Gram form: column blocks; feature form: row blocks)."""
    reads: list[tuple] = []
    for method, kind in (("block", "rows"), ("column_block", "cols")):
        original = getattr(Arranged, method)

        def counted(self, lo, hi, _original=original, _kind=kind):
            reads.append((id(self.raw), self.layout, _kind, lo))
            return _original(self, lo, hi)

        monkeypatch.setattr(Arranged, method, counted)
    r = rng(0)
    cases = [
        (LinearCKA(), [r.standard_normal((20, 30)) for _ in range(4)], None),  # p > n: Gram form
        (LinearCKA(), [r.standard_normal((60, 5)) for _ in range(4)], None),  # feature form
        (LinearCKA(), [r.standard_normal((20, 30)) for _ in range(3)], [r.standard_normal((20, 7)) for _ in range(2)]),
        (OrthogonalProcrustesDistance(), layers(seed=1), layers(seed=2)),  # per position and pooled
        (OrthogonalProcrustesDistance(), layers(seed=1), "same"),
        (PWCCA(), layers(n=80, seed=1), layers(n=80, seed=2)),
    ]
    for idx, src, tgt in cases:
        reads.clear()
        tgt = src if tgt in (None, "same") else tgt
        m = idx.matrix(src, tgt, stitchbench.IndexContext(params=idx.params))
        assert np.isfinite(m).all()
        assert reads and len(reads) == len(set(reads)), f"{idx.name}: a layer was read more than once"


def test_matrix_computes_each_gram_once(monkeypatch):
    computed = []
    original = LayerStatistics.gram

    def counted(self):
        if self._gram is None:
            computed.append(id(self))
        return original(self)

    monkeypatch.setattr(LayerStatistics, "gram", counted)
    r = rng(0)
    big = [r.standard_normal((20, 30)) for _ in range(4)]
    LinearCKA().matrix(big, big, stitchbench.IndexContext(params=LinearCKA.Params()))
    assert len(computed) == 4
    other = [r.standard_normal((20, 30)) for _ in range(3)]
    OrthogonalProcrustesDistance().matrix(big, other, stitchbench.IndexContext(params=None))
    assert len(computed) == 4 + 7


def test_run_wide_shared_context_computes_each_layer_once_across_matrices(monkeypatch):
    """As in a run: intra A, intra B and inter A->B share one ``shared`` mapping, so the
    2 x L layers' Gram matrices are computed 2 x L times in all, not once per matrix."""
    computed = []
    original = LayerStatistics.gram

    def counted(self):
        if self._gram is None:
            computed.append(id(self))
        return original(self)

    monkeypatch.setattr(LayerStatistics, "gram", counted)
    r = rng(1)
    net_a = [r.standard_normal((20, 30)) for _ in range(3)]
    net_b = [r.standard_normal((20, 30)) for _ in range(3)]
    shared: dict = {}
    idx = LinearCKA()
    ctx = lambda: stitchbench.IndexContext(params=LinearCKA.Params(), shared=shared)
    intra_a = idx.matrix(net_a, net_a, ctx())
    idx.matrix(net_b, net_b, ctx())
    inter = idx.matrix(net_a, net_b, ctx())
    assert len(computed) == 6
    assert inter[1, 2] == pytest.approx(idx.compute(net_a[1], net_b[2]), abs=1e-12)
    assert intra_a[0, 0] == pytest.approx(1.0, abs=1e-12)


def test_matrix_uses_context_params():
    a, b = conv_pair()[:2]
    ref = OrthogonalProcrustesDistance().matrix([a], [b], stitchbench.IndexContext(params=None))[0, 0]
    pooled = OrthogonalProcrustesDistance().matrix(
        [a], [b], stitchbench.IndexContext(params=OrthogonalProcrustesDistance.Params(arrangement="pooled")))[0, 0]
    assert ref == pytest.approx(OrthogonalProcrustesDistance().compute(a, b), abs=1e-14)
    assert pooled == pytest.approx(OrthogonalProcrustesDistance(arrangement="pooled").compute(a, b), abs=1e-14)
    assert abs(ref - pooled) > 1e-3


# --------------------------------------------------------------------- streaming


@pytest.mark.parametrize("name", ["lcka", "opd", "pwcca"])
def test_streaming_equals_one_shot(name):
    a, b, c = conv_pair(n=61)
    idx = INDICES[name]()
    for x, y in ((a, b), (a, c), (c, a)):  # per position, pooled
        batches = [(x[i:i + 7], y[i:i + 7]) for i in range(0, len(x), 7)]
        assert idx.compute_streaming(batches) == pytest.approx(idx.compute(x, y), abs=1e-10)


def test_small_blocks_equal_one_block():
    a, b = related(n=97, p1=6, p2=11)
    for cls in INDICES.values():
        tiny = cls(block_elements=1024).compute(a, b)  # 1024 elements per block
        assert tiny == pytest.approx(cls(block_elements=10**8).compute(a, b), abs=1e-12)


def test_cross_moments_match_two_pass():
    a, b = related(n=101)
    acc = CrossMoments(2, "all")
    for i in range(0, 101, 13):
        acc.update(a[i:i + 13], b[i:i + 13])
    np.testing.assert_allclose(acc.mean(0), a.mean(0), atol=1e-13)
    np.testing.assert_allclose(acc.comoment(0, 1), centred(a).T @ centred(b), atol=1e-10)
    np.testing.assert_allclose(acc.comoment(1, 0), centred(b).T @ centred(a), atol=1e-10)
    np.testing.assert_allclose(acc.comoment(1, 1), centred(b).T @ centred(b), atol=1e-10)
    np.testing.assert_allclose(acc.colsq(0), (centred(a) ** 2).sum(0), rtol=1e-12)


def test_streaming_centring_is_stable():
    """A mean 10⁷ times the spread: AᵀA − n·μμᵀ loses most digits, the pairwise update not."""
    r = rng(11)
    x = 1e7 + r.standard_normal((4000, 3))
    exact = centred(x).T @ centred(x)  # two-pass (centre first), the accurate reference
    acc = CrossMoments(1, "all")
    for i in range(0, len(x), 500):
        acc.update(x[i:i + 500])
    ours = np.abs(acc.comoment(0, 0) - exact).max() / np.abs(exact).max()
    mu = x.mean(0)
    naive = np.abs(x.T @ x - len(x) * np.outer(mu, mu) - exact).max() / np.abs(exact).max()
    assert ours < 1e-9
    assert naive > 1e-4  # the cancellation this guards against is real


# --------------------------------------------------------------------- arrangements


def hand_pair():
    """Conv (2, 1, 1, 2): A's positions read 1 2 | 3 4, B's 1 3 | 2 4 (example | example)."""
    a = np.array([[[[1.0, 2.0]]], [[[3.0, 4.0]]]])
    b = np.array([[[[1.0, 3.0]]], [[[2.0, 4.0]]]])
    return a, b


def test_reference_arrangement_by_hand():
    a, b = hand_pair()
    # equal shapes: per position, rows example-major
    pa, pb = arrange(a, b, "reference", "cca")
    np.testing.assert_array_equal(pa, [[1], [2], [3], [4]])
    np.testing.assert_array_equal(pb, [[1], [3], [2], [4]])
    # centred a = (-1.5, -.5, .5, 1.5), b = (-1.5, .5, -.5, 1.5): a·b = 4, |a|² = |b|² = 5, r = 0.8
    assert OrthogonalProcrustesDistance().compute(a, b) == pytest.approx(2 - 2 * 0.8, abs=1e-14)
    assert PWCCA().compute(a, b) == pytest.approx(1 - 0.8, abs=1e-14)
    # different shapes (B as 2 x 1 instead of 1 x 2): pooled, means (1.5, 3.5) and (2, 3): r = 1
    b2 = b.reshape(2, 1, 2, 1)
    pa, pb = arrange(a, b2, "reference", "cca")
    np.testing.assert_array_equal(pa, [[1.5], [3.5]])
    np.testing.assert_array_equal(pb, [[2.0], [3.0]])
    assert OrthogonalProcrustesDistance().compute(a, b2) == pytest.approx(0.0, abs=1e-14)
    # the consistent variant pools the equal-shape pair too
    assert OrthogonalProcrustesDistance(arrangement="pooled").compute(a, b) == pytest.approx(0.0, abs=1e-14)
    # LCKA's reference flattens: rows (1, 2), (3, 4) and (1, 3), (2, 4)
    fa, fb = arrange(a, b, "reference", "cka")
    np.testing.assert_array_equal(fa, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(fb, [[1, 3], [2, 4]])


def test_token_arrangement_by_hand():
    a = np.array([[[1.0], [2.0]], [[3.0], [4.0]]])  # (n=2, T=2, D=1)
    b = np.array([[[1.0], [3.0]], [[2.0], [4.0]]])
    pa, pb = arrange(a, b, "reference", "cca")
    np.testing.assert_array_equal(pa, [[1], [2], [3], [4]])
    np.testing.assert_array_equal(pb, [[1], [3], [2], [4]])
    assert OrthogonalProcrustesDistance().compute(a, b) == pytest.approx(0.4, abs=1e-14)
    # equal token counts, different widths: still per token
    wide = np.concatenate([b, 2 * b + 1], axis=2)
    assert pair_layouts(a.shape, wide.shape, "reference", "cca") == ("positions", "positions")
    # different token counts: mean over tokens (1.5, 3.5) vs (2, 3, 4)/3... here (2, 8/3)
    b3 = np.array([[[1.0], [3.0], [2.0]], [[2.0], [4.0], [2.0]]])
    pa, pb = arrange(a, b3, "reference", "cca")
    np.testing.assert_array_equal(pa, [[1.5], [3.5]])
    np.testing.assert_allclose(pb, [[2.0], [8 / 3]])
    # mixed conv and tokens, and 2-D inputs
    assert pair_layouts((5, 2, 3, 3), (5, 9, 2), "reference", "cca") == ("pooled", "pooled")
    assert pair_layouts((5, 2, 3, 3), (5, 4), "reference", "cca") == ("pooled", "matrix")
    assert pair_layouts((5, 2, 3, 3), (5, 2, 3, 3), "flatten", "cca") == ("flatten", "flatten")
    assert pair_layouts((5, 2, 3, 3), (5, 9, 2), "reference", "cka") == ("flatten", "flatten")


def test_conv_arrangement_matches_dense_reference():
    a, b, c = conv_pair()
    per_pos = lambda x: x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])
    assert OrthogonalProcrustesDistance().compute(a, b) == pytest.approx(
        OrthogonalProcrustesDistance().compute(per_pos(a), per_pos(b)), abs=1e-12)
    assert PWCCA().compute(a, c) == pytest.approx(ref_pwcca(a.mean(axis=(2, 3)), c.mean(axis=(2, 3))), abs=1e-10)
    assert LinearCKA().compute(a, c) == pytest.approx(ref_lcka(a.reshape(len(a), -1), c.reshape(len(c), -1)),
                                                      abs=1e-12)


def test_reference_arrangement_can_prefer_a_less_related_layer():
    """Why the consistent ``pooled`` variant exists (docs/indices.md): under the reference
    rule the corresponding layer (equal shape) is compared per position, a less related
    layer of another resolution pooled, and the pooled number wins."""
    r = rng(0)
    n = 300
    img = r.standard_normal((n, 8, 8, 8)) + r.standard_normal((n, 8, 1, 1))
    a = np.maximum(img + 0.5 * r.standard_normal(img.shape), 0)
    b = np.maximum(img[:, ::-1] + 0.5 * r.standard_normal(img.shape), 0)  # same layer, other net
    c = np.maximum(img.reshape(n, 8, 4, 2, 4, 2).mean(axis=(3, 5)) + 1.5 * r.standard_normal((n, 8, 4, 4)), 0)
    for cls in (OrthogonalProcrustesDistance, PWCCA):
        assert cls().compute(a, b) > cls().compute(a, c)  # reference: the wrong layer looks closer
        assert cls(arrangement="pooled").compute(a, b) < cls(arrangement="pooled").compute(a, c)


# --------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("name", ["lcka", "opd", "pwcca"])
def test_different_n_names_both_shapes(name):
    with pytest.raises(ValueError, match=r"\(30, 4\).*\(31, 4\)"):
        INDICES[name]().compute(np.ones((30, 4)), np.ones((31, 4)))


@pytest.mark.parametrize("name", ["lcka", "opd", "pwcca"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises(name, bad):
    a, b = related()
    a = a.copy()
    a[17, 3] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        INDICES[name]().compute(a, b)
    with pytest.raises(ValueError, match="NaN or inf"):
        INDICES[name]().compute(b, a)
    conv = np.ones((10, 2, 3, 3))
    conv[4, 1, 2, 0] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        INDICES[name]().compute(conv, rng().standard_normal((10, 2, 2, 2)))  # pooled path


def test_constant_columns_pwcca_rule():
    a, b = related()
    a_const = np.column_stack([a[:, :4], np.full(len(a), 2.5), a[:, 4:]])
    with pytest.raises(ValueError, match="constant"):
        PWCCA(constant_columns="raise").compute(a_const, b)
    # documented rule: a constant column is dropped, which is exactly the result without it
    assert PWCCA().compute(a_const, b) == pytest.approx(PWCCA().compute(a, b), abs=1e-10)
    assert PWCCA().compute(b, a_const) == pytest.approx(PWCCA().compute(b, a), abs=1e-10)
    # LCKA and OPD: a constant column contributes nothing after centring
    for cls in (LinearCKA, OrthogonalProcrustesDistance):
        assert cls().compute(a_const, b) == pytest.approx(cls().compute(a, b), abs=1e-12)


@pytest.mark.parametrize("name", ["lcka", "opd", "pwcca"])
@pytest.mark.parametrize("form", ["gram", "feature"])
def test_all_constant_input_raises(name, form):
    a, b = related(n=40)
    const = np.full_like(a, 0.1)  # 0.1 is not exact in binary: centring leaves rounding dust
    kwargs = {} if name == "pwcca" else {"form": form}
    with pytest.raises(ValueError, match="constant"):
        INDICES[name](**kwargs).compute(const, b)
    with pytest.raises(ValueError, match="constant"):
        INDICES[name](**kwargs).compute(b, const)


def test_collinear_columns_raise_for_cca():
    a, b = related()
    dup = np.column_stack([a, a[:, 0] * 2 - a[:, 1]])
    with pytest.raises(ValueError, match="linearly dependent"):
        PWCCA().compute(dup, b)


def test_cca_needs_more_rows_than_columns():
    r = rng(2)
    a = r.standard_normal((20, 8, 2, 2))  # flattened: (20, 32)
    b = r.standard_normal((20, 8, 1, 1))
    with pytest.raises(ValueError, match=r"\(20, 8, 2, 2\).*\(20, 32\).*\(20, 8, 1, 1\)"):
        PWCCA(arrangement="flatten").compute(a, b)
    with pytest.raises(ValueError, match=r"\(10, 12\).*\(10, 3\)"):
        PWCCA().compute(r.standard_normal((10, 12)), r.standard_normal((10, 3)))
    with pytest.raises(ValueError, match=r"\(12, 12\)"):  # n == p also raises
        PWCCA().compute(r.standard_normal((12, 12)), r.standard_normal((12, 3)))
    # reduction only when asked: then a finite value
    v = PWCCA(arrangement="flatten", reduce_to=5).compute(a, b)
    assert np.isfinite(v) and 0 <= v <= 1
    with pytest.raises(ValueError, match="reduce_to=20"):
        PWCCA(arrangement="flatten", reduce_to=20).compute(a, b)


def test_reduce_to_equals_cca_of_principal_component_scores():
    r = rng(9)
    a = r.standard_normal((25, 40)) + r.standard_normal((25, 1))  # p > n: Gram-form reduction
    b = r.standard_normal((25, 8))  # p < n: covariance-form reduction

    def scores(x, k):
        u, s, _ = np.linalg.svd(centred(x), full_matrices=False)
        return u[:, :k] * s[:k]

    for k in (3, 6):
        expect = ref_pwcca(scores(a, k), scores(b, k))
        assert PWCCA(reduce_to=k).compute(a, b) == pytest.approx(expect, abs=1e-9)
        expect = ref_pwcca(scores(b, k), scores(a, k))
        assert PWCCA(reduce_to=k).compute(b, a) == pytest.approx(expect, abs=1e-9)


def test_torch_tensors_accepted():
    torch = pytest.importorskip("torch")
    a, b, c = conv_pair()
    for cls in INDICES.values():
        ta = torch.tensor(a, dtype=torch.float64, requires_grad=True)
        assert cls().compute(ta, torch.from_numpy(b)) == pytest.approx(cls().compute(a, b), abs=1e-14)
        assert cls().compute(torch.from_numpy(a).float(), c) == pytest.approx(cls().compute(a, c), abs=1e-6)
        got = cls().compute(torch.from_numpy(a).bfloat16(), c)
        assert got == pytest.approx(cls().compute(a, c), abs=5e-2)


def test_bad_shapes_and_params():
    with pytest.raises(ValueError, match="expected"):
        LinearCKA().compute(np.ones((4, 2, 2, 2, 2)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="real"):
        LinearCKA().compute(np.ones((4, 3), dtype=complex), np.ones((4, 3)))
    with pytest.raises(ValueError):  # pydantic: unknown option
        OrthogonalProcrustesDistance(arrangement="per-position")
    with pytest.raises(ValueError):
        PWCCA(reduce_to=0)


def test_linalg_helpers():
    assert _linalg.prefer_gram(10, 11, 3, "auto") and not _linalg.prefer_gram(10, 10, 3, "auto")
    assert _linalg.nuclear_norm(np.diag([3.0, -4.0])) == 7.0


def test_positions_arrangement_compares_every_position_whatever_the_channels():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(30, 6, 2, 2))
    b = rng.normal(size=(30, 3, 2, 2))
    assert pair_layouts(a.shape, b.shape, "positions", "cca") == ("positions", "positions")
    assert pair_layouts(a.shape, b.shape, "reference", "cca") == ("pooled", "pooled")  # shapes differ
    got_a, got_b = arrange(a, b, "positions")
    np.testing.assert_array_equal(got_a, a.transpose(0, 2, 3, 1).reshape(-1, 6))
    np.testing.assert_array_equal(got_b, b.transpose(0, 2, 3, 1).reshape(-1, 3))
    with pytest.raises(ValueError, match="as many positions"):
        pair_layouts((30, 6, 2, 2), (30, 6, 4, 4), "positions", "cca")
    with pytest.raises(ValueError, match="as many positions"):
        pair_layouts((30, 6, 2, 2), (30, 24), "positions", "cca")


def test_pwcca_ding_convention_takes_rank_deficient_sides_and_no_reduction():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(200, 6))
    low = a[:, :2] @ rng.normal(size=(2, 6))  # rank 2 in 6 columns
    with pytest.raises(ValueError, match="linearly dependent"):
        PWCCA().compute(a, low)
    d = PWCCA(convention="ding").compute(a, low)
    assert 0 < d < 1
    with pytest.raises(Exception, match="reduce_to"):
        PWCCA(convention="ding", reduce_to=3)


# --------------------------------------------------------------------- dm_struct reductions


def _affine_lstsq(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares y ≈ x W + b, written out (numpy lstsq on [x, 1])."""
    sol = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y, rcond=None)[0]
    return sol[:-1], sol[-1]


def _dm_struct_case(seed: int = 7, n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) source and (n, 2) target: partly affine, with a scale that grows along the rows
    (so that batches of different sizes weigh differently)."""
    r = rng(seed)
    x = r.standard_normal((n, 3))
    y = x @ r.standard_normal((3, 2)) + 0.5 + 0.7 * r.standard_normal((n, 2)) * np.linspace(0.2, 3.0, n)[:, None]
    return x, y


def test_dm_struct_per_batch_is_the_mean_of_batch_ratios_with_a_partial_last_batch():
    # (1e-6: the dm plugin's layer holds the float64 solution in float32 parameters)
    from stitchbench_plugins.indices.dm_struct import DMStruct

    x, y = _dm_struct_case()
    w, b = _affine_lstsq(x, y)
    err = x @ w + b - y
    # batches of 4: rows 0-3, 4-7 and the partial 8-9, each ratio weighted equally
    ratios = [float((err[s:e] ** 2).sum() / (y[s:e] ** 2).sum()) for s, e in ((0, 4), (4, 8), (8, 10))]
    per_batch = float(np.mean(ratios))
    pooled = float((err**2).sum() / (y**2).sum())
    idx = DMStruct()
    assert idx.compute(x, y, {"reduction": "per_batch", "batch_size": 4}) == pytest.approx(per_batch, rel=1e-6)
    assert idx.compute(x, y) == pytest.approx(pooled, rel=1e-6)  # the default: one ratio of sums
    assert idx.compute(x, y, {"reduction": "pooled", "batch_size": 4}) == pytest.approx(pooled, rel=1e-6)
    assert abs(per_batch - pooled) > 0.01 * pooled  # the case tells the two apart
    # one batch holding every example is the pooled ratio
    assert idx.compute(x, y, {"reduction": "per_batch", "batch_size": 10}) == pytest.approx(pooled, rel=1e-6)


def test_dm_struct_matrix_fits_on_the_train_sample_and_reduces_the_test_rows():
    from stitchbench_plugins.indices.dm_struct import DMStruct

    x, y = _dm_struct_case(seed=8, n=23)
    x_tr, y_tr = _dm_struct_case(seed=9, n=50)
    w, b = _affine_lstsq(x_tr, y_tr)
    err = x @ w + b - y
    bounds = [(s, min(s + 10, 23)) for s in range(0, 23, 10)]  # 10, 10, 3
    want = {"per_batch": float(np.mean([(err[s:e] ** 2).sum() / (y[s:e] ** 2).sum() for s, e in bounds])),
            "pooled": float((err**2).sum() / (y**2).sum())}

    def sample(side: str, n: int) -> list[np.ndarray]:
        assert n == 50
        return [x_tr] if side == "source" else [y_tr]

    idx = DMStruct()
    for reduction, value in want.items():
        ctx = stitchbench.IndexContext(params=DMStruct.Params(k=50, reduction=reduction, batch_size=10),
                                       train_sample=sample, same_network=False)
        assert idx.matrix([x], [y], ctx)[0, 0] == pytest.approx(value, rel=1e-6)


def test_dm_struct_params_and_undefined_batches():
    from stitchbench_plugins.indices.dm_struct import DMStruct, normalised_error

    assert DMStruct.Params().reduction == "pooled" and DMStruct.Params().batch_size == 256
    with pytest.raises(ValueError):
        DMStruct.Params(reduction="mean")
    with pytest.raises(ValueError):
        DMStruct.Params(batch_size=0)
    import torch

    T = torch.nn.Identity()
    X = torch.ones(5, 2, 1, 1, dtype=torch.float64)
    Y = torch.cat([torch.ones(3, 2, 1, 1), torch.zeros(2, 2, 1, 1)]).double()  # last batch all zero
    assert normalised_error(T, X, Y) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="test batch 1"):
        normalised_error(T, X, Y, "per_batch", 3)


def ding_pwcca_dist(A, B, null_rotation=None):
    """Ding et al.'s ``pwcca_dist`` (js-d/sim_metric, ``dists/scoring.py``) re-derived from its
    formulas, independently of the plugin: A (n, p1), B (n, p2), rows the examples; neurons
    centred and each matrix scaled to unit Frobenius norm; symmetric pseudo-inverse square
    roots; a full SVD; weights over all p1 directions of A. ``null_rotation`` rotates the
    basis of A's p1 - p2 unmatched directions (the SVD's choice) to show its effect."""
    a = np.asarray(A, float).T
    b = np.asarray(B, float).T
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)

    def inv_sqrt(m):
        ev, vec = np.linalg.eigh(m)
        ev = (ev + np.abs(ev)) / 2
        return vec @ np.diag([1 / np.sqrt(x) if x > 0 else 0.0 for x in ev]) @ vec.T

    ia, ib = inv_sqrt(a @ a.T), inv_sqrt(b @ b.T)
    u, s, _ = np.linalg.svd(ia @ (a @ b.T) @ ib)
    if null_rotation is not None:
        u = u.copy()
        u[:, len(s):] = u[:, len(s):] @ null_rotation
    variates = (u.T @ ia @ a).T
    w = np.abs(variates.T @ a.T).sum(axis=1)
    w = w / w.sum()
    dim = min(len(w), len(s))
    return 1 - w[:dim] @ s[:dim]


@pytest.mark.parametrize(("n", "p1", "p2"), [(200, 5, 8), (300, 6, 6), (200, 8, 5), (500, 12, 4), (400, 64, 16)])
def test_pwcca_ding_convention_is_dings_pwcca_dist(n, p1, p2):
    """Equal to Ding et al.'s formula to 1e-6 for p1 <= p2 and, with the same SVD basis of A's
    unmatched directions (the same M gives LAPACK's same basis), for p1 > p2 too."""
    rng = np.random.default_rng(p1 * 100 + p2)
    a = rng.normal(size=(n, p1)) @ rng.normal(size=(p1, p1))
    b = a[:, :min(p1, p2)] @ rng.normal(size=(min(p1, p2), p2)) + rng.normal(size=(n, p2))
    ours = PWCCA(convention="ding").compute(a, b)
    assert ours == pytest.approx(ding_pwcca_dist(a, b), abs=1e-6)
    if p1 <= p2:
        assert ours == pytest.approx(PWCCA().compute(a, b), abs=1e-9)  # the conventions agree
    else:
        # another orthonormal basis of the unmatched directions gives another value: the
        # basis dependence docs/indices.md reports
        spread = [ding_pwcca_dist(a, b, np.linalg.qr(rng.normal(size=(p1 - p2, p1 - p2)))[0]) for _ in range(20)]
        assert max(abs(v - ours) for v in spread) > 1e-3


def test_dm_struct_solves_with_the_cutoff_it_is_given():
    """cutoff=authors reaches DM's solve: T is the dm plugin's cutoff=authors map."""
    import torch
    from stitchbench_plugins.indices.dm_struct import normalised_error

    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 4, 2, 2))
    x[:, 3] = x[:, 2] + 1e-7 * rng.normal(size=(30, 2, 2))  # a nearly dependent channel: the cut-offs differ
    y = rng.normal(size=(30, 3, 2, 2))
    idx, dm = stitchbench.get_plugin("dm_struct"), stitchbench.get_plugin("dm")
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    values = {}
    for cutoff in ("exact", "authors"):
        T = dm.fit_activations(X, Y, dm.Params(cutoff=cutoff))
        values[cutoff] = idx.compute(x, y, params={"cutoff": cutoff})
        assert values[cutoff] == pytest.approx(normalised_error(T, X, Y), rel=1e-12)
    assert values["exact"] != pytest.approx(values["authors"], rel=1e-9)  # the case tells the two apart
