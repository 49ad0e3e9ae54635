"""Integer-code evaluation of the calibration searches' output errors, with the same choices as the
float32 search (`common.calib.search.LeftOperandSearch`).

A search scores candidates (s, z) of the left operand L of a product whose right operand is already
quantized, R = s_r · (U_r − z_r) with integer codes U_r (a per-head / per-tensor scale, or a per-column
one for a linear's weight). A candidate's output is an integer GEMM scaled afterwards:

    Q(L) · R = s · s_r · (U − z)(U_r − z_r),   U = clamp(round(L / s) + z, 0, 2^b − 1),

with the codes held in int8 (signed U − z where they fit, else U − off with exact zero-point
corrections, see `IntDirectSearch`) and the GEMM done by `torch._int_mm` (int8 × int8 → int32, exact:
|codes| ≤ 128 and k·128² < 2^31). Per candidate that is one fused pass over L for the codes (the search's
own x / s and round, `common.calib.kernels.int8_codes`) instead of 7 passes plus a float32 GEMM, the
int8 GEMM (VNNI) is ~4× faster than the float32 one, and one fused float64 pass over the product
(`product_sums`) forms the error Σ‖s s_r P − Y‖² from the exact integer product: the candidate's exact
error up to float64 rounding (≈ 1e-16 relative, against ≈ 1e-7 for the float32 search's value).

Same choices (`exact_argmin`): the float32 search takes the first minimum of its float32 errors. Per
group, the exact errors shortlist the candidates within a relative window w of the exact minimum; the
shortlisted candidates of groups with more than one, and every group's exact argmin, are re-scored by
the float32 search itself, and the choice is the float32 search's first argmin among the shortlist. A
candidate outside the window has an exact error more than w above the minimum, so it can only be the
float32 choice if float32 rounding moved errors by ~w/2. w starts at 2e-5 (≥ 20× the largest float32
deviation seen on any candidate in tests/test_aphq_search_exact.py, ≈ 1e-6 at 8 bits, ≈ 1e-7 at 4) and
is raised to 64× the largest deviation measured on the re-scored candidates, until that holds. Ties
(equal float32 errors) go to the first index, as in the float32 search.

Used (CPU only) where it pays, measured in one process: both operand searches of attention·V
(matmul2) and the direct-form linear input searches (proj, fc2: the quantized weight's per-row codes
are the right operand, per-column scales). With the fused kernels the int8 GEMM is ~4× the float32
one and there are no elementwise passes left to lose it on (DeiT-T block 0, 2 threads: matmul2
4.5 → 2.2–2.5 s, fc2 2.5 → 1.5 CPU-s). The Gram-form searches (q·kᵀ, qkv / fc1 inputs, weights) keep
the float32 path: their k² GEMM per row is cheaper than the integer direct form's k·m GEMM plus a
pass over the larger product (q·kᵀ measured: 3.4 s float32 against 4.4 s integer).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from common.calib.kernels import int8_codes, product_sums
from common.calib.threads import ThreadBuffers, map_pieces, sample_pieces

__all__ = ["int_codes", "int_path_ok", "IntDirectSearch", "exact_argmin", "WINDOW"]

#: Base relative window of the shortlist (see the module docstring).
WINDOW = 2e-5
#: Elements of the code buffer per candidate batch (a right operand shared by all samples).
CODE_BUDGET = 1 << 20
#: Elements of the code buffer per candidate batch of one sample (a right operand per sample): the
#: larger GEMMs over many candidates pay more than staying in cache (block-0 matmul2, 2 threads: 2^17 →
#: 3.3 s, 2^18 → 2.8–3.1 s, 2^20 → 2.2–2.5 s, 2^21 → 2.2 s).
SAMPLE_BUDGET = 1 << 20
#: Sample ranges per group evaluated independently (the units of work of the thread pool).
PIECES = 4


def int_codes(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integer codes U = clamp(round(x/s) + z, 0, 2^b − 1) (float, integer-valued): the float32
    fake-quant value is fl((U − z) · s), as `fake_quant_affine` computes it."""
    return torch.clamp(torch.round(x / scale) + zp, 0, 2 ** bits - 1)


def int_path_ok(bits: int, bits_r: int, k: int, device: torch.device | str = "cpu") -> bool:
    """Whether the int8 path applies and is exact: CPU tensors (`torch._int_mm` has shape constraints on
    CUDA, where the float32 search is fast anyway), codes (shifted by 128 at 8 bits) that fit in int8,
    and an int32 accumulation k·128² below 2^31."""
    return torch.device(device).type == "cpu" and 2 <= bits <= 8 and 2 <= bits_r <= 8 and k * 128 * 128 < 2 ** 31


def _fits_int8(lo: float, hi: float) -> bool:
    return lo >= -128 and hi <= 127


class IntDirectSearch:
    """Exact output errors Σ‖Q(L)·R − Y‖² of left-operand candidates, R = Q(X_r) uniform-quantized.

    Args:
        left: (S, G, n, k) FP left operand.
        right: (S|1, G|1, k, m) FP right operand (before quantization).
        scale_r, zp_r: its quantizer's scale and (rounded) zero-point, broadcastable to `right` and
            constant along k: per group (1, G, 1, 1) or per column (1, 1, 1, m).
        target: (S, G, n, m) FP output (bias removed).
        bits, bits_r: bits of the left and right operands.

    `errors(scale, zp, lo, hi)` → float64 (C, G) error sums over samples [lo, hi) (mse only).

    Codes: signed D = U − z when every value fits int8 (no correction terms), else U − off
    (off = 0 below 8 bits, 128 at 8) with the zero-point corrections of the product
    (U − z)(U_r − z_r) = U U_r − z_r·rowsum(U) − z·colsum(U_r) + z z_r k, all exact integers; the row
    sums come out of the same GEMM through an extra column of ones in the right codes.
    """

    def __init__(self, left: torch.Tensor, right: torch.Tensor, scale_r: torch.Tensor, zp_r: torch.Tensor,
                 target: torch.Tensor, bits: int, bits_r: int):
        self.bits, self.levels = bits, 2 ** bits - 1
        self.left = left.transpose(0, 1).contiguous()  # (G, S, n, k)
        k, m = right.shape[-2:]
        u_r = int_codes(right, scale_r, zp_r, bits_r)
        z_r = torch.broadcast_to(zp_r, u_r.shape[:-2] + (1, m))  # (S|1, G|1, 1, m)
        signed = u_r - zp_r
        if _fits_int8(float(signed.min()), float(signed.max())):
            codes, zr_eff = signed, torch.zeros_like(z_r)
        else:
            off = 0 if bits_r <= 7 else 128
            codes, zr_eff = u_r - off, z_r - off
        self.zr = zr_eff.transpose(0, 1).double()  # (G|1, S|1, 1, m)
        self.need_rows = bool((self.zr != 0).any())
        cr = codes.transpose(0, 1)  # (G|1, S|1, k, m)
        self.colsum = cr.double().sum(-2, keepdim=True)  # (G|1, S|1, 1, m)
        if self.need_rows:  # an extra column of ones: the GEMM also returns the row sums of the left codes
            cr = torch.cat([cr, torch.ones_like(cr[..., :1])], -1)
        self.cr8 = cr.to(torch.int8).contiguous()
        sr = torch.broadcast_to(scale_r, u_r.shape[:-2] + (1, m)).transpose(0, 1)  # (G|1, S|1, 1, m)
        scale_r = sr[:, 0, 0].double()  # (G|1, m): constant over samples
        self.w = (scale_r * scale_r).contiguous().numpy()  # s_r,j²
        tgt = target.transpose(0, 1).double()  # (G, S, n, m)
        self.yy = tgt.square().sum((2, 3))  # (G, S)
        self.yw = (tgt * scale_r[:, None, None, :]).contiguous().numpy()  # s_r,j Y_ij
        self.m = m
        self.zr_np = self.zr[:, :, 0].contiguous().numpy()  # (G|1, S|1, m)
        self.corr = (self.zr * k - self.colsum)[:, :, 0].contiguous().numpy()  # z_r,j k − colsum_j
        self._bufs = ThreadBuffers()

    def errors(self, scale: torch.Tensor, zp: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Exact errors (C, G) of candidates (C, G) over samples [lo, hi).

        The (group, sample range) pieces are independent and small (per-sample int8 GEMMs, float64
        passes over one output); they run on `common.calib.threads.map_pieces` and their partial sums
        are added in a fixed order (the same result for any thread count).
        """
        G = self.left.shape[0]
        tasks = [(g, a, b) for g in range(G) for a, b in sample_pieces(lo, hi, PIECES)]
        zf = zp.double()
        signed = _fits_int8(float(-zf.max()), float(self.levels - zf.min()))
        off = 0 if signed or self.bits <= 7 else 128
        parts = map_pieces(lambda t: self._errors_piece(scale, zp, zf, signed, off, *t), tasks)
        self._bufs.clear()
        out = torch.zeros(scale.shape[0], G, dtype=torch.float64)
        for (g, _, _), part in zip(tasks, parts):
            out[:, g] += part
        return out

    def _errors_piece(self, scale: torch.Tensor, zp: torch.Tensor, zf: torch.Tensor, signed: bool, off: int,
                      g: int, lo: int, hi: int) -> torch.Tensor:
        """Errors (C,) of group g's candidates over samples [lo, hi): fused codes, int8 GEMMs, fused sums."""
        _, _, n, k = self.left.shape
        m = self.m
        mc = self.cr8.shape[-1]  # m, or m + 1 with the ones column
        ns = hi - lo
        n_c = scale.shape[0]
        shared = self.cr8.shape[1] == 1
        gr = g if self.cr8.shape[0] > 1 else 0
        x = self.left[g, lo:hi].reshape(ns, n * k).numpy()
        sc = scale[:, g].float().contiguous().numpy()
        z = zp[:, g].float().contiguous().numpy()
        if signed:  # D = clamp(round(x/s) + z, 0, L) − z = clamp(round(x/s), −z, L − z): no zero-point terms
            add, lo_b, hi_b, sub = np.zeros_like(z), -z, self.levels - z, 0.0
            zc = np.zeros(n_c)
        else:
            add, lo_b, hi_b, sub = z, np.zeros_like(z), np.full_like(z, self.levels), float(off)
            zc = zf[:, g].numpy() - off
        rsl = 0 if shared else slice(lo, hi)
        zr = self.zr_np[gr, rsl].reshape(-1, m)
        corr = self.corr[gr, rsl].reshape(-1, m)
        yw = self.yw[g, lo:hi]
        # one right operand: one GEMM over every sample of a candidate batch; a right operand per sample:
        # sample by sample, with larger candidate batches per GEMM
        blocks, budget = ([(0, ns)], CODE_BUDGET) if shared else ([(j, j + 1) for j in range(ns)], SAMPLE_BUDGET)
        pp, py = np.zeros(n_c), np.zeros(n_c)
        part_pp, part_py = np.empty(n_c), np.empty(n_c)
        for a, b in blocks:
            nb = b - a
            step = max(1, min(n_c, budget // max(nb * n * k, 1)))
            right = self.cr8[gr, 0 if shared else lo + a]
            zrb, corrb = (zr, corr) if shared else (zr[a:b], corr[a:b])
            for i in range(0, n_c, step):
                c = min(step, n_c - i)
                u8 = self._bufs.get("u8", (nb, c, n, k), torch.int8)
                int8_codes(x[a:b], sc[i:i + c], add[i:i + c], lo_b[i:i + c], hi_b[i:i + c], sub,
                           u8.numpy().reshape(nb, c, n * k))
                p = self._bufs.get("p", (nb, c * n, mc), torch.int32)
                torch._int_mm(u8.view(nb * c * n, k), right, out=p.view(nb * c * n, mc))
                product_sums(p.numpy().reshape(nb, c, n, mc), m, yw[a:b], self.w[gr], zrb, corrb, zc[i:i + c],
                             self.need_rows, part_pp[i:i + c], part_py[i:i + c])
            pp += part_pp
            py += part_py
        # Σ (s s_r,j P'_ij − Y_ij)² = s² Σ s_r,j² P'_ij² − 2 s Σ P'_ij (s_r,j Y_ij) + ‖Y‖²
        s64 = sc.astype(np.float64)
        return torch.from_numpy(s64 * s64 * pp - 2 * s64 * py) + self.yy[g, lo:hi].sum()


def exact_argmin(errors: torch.Tensor, rescore: Callable[[torch.Tensor], torch.Tensor],
                 window: float = WINDOW) -> tuple[torch.Tensor, dict]:
    """The float32 search's per-group choice from exact errors (see the module docstring).

    Args:
        errors: float64 (C, G) exact errors of all candidates.
        rescore: candidate indices (K,) → float64 (K, G) errors of the float32 search.
    Returns:
        (G,) chosen candidates and a record {"rescored": candidates re-scored, "window": final w}.
    """
    err = torch.where(torch.isnan(errors), torch.full_like(errors, float("inf")), errors)
    n_cand, groups = err.shape
    best_exact = err.min(0).values  # (G,)
    if not torch.isfinite(best_exact).all():
        idx = torch.arange(n_cand)
        ref = rescore(idx)
        return _first_min(ref), {"rescored": n_cand, "window": float("inf")}
    scored: dict[int, torch.Tensor] = {}
    w = window
    while True:
        short = err <= (best_exact * (1 + w))[None, :]  # (C, G)
        need = short.sum(0) > 1
        # the shortlists of more than one, and every group's exact argmin (to measure the deviation)
        want = {int(c) for c in short[:, need].nonzero()[:, 0].tolist()} | set(err.argmin(0).tolist())
        want = sorted(want - set(scored))
        if want:
            vals = rescore(torch.tensor(want))
            for j, c in enumerate(want):
                scored[c] = vals[j]
        dev = 0.0
        for c, v in scored.items():
            rel = ((v - err[c]).abs() / err[c].clamp_min(1e-300))[short[c]]
            if rel.numel():
                dev = max(dev, float(rel.max()))
        if 64 * dev <= w or w >= 1.0:
            break
        w = min(1.0, 64 * dev * 2)
    choice = torch.empty(groups, dtype=torch.long)
    for g in range(groups):
        cands = short[:, g].nonzero()[:, 0]
        if cands.numel() == 1:
            choice[g] = cands[0]
            continue
        vals = torch.stack([scored[int(c)][g] for c in cands])
        vals = torch.where(torch.isnan(vals), torch.full_like(vals, float("inf")), vals)
        choice[g] = cands[int((vals == vals.min()).nonzero()[0, 0])]
    return choice, {"rescored": len(scored), "window": w, "deviation": dev}


def _first_min(err: torch.Tensor) -> torch.Tensor:
    err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    return (err == err.min(0, keepdim=True).values).to(torch.int8).argmax(0)
