"""AdaLog's initial candidate grids C₀ (adalog spec §3.8, §3.5 step 2).

Uniform quantizers (asymmetric, integer zero-points), per group g with quantiles q_p of its values:

    Δmin = q0.9 − q0.1,  Δmax = q1.0 − q0.0,  n_s = eq_n / n_z
    scale_j = (Δmin + linspace(0, 1, n_s)_j · (Δmax − Δmin)) / (2^b − 1)
    zero-points n_levels − n_z/2 … n_levels + n_z/2 − 1  (n_levels = 2^(b−1))
    candidate k = (zero-point ⌊k / n_s⌋, scale k mod n_s)

    | grid                         | n_z                    | quantiles                          |
    | linear weight, per row       | min(16, 2^(b−1))       | exact, per row                     |
    | linear input, per tensor     | min(16, 2^b)           | chunk-averaged above 2^24; s ≥ 1e-4 |
    | linear input, per channel    | min(16, 2^b)           | exact, per channel; s ≥ 1e-4        |
    | matmul operand, per head     | min(16, 2^(b−1))       | chunk-averaged above 2^24          |
    | conv weight, per out-channel | 2^(b−1) (uncapped)     | exact, per row                     |

Lower levels are the reference's 1 − float32(p) (`common.calib.search.reference_levels`).

Post-GELU AdaLog scale bounds: ud = [p0.9(x > 0) + c, max(x > 0) + c] with the rank rule of the
reference's `positive_percentile` (the rank-(⌈count·p⌉ − 1) positive, count·p in float32).
"""
from __future__ import annotations

import torch

from common.calib.search import order_statistics, quantiles, reference_levels

__all__ = ["num_zero_points", "uniform_grid", "weight_candidates", "input_candidates", "channel_candidates",
           "head_candidates", "conv_candidates", "positive_percentiles", "gelu_scale_bounds", "linear_grid"]


def num_zero_points(kind: str, bits: int) -> int:
    """n_z of a grid kind: weight / matmul min(16, 2^(b−1)), input min(16, 2^b), conv 2^(b−1)."""
    n_levels = 2 ** (bits - 1)
    return {"weight": min(16, n_levels), "matmul": min(16, n_levels), "input": min(16, 2 * n_levels),
            "conv": n_levels}[kind]


def uniform_grid(q_hi: torch.Tensor, q_max: torch.Tensor, q_lo: torch.Tensor, q_min: torch.Tensor, bits: int,
                 num_zp: int, eq_n: int = 128, min_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate (scales, zero-points), each (n_z · n_s, G), from per-group quantiles (each (G,))."""
    num_scale = int(eq_n / num_zp)
    if num_scale < 1:
        raise ValueError(f"eq_n={eq_n} is smaller than the {num_zp} zero-points of a {bits}-bit grid")
    n_levels = 2 ** (bits - 1)
    d_min = (q_hi - q_lo)[None, :]
    d_max = (q_max - q_min)[None, :]
    splits = torch.linspace(0, 1, steps=num_scale, device=q_hi.device)[:, None] * (d_max - d_min)
    scales = ((d_min + splits) / (2 * n_levels - 1)).repeat(num_zp, 1)
    if min_scale is not None:
        scales = scales.clamp(min=min_scale)
    zps = torch.arange(int(n_levels - num_zp / 2), int(n_levels + num_zp / 2), device=q_hi.device,
                       dtype=torch.float32).repeat_interleave(num_scale)[:, None].expand_as(scales).contiguous()
    return scales, zps


def _row_quantiles(rows: torch.Tensor, chunk_average: bool) -> torch.Tensor:
    """(G, n) → (G, 4): q0.9, q1.0, q0.1, q0.0 as the reference forms them."""
    return quantiles(rows.float(), reference_levels([0.9, 1.0]), chunk_average)


def weight_candidates(w: torch.Tensor, bits: int, eq_n: int = 128, kind: str = "weight"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row grid of a linear (kind "weight") or conv ("conv") weight: (C, rows) each."""
    rows = w.detach().reshape(w.shape[0], -1).float()
    q = torch.quantile(rows, torch.tensor(reference_levels([0.9, 1.0]), device=rows.device), dim=1)
    return uniform_grid(q[0], q[1], q[2], q[3], bits, num_zero_points(kind, bits), eq_n)


def input_candidates(x: torch.Tensor, bits: int, eq_n: int = 128, chunk_average: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor grid of a linear input: (C, 1) each, scales clamped to ≥ 1e-4."""
    q = _row_quantiles(x.detach().reshape(1, -1), chunk_average)
    return uniform_grid(q[:, 0], q[:, 1], q[:, 2], q[:, 3], bits, num_zero_points("input", bits), eq_n, 1e-4)


def channel_candidates(x: torch.Tensor, bits: int, eq_n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (last dim) grid of a LayerNorm-fed input before reparameterization: (C, channels)."""
    q = _row_quantiles(x.detach().reshape(-1, x.shape[-1]).T, False)
    return uniform_grid(q[:, 0], q[:, 1], q[:, 2], q[:, 3], bits, num_zero_points("input", bits), eq_n, 1e-4)


def head_candidates(x: torch.Tensor, bits: int, eq_n: int = 128, chunk_average: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head grid of an attention operand (S, H, ...): (C, H) each, no scale clamp."""
    rows = x.detach().float().transpose(0, 1).reshape(x.shape[1], -1)
    q = _row_quantiles(rows, chunk_average)
    return uniform_grid(q[:, 0], q[:, 1], q[:, 2], q[:, 3], bits, num_zero_points("matmul", bits), eq_n)


def conv_candidates(w: torch.Tensor, bits: int, eq_n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    return weight_candidates(w, bits, eq_n, kind="conv")


def positive_percentiles(x: torch.Tensor, probs: tuple[float, ...] = (0.9, 1.0)) -> torch.Tensor:
    """The reference's `positive_percentile` of the flattened x: the rank-(⌈n·p⌉ − 1) element of the sorted
    positive values (n·p in float32), 0 where there is no positive value. Returns (len(probs),) float32."""
    pos = x.detach().float().reshape(-1)
    pos = pos[pos > 0]
    n = pos.numel()
    if n == 0:
        return torch.zeros(len(probs), device=x.device)
    p = torch.tensor(list(probs), dtype=torch.float32)
    ranks = (torch.tensor(float(n), dtype=torch.float32) * p).ceil().long().sub(1).clamp(0, n - 1)
    return order_statistics(pos[None], ranks.tolist())[0]


def gelu_scale_bounds(x: torch.Tensor, shift: float) -> tuple[float, float]:
    """ud = (p0.9(x > 0) + c, max(x > 0) + c), float32 values (spec §3.5 step 2)."""
    ud = positive_percentiles(x) + shift
    return ud[0], ud[1]


def linear_grid(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """lo + (hi − lo)·[i / (n − 1)], i = 0 … n − 1, in float32 (the reference's python-float ratios)."""
    ratio = torch.tensor([i / (n - 1) for i in range(n)], dtype=torch.float32, device=lo.device)
    return lo + (hi - lo) * ratio
