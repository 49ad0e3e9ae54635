"""Dual Uniform Quantization (ERQ, TPAMI): two per-row uniform grids for qkv / fc1 weights.

RepQ-ViT's LayerNorm reparameterization multiplies input column c of qkv / fc1 by r_c = Δ_c / Δ̄,
which inflates the columns of high-variance channels. ERQ picks those columns by a vote and gives
them their own per-row grid (spec §3.4):

    for each row i:  P_i = 99th percentile of the row's positive entries,
                     N_i = 1st percentile of its negative entries      (numpy 'linear')
                     F_i = { j : W_ij > P_i or W_ij < N_i }
    count_j = |{ i : j ∈ F_i }|,  K = ⌊d_out / 20⌋  (the reference divides d_out, not d_in)
    O = the K most frequent columns (ties: first seen in a row-major scan, like Counter.most_common)
    per-row (Δ¹, z¹) fitted on W[:, O] and (Δ², z²) on W[:, Ō], both with the weight percentile grid.

The vote is vectorised (masked sorts, one count per column, a stable lexicographic sort) instead of a
per-row numpy loop.
"""
from __future__ import annotations

from typing import Sequence

import torch

from common.calib.percentile import search_uniform_percentile
from common.quant.primitives import fake_quant_affine
from common.quant.quantizers import Quantizer

__all__ = ["DualUniformQuantizer", "outlier_columns", "row_percentile_of_sign"]


def row_percentile_of_sign(w: torch.Tensor, pct: float, positive: bool,
                           sorted_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per row: numpy.percentile(row[row > 0] (or row[row < 0]), pct), float64; NaN if none.

    `pct` is in percent, as numpy takes it (the reference passes 99 and 100 − 99 = 1). numpy's
    'linear' method: q = pct / 100, virtual index (count − 1)·q, lerp between its neighbours. In a
    sorted row the negatives come first and the positives last, so one sort (`sorted_rows`) serves
    both signs.
    """
    w64 = w.double()
    n = w64.shape[1]
    vals = torch.sort(w64, dim=1).values if sorted_rows is None else sorted_rows
    cnt = (w64 > 0).sum(1) if positive else (w64 < 0).sum(1)
    vi = (cnt - 1).double() * (float(pct) / 100.0)  # numpy: q = true_divide(pct, 100), (n − 1)·q
    below = vi.floor().clamp(min=0)
    gamma = (vi - below)[:, None]
    below = below.long()
    above = torch.minimum(below + 1, (cnt - 1).clamp(min=0))
    offset = (n - cnt) if positive else torch.zeros_like(cnt)  # positives sit at the end of the sorted row
    b_idx = (offset + below).clamp(0, n - 1)[:, None]
    a_idx = (offset + above).clamp(0, n - 1)[:, None]
    lo, hi = vals.gather(1, b_idx), vals.gather(1, a_idx)
    out = torch.lerp(lo, hi, gamma)[:, 0]
    return torch.where(cnt > 0, out, torch.full_like(out, float("nan")))


def outlier_columns(w: torch.Tensor, k: int, percentile: float = 99.0) -> torch.Tensor:
    """Indices of the K input columns most often flagged as row outliers (ERQ's vote), in vote order.

    Only columns flagged at least once are returned (Counter.most_common never invents zero counts),
    so fewer than K may come back.
    """
    w64 = w.double()
    srt = torch.sort(w64, dim=1).values
    pos = row_percentile_of_sign(w64, percentile, positive=True, sorted_rows=srt)
    # the reference's level is np.percentile(·, 100 − per): exactly 1 for per = 99, not 1 − 0.99
    # (= 0.010000000000000009, which flags one extra weight where the rank is an integer)
    neg = row_percentile_of_sign(w64, 100.0 - float(percentile), positive=False, sorted_rows=srt)
    flags = (w64 > pos[:, None]) | (w64 < neg[:, None])  # NaN thresholds flag nothing
    count = flags.sum(0)
    rows, cols = flags.shape
    first_row = torch.where(flags.any(0), flags.int().argmax(0), torch.full((cols,), rows, device=w.device))
    seen = first_row * cols + torch.arange(cols, device=w.device)  # row-major first-encounter position
    order = torch.sort(seen, stable=True).indices
    order = order[torch.sort(-count[order], stable=True).indices]
    order = order[count[order] > 0]
    return order[:k]


class DualUniformQuantizer(Quantizer):
    """Per-row asymmetric weight quantizer with a separate grid for a set of outlier input columns.

    Buffers: `outlier` (in_features,) bool mask of the columns in O; `scale1`/`zero_point1` (out, 1)
    for O, `scale2`/`zero_point2` (out, 1) for the other columns. Zero-points are integers.
    """

    def __init__(self, bits: int, out_features: int, in_features: int):
        super().__init__(bits, role="weight")
        self.register_buffer("outlier", torch.zeros(in_features, dtype=torch.bool))
        for name, val in (("scale1", 1.0), ("zero_point1", 0.0), ("scale2", 1.0), ("zero_point2", 0.0)):
            self.register_buffer(name, torch.full((out_features, 1), val))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, outlier_cols={int(self.outlier.sum())}/{self.outlier.numel()}, role={self.role}"

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full (out, in) scale and zero-point matrices."""
        m = self.outlier[None, :]
        return torch.where(m, self.scale1, self.scale2), torch.where(m, self.zero_point1, self.zero_point2)

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        scale, zp = self.grid()
        return fake_quant_affine(w, scale, zp, self.bits, round_zero_point=False)

    @torch.no_grad()
    def fit(self, w: torch.Tensor, grid: Sequence[float], k: int, percentile: float = 99.0) -> None:
        """Vote the outlier columns of w (out, in), then fit both per-row grids by the percentile search."""
        cols = outlier_columns(w, k, percentile)
        mask = torch.zeros(w.shape[1], dtype=torch.bool, device=w.device)
        mask[cols] = True
        self.outlier.copy_(mask)
        w = w.detach().float()
        s2, z2 = search_uniform_percentile(w[:, ~mask], self.bits, grid)
        if bool(mask.any()):
            s1, z1 = search_uniform_percentile(w[:, mask], self.bits, grid)
        else:
            s1, z1 = s2, z2
        self.scale1.copy_(s1[:, None]); self.zero_point1.copy_(z1[:, None])
        self.scale2.copy_(s2[:, None]); self.zero_point2.copy_(z2[:, None])
        self.calibrated.fill_(True)
