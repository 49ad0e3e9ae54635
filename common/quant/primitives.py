"""Pure fake-quantization arithmetic (no modules, no state).

All functions return the de-quantized tensor ("fake quant"), in the input dtype. Rounding is
`torch.round` (half to even), as in both reference implementations.
"""
from __future__ import annotations

import torch

__all__ = ["round_ste", "fake_quant_affine", "fake_quant_symmetric", "fake_quant_log2", "fake_quant_log_sqrt2",
           "qparams_from_range", "check_bits"]


def check_bits(bits: int) -> int:
    """Validate a bit-width: 2..16 integer levels, or 32 (= no quantization)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not (bits == 32 or 1 <= bits <= 16):
        raise ValueError(f"bit-width {bits!r} is not supported: use an integer in 2..8 (up to 16) or 32 for FP")
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through gradient (identity backward)."""
    return x + (torch.round(x) - x).detach()


def fake_quant_affine(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                      round_zero_point: bool = True, ste: bool = False) -> torch.Tensor:
    """Asymmetric uniform fake-quant on the integer grid [0, 2^b - 1].

    q = clamp(round(x / s) + z, 0, 2^b - 1);  x_hat = (q - z) * s.
    With `round_zero_point` (APHQ), z is rounded (and gets no gradient); without it (RepQ/ERQ after
    LayerNorm reparameterization) z may be fractional.
    `ste` makes the rounding of x / s straight-through so that `scale` receives LSQ-style gradients.
    """
    z = torch.round(zero_point).detach() if round_zero_point else zero_point
    rnd = round_ste if ste else torch.round
    q = torch.clamp(rnd(x / scale) + z, 0, 2 ** bits - 1)
    return (q - z) * scale


def fake_quant_symmetric(x: torch.Tensor, scale: torch.Tensor, bits: int, ste: bool = False) -> torch.Tensor:
    """Symmetric (signed) uniform fake-quant on [-2^(b-1), 2^(b-1) - 1]."""
    rnd = round_ste if ste else torch.round
    n = 2 ** (bits - 1)
    return torch.clamp(rnd(x / scale), -n, n - 1) * scale


def _log_levels(x: torch.Tensor, scale: torch.Tensor, per_octave: int) -> torch.Tensor:
    return torch.round(-per_octave * torch.log2(x / scale))


def fake_quant_log2(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """log2 fake-quant for non-negative inputs (post-softmax): x_hat = s * 2^-q, q in [0, 2^b - 1].

    Values above s clip to s; levels at or beyond 2^b underflow to exactly 0.
    """
    level = _log_levels(x, scale, 1)
    q = torch.clamp(level, 0, 2 ** bits - 1)
    return torch.where(level >= 2 ** bits, torch.zeros_like(x), scale * torch.exp2(-q))


def fake_quant_log_sqrt2(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """log-sqrt2 fake-quant (RepQ-ViT's post-softmax quantizer): x_hat = s * 2^(-q/2), underflow to 0."""
    level = _log_levels(x, scale, 2)
    q = torch.clamp(level, 0, 2 ** bits - 1)
    return torch.where(level >= 2 ** bits, torch.zeros_like(x), scale * torch.exp2(-q / 2))


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, round_zero_point: bool = True,
                       min_scale: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scale and zero-point that map [lo, hi] onto [0, 2^b - 1] (z = -round(lo / s))."""
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(min_scale)
    zp = -lo / scale
    return scale, (torch.round(zp) if round_zero_point else zp)
