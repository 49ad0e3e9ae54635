"""ERQ numerics against independent float64 references (Aqer, Wqer, refinement, stats, solves).

References here are written the slow, obvious way: explicit [X̃, 1] matrices, torch.linalg.solve /
lstsq / inv in float64, Python loops over rows and iterations, as the ERQ reference code does it.
"""
from __future__ import annotations

import pytest
import torch

from common.calib.percentile import search_uniform_percentile
from erq.aqer import aqer_update
from erq.linalg import SuffixCholesky, ridge_matrix
from erq.stats import LayerStats
from erq.wqer import WeightGrid, refine_rounding, rounding_proxy, wqer_layer

WEIGHT_GRID = [0.97, 0.98, 0.99, 0.995, 0.9995, 0.9997, 0.9999, 0.99995, 0.99999, 1.0]


def _layer_data(n: int = 400, d_in: int = 24, d_out: int = 17, seed: int = 0):
    """Random FP inputs with channel-wise scales and offsets, a 4-bit-like quantized copy, weights, bias."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g) * (0.2 + 2 * torch.rand(d_in, generator=g)) + torch.randn(d_in, generator=g)
    step = (x.max() - x.min()) / 15
    xq = torch.round(x / step) * step
    w = torch.randn(d_out, d_in, generator=g) * 0.2
    b = torch.randn(d_out, generator=g) * 0.1
    return x, xq, w, b


def _stats(x, xq, weight=None, batches=1) -> LayerStats:
    st = LayerStats(x.shape[1], weight=weight, dtype=torch.float64)
    for xs, xqs in zip(x.chunk(batches), xq.chunk(batches)):
        st.update(xs, xqs)
    return st


def _grid(w: torch.Tensor, bits: int = 4) -> WeightGrid:
    s, z = search_uniform_percentile(w, bits, WEIGHT_GRID)
    return WeightGrid(s[:, None], z[:, None], bits)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


# --------------------------------------------------------------------------- statistics / solves

@pytest.mark.parametrize("d_in,d_out", [(24, 5), (24, 40), (600, 7)])  # ÃᵀR via (X − X̃)Wᵀ or Ãᵀ(X − X̃)Wᵀ;
def test_streamed_stats_equal_one_shot_gram(d_in, d_out):                # d_in = 600: Gram in column blocks
    x, xq, _, _ = _layer_data(d_in=d_in, d_out=d_out)
    w = torch.randn(d_out, x.shape[1])
    st = _stats(x, xq, weight=w, batches=7)
    a = torch.cat([xq, torch.ones(len(xq), 1)], 1).double()
    torch.testing.assert_close(st.gram, a.T @ a, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(st.aqer_rhs(), a.T @ ((x - xq).double() @ w.double().T), rtol=1e-10, atol=1e-8)
    assert st.rows == len(x)


@pytest.mark.parametrize("round_zero_point", [False, True])
def test_stats_quantizer_path_is_bit_identical(round_zero_point):
    from common.quant.quantizers import UniformQuantizer
    from erq.stats import apply_quantizer

    q = UniformQuantizer(4, round_zero_point=round_zero_point)
    q.set_qparams(torch.tensor([0.137]), torch.tensor([6.4]))
    x = torch.randn(300, 17, generator=torch.Generator().manual_seed(0)) * 2
    assert torch.equal(apply_quantizer(q, x), q.fake_quant(x))


def test_suffix_cholesky_solves_every_trailing_block():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(50, 12, generator=g, dtype=torch.float64)
    m = a.T @ a + 0.5 * torch.eye(12, dtype=torch.float64)
    chol = SuffixCholesky(m)
    for k in range(12):
        rhs = torch.randn(12 - k, 3, generator=g, dtype=torch.float64)
        torch.testing.assert_close(chol.solve(k, rhs), torch.linalg.solve(m[k:, k:], rhs), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- Aqer

@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("penalize_bias", [True, False])
def test_aqer_equals_float64_ridge(with_bias, penalize_bias):
    x, xq, w, b = _layer_data()
    b = b if with_bias else None
    lam = 3.0
    new_w, new_b = aqer_update(w, b, _stats(x, xq, w, batches=3), lam, penalize_bias=penalize_bias)
    # independent: ridge regression of the FP output's residual on [X̃, 1], in float64
    x64, xq64, w64 = x.double(), xq.double(), w.double()
    a = torch.cat([xq64, torch.ones(len(x), 1, dtype=torch.float64)], 1) if with_bias else xq64
    resid = (x64 - xq64) @ w64.T
    pen = torch.ones(a.shape[1], dtype=torch.float64)
    if with_bias and not penalize_bias:
        pen[-1] = 0
    theta = torch.linalg.solve(a.T @ a + lam * torch.diag(pen), a.T @ resid)
    torch.testing.assert_close(new_w.double(), w64 + theta[:w.shape[1]].T, rtol=1e-5, atol=1e-6)
    if with_bias:
        torch.testing.assert_close(new_b.double(), b.double() + theta[-1], rtol=1e-5, atol=1e-6)
    else:
        assert new_b is None


def test_aqer_unregularised_limit_is_least_squares():
    x, xq, w, b = _layer_data()
    new_w, new_b = aqer_update(w, b, _stats(x, xq, w), lam=1e-10)
    a = torch.cat([xq, torch.ones(len(x), 1)], 1).double()
    y = x.double() @ w.double().T + b.double()
    sol = torch.linalg.lstsq(a, y).solution  # [W, b]ᵀ minimising ‖Y − Ã Vᵀ‖
    torch.testing.assert_close(new_w.double(), sol[:-1].T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(new_b.double(), sol[-1], rtol=1e-4, atol=1e-5)
    # and it cannot do worse on the calibration rows than the un-updated layer
    before = (a @ torch.cat([w, b[:, None]], 1).double().T - y).pow(2).sum()
    after = (a @ torch.cat([new_w, new_b[:, None]], 1).double().T - y).pow(2).sum()
    assert after <= before


# --------------------------------------------------------------------------- rounding refinement

def _naive_refine_row(d, lo, hi, H, iters):
    """The reference's per-row loop: gradient step, snap, accept when the proxy does not increase."""
    d = d.clone()
    for _ in range(iters):
        g = 2 * H @ d
        score = torch.where(d * g > 0, g.abs(), torch.zeros_like(g))
        j = int(score.argmax())
        v = d[j] - g[j]
        cand = d.clone()
        cand[j] = hi[j] if abs(v - hi[j]) <= abs(v - lo[j]) else lo[j]
        if cand @ H @ cand > d @ H @ d:
            break
        d = cand
    return d


def _refine_problem(rows=40, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, s, generator=g, dtype=torch.float64) + torch.randn(s, generator=g, dtype=torch.float64)
    H = x.T @ x / 300
    step = 0.05 + 0.3 * torch.rand(rows, 1, generator=g, dtype=torch.float64)
    frac = torch.rand(rows, s, generator=g, dtype=torch.float64)
    lo, hi = -frac * step, (1 - frac) * step
    d = torch.where(frac > 0.5, hi, lo)  # round to nearest
    return d, lo, hi, H


def test_refinement_never_increases_proxy_and_matches_row_loop():
    d, lo, hi, H = _refine_problem()
    out = refine_rounding(d, lo, hi, H, max_iters=100)
    assert torch.all(rounding_proxy(out, H) <= rounding_proxy(d, H) + 1e-12)
    assert torch.all((out == lo) | (out == hi))
    ref = torch.stack([_naive_refine_row(d[i], lo[i], hi[i], H, 100) for i in range(d.shape[0])])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert (out != d).any(), "the test problem should trigger some flips"


@pytest.mark.parametrize("iters", [0, 1, 3])
def test_refinement_iteration_cap(iters):
    d, lo, hi, H = _refine_problem(seed=2)
    out = refine_rounding(d, lo, hi, H, max_iters=iters)
    assert ((out != d).sum(1) <= iters).all()


# --------------------------------------------------------------------------- Wqer

def _naive_wqer(w, b, xq, grid: WeightGrid, lam, refine=True, iters=100):
    """ERQ's Wqer as the reference computes it: explicit float64 inverse per round, row loop refinement."""
    d_in = w.shape[1]
    a = torch.cat([xq, torch.ones(len(xq), 1)], 1).double() if b is not None else xq.double()
    v = torch.cat([w, b[:, None]], 1).float() if b is not None else w.float().clone()
    n, done = v.shape[1], 0
    while n - done > 1:
        s = (n - done) // 2
        S, R = slice(done, done + s), slice(done + s, n)
        vs = v[:, S]
        lo_v, hi_v = grid.dequant(vs, S, "floor"), grid.dequant(vs, S, "ceil")
        lo, hi = (lo_v - vs).double(), (hi_v - vs).double()
        d = torch.where(grid.dequant(vs, S, "round") == hi_v, hi, lo)
        if refine:
            xs = a[:, S]
            H = torch.outer(xs.mean(0), xs.mean(0)) + torch.atleast_2d(torch.cov(xs.T))
            d = torch.stack([_naive_refine_row(d[i], lo[i], hi[i], H, iters) for i in range(d.shape[0])])
        new = torch.where(d == hi, hi_v, lo_v)
        err = (new - vs).double()
        v[:, S] = new
        ar, as_ = a[:, R], a[:, S]
        inv = torch.linalg.inv(ar.T @ ar + lam * torch.eye(ar.shape[1], dtype=torch.float64))
        v[:, R] += (-(inv @ (ar.T @ as_) @ err.T)).T.float()
        done += s
    return (v[:, :d_in], v[:, d_in]) if b is not None else (v, None)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("refine", [True, False])
def test_wqer_cholesky_path_equals_explicit_inverse(with_bias, refine):
    x, xq, w, b = _layer_data(n=300, d_in=21, d_out=13, seed=3)
    b = b if with_bias else None
    grid = _grid(w)
    lam = 5.0
    st = _stats(x, xq, batches=2)
    w1, b1 = wqer_layer(w, b, st.gram, grid, lam, refine=refine)
    w2, b2 = _naive_wqer(w, b, xq, grid, lam, refine=refine)
    torch.testing.assert_close(w1, w2, rtol=1e-5, atol=1e-6)
    if with_bias:
        torch.testing.assert_close(b1, b2, rtol=1e-5, atol=1e-6)
    # on the grid: re-quantizing is the identity (no-bias: all but the last column, RTN at inference)
    k = w.shape[1] if with_bias else w.shape[1] - 1
    torch.testing.assert_close(grid.dequant(w1[:, :k], slice(0, k), "round"), w1[:, :k], rtol=0, atol=0)


def test_ridge_compensation_never_increases_reconstruction_error():
    x, xq, w, b = _layer_data(n=500, d_in=32, d_out=16, seed=4)
    a = torch.cat([xq, torch.ones(len(xq), 1)], 1).double()
    v0 = torch.cat([w, b[:, None]], 1).double()
    st = _stats(x, xq)

    def err(v):
        return float((a @ (v.double() - v0).T).pow(2).sum())

    for lam, all_rounds in ((0.0, True), (50.0, False)):
        records, blocks = [], []
        wqer_layer(w, b, st.gram, _grid(w), lam, refine=False,
                   on_round=lambda S, before, after: (records.append((err(before), err(after))),
                                                      blocks.append(S.stop - S.start)))
        assert blocks == [16, 8, 4, 2, 1, 1]  # n = 33 columns: halve until only the bias is left
        checked = records if all_rounds else records[:1]  # with λ > 0 the guarantee is per ridge step
        for before, after in checked:
            assert after <= before * (1 + 1e-9) + 1e-12


def test_wqer_beats_round_to_nearest_on_calibration_data():
    x, xq, w, b = _layer_data(n=600, d_in=40, d_out=24, seed=5)
    grid = _grid(w, bits=3)
    st = _stats(x, xq)
    w_hat, b_hat = wqer_layer(w, b, st.gram, grid, lam=1.0)
    rtn = grid.dequant(w, slice(0, w.shape[1]), "round")
    y = xq @ w.T + b
    assert (xq @ w_hat.T + b_hat - y).pow(2).sum() < (xq @ rtn.T + b - y).pow(2).sum()
