"""Fused CPU kernels (numba) of the integer-code calibration search (`common.calib.intsearch`).

The integer-code search scores a candidate (s, z) from int8 codes and one exact int8 GEMM. In torch ops
the code computation is 4 passes over the operand (x / s, round, clamp, cast) and the error needs 4–5
float64 passes over the product (convert, zero-point corrections, square, two reductions); with two
cores those many small ops also serialise on the GIL. These kernels do each side in one pass and
release the GIL, so the search's pieces run in parallel on `common.calib.threads.map_pieces`:

* `fake_quant`: Q(x) − x (or Q(x)) of the float32 search (`common.calib.search.LeftOperandSearch`) for a
  batch of candidates in one pass instead of 7, the same float32 operations in the same order, so the
  float32 search's errors are unchanged bit for bit.

* `int8_codes`: U = clamp(round(x / s) + a, lo, hi) − b for a batch of candidates, in int8. The division
  and round-half-to-even are float32 IEEE operations, the same as the torch search's `x / s` and
  `round` (no reciprocal, no fast-math), so the codes are the float32 search's codes exactly
  (`tests/test_aphq_search_exact.py` compares them bit for bit).
* `product_sums`: per candidate, Σ w_j P'_ij² and Σ P'_ij Y'_ij over samples and rows, where
  P' = P − z_r,j · rowsum_i + z · (z_r,j k − colsum_j) is the exact integer product with the zero-point
  corrections (all integers below 2^53, exact in float64). The sums are float64 with a fixed loop order
  (vectorised reassociation, fixed at compile time), so a piece gives the same value on any thread count.

Compiled on first use (about 2 s, cached beside the module when the directory is writable).
"""
from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["fake_quant", "int8_codes", "product_sums"]


@njit(nogil=True, cache=True)
def fake_quant(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, levels: float, delta: bool,
               out: np.ndarray) -> None:  # pragma: no cover - compiled
    """out[g, s, j, e] = Q(x[g, s, e]) (− x[g, s, e] with `delta`) for candidates (scale[g, j], zp[g, j]).

    Q(x) = (clamp(rint(x / s) + z, 0, L) − z) · s, each step a float32 IEEE operation in the order of
    `common.calib.search.quant_delta` (x / s, round, + z, clamp, − z, · s, − x), so the values are the
    torch ops' bit for bit. x: (G, S, E) float32; scale, zp: (G, C) float32; out: (G, S, C, E) float32.
    """
    n_g, n_s, n_e = x.shape
    n_c = scale.shape[1]
    hi = np.float32(levels)
    lo = np.float32(0.0)
    for g in range(n_g):
        for s in range(n_s):
            for j in range(n_c):
                sj, zj = scale[g, j], zp[g, j]
                for e in range(n_e):
                    xv = x[g, s, e]
                    t = np.rint(xv / sj) + zj
                    if t < lo:
                        t = lo
                    if t > hi:
                        t = hi
                    t = (t - zj) * sj
                    out[g, s, j, e] = t - xv if delta else t


@njit(nogil=True, cache=True)
def int8_codes(x: np.ndarray, scale: np.ndarray, add: np.ndarray, lo: np.ndarray, hi: np.ndarray, sub: float,
               out: np.ndarray) -> None:  # pragma: no cover - compiled
    """out[s, j, e] = int8(clamp(rint(x[s, e] / scale[j]) + add[j], lo[j], hi[j]) − sub), float32 steps.

    x: (S, E) float32; scale, add, lo, hi: (C,) float32; out: (S, C, E) int8.
    """
    n_s, n_e = x.shape
    n_c = scale.shape[0]
    b = np.float32(sub)
    for s in range(n_s):
        for j in range(n_c):
            sj, aj, lj, hj = scale[j], add[j], lo[j], hi[j]
            for e in range(n_e):
                t = np.rint(x[s, e] / sj) + aj
                if t < lj:
                    t = lj
                if t > hj:
                    t = hj
                out[s, j, e] = np.int8(t - b)


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def product_sums(p: np.ndarray, m: int, yw: np.ndarray, w: np.ndarray, zr: np.ndarray, corr: np.ndarray,
                 zc: np.ndarray, rows: bool, out_pp: np.ndarray, out_py: np.ndarray) -> None:  # pragma: no cover
    """Per candidate j: out_pp[j] = Σ_s,i,c w_c P'², out_py[j] = Σ_s,i,c P' yw[s, i, c].

    p: (S, C, N, M or M + 1) int32 products (column M: the row sums of the left codes when `rows`);
    yw: (S, N, M) float64 weighted target; w: (M,) float64; zr, corr: (S or 1, M) float64 right
    zero-points and z_r,c k − colsum_c; zc: (C,) float64 left zero-points (0 in signed form).
    P' = P − zr_c · rowsum + zc_j · corr_c.
    """
    n_s, n_c, n_r = p.shape[0], p.shape[1], p.shape[2]
    shared = zr.shape[0] == 1
    for j in range(n_c):
        pp = 0.0
        py = 0.0
        zj = zc[j]
        for s in range(n_s):
            r = 0 if shared else s
            for i in range(n_r):
                rs = np.float64(p[s, j, i, m]) if rows else 0.0
                for c in range(m):
                    v = np.float64(p[s, j, i, c]) - zr[r, c] * rs + zj * corr[r, c]
                    pp += w[c] * v * v
                    py += v * yw[s, i, c]
        out_pp[j] = pp
        out_py[j] = py
