"""Wqer: weight quantization error reduction (ERQ spec §5).

With the weight quantizer's grid frozen (fitted on the Aqer-updated weights), V = [W, b] is quantized
column block by column block, GPTQ-style, by halving the remaining columns:

    n = d_in + 1 (last column = bias, never quantized; no-bias layers: n = d_in), done = 0
    while n − done > 1:
        s = ⌊(n − done)/2⌋;  S = [done, done+s),  R = [done+s, n)
        d = round-to-nearest error of V[:, S] (one of its floor / ceil errors per entry)
        rounding refinement of d (per row, proxy dᵀHd, H = μμᵀ + Σ of Ã[:, S])
        V[:, S] ← on-grid values;  V[:, R] −= ((G_RR + λ₂I)⁻¹ G_RS Dᵀ)ᵀ    (ridge compensation)
        done += s

Rounding refinement (per row, ≤ `max_iters` single-coordinate flips):
    g = 2Hd;  eligible j: d_j g_j > 0;  j* = argmax |g_j| over eligible;  v = d_j* − g_j*
    snap v to the ceil error if |v − hi| ≤ |v − lo| else to the floor error
    accept iff the proxy does not increase; a rejected (or no-op) row is frozen for good
This is vectorised over all rows: h = Hd is kept per row and updated in O(|S|) per accepted flip
(Δproxy = 2δh_j + δ²H_jj), and frozen rows are dropped from the working set.

The ridge solves use one Cholesky factorisation per layer (`SuffixCholesky`), not an explicit inverse
per round and block of rows. Without bias (Swin `reduction`) the loop stops with the last weight column
unquantized: it is round-to-nearest quantized at inference by the (re-enabled) weight quantizer, as in
the reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .linalg import SuffixCholesky, ridge_matrix, single_threaded

__all__ = ["WeightGrid", "refine_rounding", "wqer_layer", "rounding_proxy"]


@dataclass
class WeightGrid:
    """Frozen per-row (or per-entry) asymmetric grid: scale, integer zero-point, bits.

    `scale` / `zero_point` are (d_out, 1) for per-row quantizers or (d_out, d_in) for dual-uniform ones.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int

    def cols(self, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scale.shape[1] == 1:
            return self.scale, self.zero_point
        return self.scale[:, sl], self.zero_point[:, sl]

    def dequant(self, v: torch.Tensor, sl: slice, mode: str) -> torch.Tensor:
        """On-grid value of v = V[:, sl] with `round` (half-to-even), `floor` or `ceil`."""
        scale, zp = self.cols(sl)
        x = v / scale
        x = torch.round(x) if mode == "round" else torch.floor(x) if mode == "floor" else torch.ceil(x)
        q = torch.clamp(x + zp, 0, 2 ** self.bits - 1)
        return (q - zp) * scale


def rounding_proxy(d: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row dᵀHd."""
    return ((d @ H) * d).sum(1)


@torch.no_grad()
def refine_rounding(d: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, H: torch.Tensor,
                    max_iters: int = 100) -> torch.Tensor:
    """ERQ's rounding refinement of the errors d (rows × s), vectorised over rows.

    Args:
        d: current rounding errors, each entry equal to its `lo` (floor error) or `hi` (ceil error).
        lo, hi: floor and ceil errors (equal where the weight is clamped or on the grid).
        H: (s × s) proxy matrix μμᵀ + Σ.
        max_iters: iteration cap (the reference's 100).
    Returns the refined errors (float64). The proxy dᵀHd of every row never increases.
    """
    d = d.double().clone()
    lo, hi, H = lo.double(), hi.double(), H.double()
    hdiag = H.diagonal()
    idx = torch.arange(d.shape[0], device=d.device)
    da, loa, hia = d.clone(), lo, hi
    ha = d @ H
    for _ in range(max_iters):
        if idx.numel() == 0:
            break
        g = 2.0 * ha
        score = torch.where(da * g > 0, g.abs(), torch.zeros_like(g))
        best, j = score.max(dim=1)
        jj = j[:, None]
        dj, gj = da.gather(1, jj)[:, 0], g.gather(1, jj)[:, 0]
        loj, hij = loa.gather(1, jj)[:, 0], hia.gather(1, jj)[:, 0]
        v = dj - gj
        new = torch.where((v - hij).abs() <= (v - loj).abs(), hij, loj)
        delta = new - dj
        dq = 2.0 * delta * ha.gather(1, jj)[:, 0] + delta * delta * hdiag[j]
        acc = (best > 0) & (delta != 0) & (dq <= 0)
        if not bool(acc.all()):  # rejected / no-op rows are at a fixed point: retire them
            stop = ~acc
            d[idx[stop]] = da[stop]
            idx, da, loa, hia, ha = idx[acc], da[acc], loa[acc], hia[acc], ha[acc]
            j, new, delta = j[acc], new[acc], delta[acc]
        da.scatter_(1, j[:, None], new[:, None])
        ha = ha + delta[:, None] * H[j]
    if idx.numel():
        d[idx] = da
    return d


def _proxy_matrix(gram: torch.Tensor, colsum: torch.Tensor, n_rows: float, sl: slice) -> torch.Tensor:
    """H = μμᵀ + Σ (unbiased) of the quantized input columns `sl`, from G, column sums and N."""
    mu = colsum[sl] / n_rows
    outer = torch.outer(mu, mu)
    return outer + (gram[sl, sl] - n_rows * outer) / max(n_rows - 1.0, 1.0)


@torch.no_grad()
def wqer_layer(weight: torch.Tensor, bias: torch.Tensor | None, gram_ext: torch.Tensor, grid: WeightGrid,
               lam: float, penalize_bias: bool = True, refine: bool = True, max_iters: int = 100,
               compensate: bool = True, chol: SuffixCholesky | None = None,
               on_round: Callable[[slice, torch.Tensor, torch.Tensor], None] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantize (W, b) column block by column block with refinement and ridge compensation.

    Args:
        weight: (d_out, d_in) weights (conv: flattened to (d_out, C·kh·kw)).
        bias: (d_out,) or None (no-bias branch: n = d_in, the last column is left to RTN).
        gram_ext: (d_in+1)² Gram of [X̃, 1] (the last row/column is the ones column).
        grid: the frozen weight grid.
        lam: λ₂.
        penalize_bias: keep λ₂ on the bias column (reference) or not.
        refine / max_iters: rounding refinement switch and iteration cap.
        compensate: ridge compensation of the remaining columns (off: blockwise RTN/refinement only).
        chol: a factorisation of the ridge matrix to reuse (built here when None).
        on_round: called after each round with (S, V before compensation, V after), for tests/diagnostics.
    Returns the new (W, b); W is on the grid except, without bias, its last column.
    """
    d_in = weight.shape[1]
    has_bias = bias is not None
    V = torch.cat([weight.float(), bias.float()[:, None]], 1) if has_bias else weight.float().clone()
    n = V.shape[1]
    gram = gram_ext if has_bias else gram_ext[:d_in, :d_in]
    n_rows = float(gram_ext[-1, -1])
    colsum = gram_ext[:d_in, -1]
    if compensate and chol is None:
        chol = SuffixCholesky(ridge_matrix(gram, lam, penalize_last=penalize_bias or not has_bias))
    done = 0
    while n - done > 1:
        s = (n - done) // 2
        S, R = slice(done, done + s), slice(done + s, n)
        vs = V[:, S]
        lo_v, hi_v = grid.dequant(vs, S, "floor"), grid.dequant(vs, S, "ceil")
        up = grid.dequant(vs, S, "round") == hi_v
        if refine:
            lo, hi = (lo_v - vs).double(), (hi_v - vs).double()
            H = _proxy_matrix(gram_ext, colsum, n_rows, S)
            with single_threaded():  # a long chain of small ops
                d = refine_rounding(torch.where(up, hi, lo), lo, hi, H, max_iters)
            up = d == hi
        new = torch.where(up, hi_v, lo_v)
        err = (new - vs).double()
        V[:, S] = new
        before = V.clone() if on_round is not None else None
        if compensate:
            delta = chol.solve(done + s, gram[R, S] @ err.T)  # (|R|, d_out)
            V[:, R] -= delta.T.to(V.dtype)
        if on_round is not None:
            on_round(S, before, V.clone())
        done += s
    if has_bias:
        return V[:, :d_in].contiguous(), V[:, d_in].contiguous()
    return V, None
