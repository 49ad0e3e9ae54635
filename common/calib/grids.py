"""Candidate grids and the branch-and-bound argmin of APHQ-ViT's calibration search (aphq spec §2.4,
§2.5), shared by the methods that run that search (APHQ, FIMA-Q). Moved here unchanged from
`aphq/search.py`; the quantile helpers and error engines they use are `common.calib.search`.

Candidate grids (all asymmetric, zero-point rounded; b bits, L = 2^b − 1):

* linear weight, per output row, and per-tensor / per-channel activations ("zp × range grid"):
  Δmin = q0.9 − q0.1, Δmax = max − min; num_zp = min(16, 2^b), num_scale = eq_n / num_zp;
  s_j = (Δmin + j/(num_scale − 1)·(Δmax − Δmin)) / L,  z ∈ {2^(b−1) − num_zp/2, …, 2^(b−1) + num_zp/2 − 1};
  candidate k = (zp k // num_scale, scale k mod num_scale). Activation scales are clamped to ≥ 1e-4.
* attention matmul operands, per head: u_i = u0.99 + i/eq_n·(u0.99999 − u0.99),
  l_i = l0.00001 + i/eq_n·(l0.01 − l0.00001), s = (u − l)/L, z = −round(l/s).
* patch-embed conv weight, per row: pct_i = 0.99 + (0.9999 − 0.99)(i/127)^0.5, u = q(pct), l = q(1 − pct).

Argmin engine (same math as the reference's exhaustive loops, different summation order):

* `pruned_argmin`: the errors the reference sums are sums of non-negative per-sample terms, so a
  candidate whose partial sum over some samples already exceeds the full error of another candidate
  can never win. Candidates are evaluated on a growing prefix of the samples and dropped as soon as
  that happens (branch and bound). The result is the exact argmin (first index on ties).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from common.calib.search import quantiles, reference_levels

__all__ = ["GridCandidates", "zp_scale_grid", "weight_grid", "activation_grid", "matmul_bounds", "pair_qparams",
           "conv_percentiles", "pruned_argmin", "sample_chunks"]


# --------------------------------------------------------------------------- candidate grids


@dataclass
class GridCandidates:
    """A zp × scale grid per group: `scales` (G, num_scale), `zps` (num_zp,); candidate k ↦
    (zps[k // num_scale], scales[:, k % num_scale])."""

    scales: torch.Tensor
    zps: torch.Tensor

    @property
    def num_scale(self) -> int:
        return self.scales.shape[1]

    def __len__(self) -> int:
        return self.num_scale * self.zps.numel()

    def params(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate indices (C,) → scale (C, G), zp (C, G) (the same zp for every group)."""
        idx = idx.to(self.scales.device)
        s = self.scales[:, idx % self.num_scale].T
        z = self.zps[idx // self.num_scale][:, None].expand_as(s)
        return s, z

    def select(self, best: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group chosen candidates (G,) → scale (G,), zp (G,)."""
        best = best.to(self.scales.device)
        s = self.scales.gather(1, (best % self.num_scale)[:, None])[:, 0]
        return s, self.zps[best // self.num_scale].to(s.dtype)


def zp_scale_grid(q_hi: torch.Tensor, q_max: torch.Tensor, q_lo: torch.Tensor, q_min: torch.Tensor, bits: int,
                  eq_n: int = 128, min_scale: float | None = None, num_zp: int | None = None) -> GridCandidates:
    """The fixed zp × range grid from per-group quantiles q0.9, max, q0.1, min (each (G,)).

    `num_zp` (default min(16, 2^b)) zero-points centred on 2^(b−1); APHQ's detection convs use 2^(b−1)
    (z ∈ {4, …, 11} at 4 bits) with eq_n / num_zp scales."""
    num_zp = min(16, 2 ** bits) if num_zp is None else int(num_zp)
    num_scale = eq_n // num_zp
    d_min = (q_hi - q_lo)[:, None]
    d_max = (q_max - q_min)[:, None]
    ratio = torch.tensor([j / (num_scale - 1) for j in range(num_scale)], dtype=torch.float32,
                         device=q_hi.device)[None, :]
    scales = (d_min + ratio * (d_max - d_min)) / (2 ** bits - 1)
    if min_scale is not None:
        scales = scales.clamp_min(min_scale)
    n_levels = 2 ** (bits - 1)
    zps = torch.arange(n_levels - num_zp // 2, n_levels + num_zp // 2, dtype=torch.float32, device=q_hi.device)
    return GridCandidates(scales, zps)


def weight_grid(w: torch.Tensor, bits: int, eq_n: int = 128, upper: Sequence[float] = (0.9, 1.0),
                num_zp: int | None = None) -> GridCandidates:
    """Per-output-row grid of a weight (rows, ...) (spec §2.4 step 1); `upper` = the quantile levels of
    Δmin's upper bound and of the max (detection: 0.999, 1.0), `num_zp` as `zp_scale_grid`."""
    w2 = w.detach().reshape(w.shape[0], -1).float()
    q = torch.quantile(w2, torch.tensor(reference_levels(list(upper)), device=w2.device), dim=1)
    grid = zp_scale_grid(q[0], q[1], q[2], q[3], bits, eq_n, num_zp=num_zp)
    grid.scales = grid.scales.clamp_min(1e-8)  # guards constant rows (the reference would divide by 0)
    return grid


def activation_grid(x: torch.Tensor, bits: int, eq_n: int = 128, per_channel: bool = False,
                    chunk_average: bool = True, upper: Sequence[float] = (0.9, 1.0),
                    num_zp: int | None = None) -> GridCandidates:
    """Per-tensor grid from quantiles of the flattened input, or per-channel (last dim) for the
    LayerNorm reparameterization (spec §2.4 step 2, §2.5 step 1); scales clamped to ≥ 1e-4.
    `upper` and `num_zp` as `weight_grid` (detection: 0.999 / 1.0; convs 2^(b−1) zero-points)."""
    x = x.detach().float()
    rows = x.reshape(-1, x.shape[-1]).T if per_channel else x.reshape(1, -1)
    q = quantiles(rows, reference_levels(list(upper)), chunk_average and not per_channel)
    return zp_scale_grid(q[:, 0], q[:, 1], q[:, 2], q[:, 3], bits, eq_n, min_scale=1e-4, num_zp=num_zp)


def matmul_bounds(x: torch.Tensor, eq_n: int = 128, chunk_average: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head linear candidate bounds of an attention operand (B, H, ...): u, l of shape (eq_n+1, H).

    u_i = u0.99 + i/eq_n (u0.99999 − u0.99), l_i = l0.00001 + i/eq_n (l0.01 − l0.00001).
    """
    h = x.shape[1]
    rows = x.detach().float().transpose(0, 1).reshape(h, -1)
    q = quantiles(rows, reference_levels([0.99, 0.99999]), chunk_average)  # (H, 4): u.99, u.99999, l.01, l.00001
    i = torch.tensor([k / eq_n for k in range(eq_n + 1)], dtype=torch.float32, device=x.device)[:, None]
    u = q[None, :, 0] + i * (q[None, :, 1] - q[None, :, 0])
    lo = q[None, :, 3] + i * (q[None, :, 2] - q[None, :, 3])
    return u, lo


def pair_qparams(u: torch.Tensor, lo: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zp) of the range [l, u]: s = (u − l)/(2^b − 1), z = −round(l/s) (elementwise)."""
    s = ((u - lo) / (2 ** bits - 1)).clamp_min(1e-8)  # clamp only guards degenerate (constant) groups
    return s, -torch.round(lo / s)


def conv_percentiles(w: torch.Tensor, n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (u, l) candidates of the patch-embed conv weight: each (n, rows)."""
    pct = [0.99 + (0.9999 - 0.99) * (i / (n - 1)) ** 0.5 for i in range(n)]
    w2 = w.detach().reshape(w.shape[0], -1).float()
    qs = torch.quantile(w2, torch.tensor(reference_levels(pct), device=w2.device), dim=1)
    return qs[:n], qs[n:]


# --------------------------------------------------------------------------- argmin engines


def sample_chunks(n: int, per_sample: int = 1, min_elems: int = 1 << 16, min_total: int = 1 << 20
                  ) -> list[tuple[int, int]]:
    """Growing contiguous sample ranges covering [0, n) for branch and bound: ~n/32, n/32, n/16, ….

    `per_sample` is the work per sample and candidate (elements); chunks hold at least `min_elems`
    of it, and small problems (< `min_total` per candidate) are not split (pruning would not pay).
    """
    if n * per_sample < min_total:
        return [(0, n)]
    step = max(1, n // 32, -(-min_elems // max(per_sample, 1)))
    out, lo = [], 0
    while lo < n:
        hi = min(n, lo + step)
        out.append((lo, hi))
        lo = hi
        if len(out) >= 2:
            step *= 2
    return out


def pruned_argmin(n_cand: int, n_groups: int, chunks: Sequence[tuple[int, int]],
                  evaluate: Callable[[torch.Tensor, int, int], torch.Tensor]) -> torch.Tensor:
    """Exact per-group argmin over candidates of errors that are sums of non-negative per-sample terms.

    Args:
        n_cand, n_groups: candidates are 0..n_cand−1, each scored for every group.
        chunks: sample ranges partitioning the data (`sample_chunks`).
        evaluate: (candidate indices (C,), lo, hi) → float64 (C, n_groups) partial errors on samples [lo, hi).

    Returns:
        (n_groups,) winning candidate per group (the first one among equal minima).

    Branch and bound: after the first chunk, the per-group best candidates are evaluated on all data
    (their full errors U_g bound the optimum); the others go on chunk by chunk and are dropped for a
    group once their partial error exceeds U_g, which their full error then also does.
    """
    all_idx = torch.arange(n_cand)
    part = evaluate(all_idx, *chunks[0]).double().cpu()
    if len(chunks) == 1:
        return _first_argmin(part)
    seeds = part.argmin(0).unique()
    for lo, hi in chunks[1:]:
        part[seeds] += evaluate(seeds, lo, hi).double().cpu()
    is_seed = torch.zeros(n_cand, dtype=torch.bool)
    is_seed[seeds] = True
    bound = part[seeds].min(0).values  # (G,) full errors of the best seeds
    alive = (part <= bound[None, :]) & ~is_seed[:, None]
    for lo, hi in chunks[1:]:
        idx = alive.any(1).nonzero()[:, 0]
        if idx.numel() == 0:
            break
        part[idx] += evaluate(idx, lo, hi).double().cpu()
        alive[idx] &= part[idx] <= bound[None, :]
    final = torch.where(alive | is_seed[:, None], part, torch.full_like(part, float("inf")))
    return _first_argmin(final)


def _first_argmin(err: torch.Tensor) -> torch.Tensor:
    """Per-column argmin, first index among ties, NaN never wins."""
    err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    best = err.min(0, keepdim=True).values
    hit = err == best
    return hit.to(torch.int8).argmax(0)
