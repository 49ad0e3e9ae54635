"""AdaLog: the adaptive-base logarithmic quantizer (Wu et al., ECCV 2024; GoatWu/AdaLog at 75a57d2).

Spec: ../shared/specs/adalog.md §2.2. The base is β = 2^(q/r) with r = 37 fixed and an integer q searched
per layer (q ∈ 10…137, β ∈ [1.206, 13.0]; q = 37 is base 2). For an input x, scale s and B bits:

    x̃   = clamp(x / s, 1e-15, 1)                 values ≥ s saturate to the top level
    u   = −log2(x̃) · r / q                        (= −log_β x̃)
    i   = round(u)                                 (straight-through in training)
    m   = [i < 2^B]                                computed before clamping: codes beyond range → 0
    i_c = clamp(i, 0, 2^B − 1)

    exact form (training, block reconstruction):  x̂ = m · s · 2^(−i_c·q/r)
    table form (calibration search, evaluation):  x̂ = m · s · 2^(−T1[i_c]) · T2[i_c]
        T1[i] = ⌊i·q / r⌋,   T2[i] = LUT[(i·q) mod r] / (2^(B+1) − 2),
        LUT[j] = round(2^(−j/r) · (2^(B+1) − 2))          (a (B+1)-bit integer, j = 0 … 36)

Integer shift-plus-lookup form (what the table form computes, `adalog_integer_form`): with the integer
code i, n = i·q, shift = ⌊n/37⌋ and j = n mod 37,

    x̂ = m · (s / (2^(B+1) − 2)) · LUT[j] · 2^(−shift)

i.e. the dequantised value is the integer LUT[j] right-shifted by `shift` bits (in fixed point with
F ≥ shift fractional bits: (LUT[j] << F) >> shift, exact; `adalog_fixed_point`). Only 37 LUT entries
exist, so an accelerator needs one small table and a barrel shifter per element, no multiplier for the
base. (How the paper computes i itself without a float log was not readable; here i comes from the
float formula above, as in the reference.)

The shifted variant for post-GELU inputs quantizes x + c (c = 0.16997…, −min GELU) and returns
AdaLog(x + c) − c until the shift is folded into the consumer's bias (`fold_shift_into_bias`: b ← b −
c·Ŵ𝟙 with the weights fake-quantized at that moment), after which it returns AdaLog(x + c).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from .primitives import check_bits, round_ste
from .quantizers import Quantizer

__all__ = ["ADALOG_R", "Q_MIN", "Q_MAX", "GELU_SHIFT", "adalog_lut", "adalog_levels", "adalog_codes", "clamp_inclusive",
           "fake_quant_adalog", "adalog_integer_form", "adalog_fixed_point", "AdaLogQuantizer",
           "fold_shift_into_bias", "fold_gelu_shift"]

#: The fixed denominator r of the base exponent q / r.
ADALOG_R = 37
#: Search range of q (inclusive), as the reference evaluates it (10 … 10 + eq_n − 1 with eq_n = 128).
Q_MIN, Q_MAX = 10, 137
#: −min GELU: the post-GELU input is shifted by this to make it non-negative (reference quant_layers/linear.py L749).
GELU_SHIFT = 0.16997124254703522
#: Lower clamp of x / s (an exact zero maps to 1e-15; with large q and B ≥ 4 that is a tiny non-zero level).
CLAMP_MIN = 1e-15


def _table_den(bits: int) -> int:
    """2^(B+1) − 2 = 4·n_levels − 2, the reference's mantissa denominator (14, 30, 126 for B = 3, 4, 6)."""
    return 2 ** (bits + 1) - 2


def adalog_lut(bits: int) -> list[int]:
    """LUT[j] = round(2^(−j/37)·(2^(B+1) − 2)), j = 0 … 36 (integers in [ (2^(B+1)−2)/2, 2^(B+1)−2 ])."""
    den = _table_den(check_bits(bits))
    return [int(round(2 ** (-j / float(ADALOG_R)) * den)) for j in range(ADALOG_R)]


_LUT_CACHE: dict[tuple[int, torch.device], torch.Tensor] = {}


def _lut_tensor(bits: int, device: torch.device) -> torch.Tensor:
    key = (bits, device)
    t = _LUT_CACHE.get(key)
    if t is None:
        t = _LUT_CACHE[key] = torch.tensor(adalog_lut(bits), dtype=torch.float64, device=device)
    return t


def adalog_levels(q: torch.Tensor | int, bits: int, dtype: torch.dtype = torch.float32,
                  batched: bool = False) -> torch.Tensor:
    """Table-form level values 2^(−T1[i])·T2[i] (without the scale) for codes i = 0 … 2^B − 1.

    Args:
        q: one base exponent (int, or a tensor with one element) or, with `batched`, a tensor of them.
    Returns:
        (2^B,) for a single q, (*q.shape, 2^B) with `batched`, in `dtype` (formed in float64, then rounded
        once: the power of two is exact, so the result equals the reference's float32 2^(−T1)·fl32(T2)).
    """
    device = q.device if torch.is_tensor(q) else torch.device("cpu")
    qt = torch.as_tensor(q, device=device).to(torch.int64)
    if not batched:
        if qt.numel() != 1:
            raise ValueError(f"adalog_levels: {qt.numel()} base exponents given; pass batched=True")
        qt = qt.reshape(())
    n = qt[..., None] * torch.arange(2 ** bits, dtype=torch.int64, device=device)
    lvl = torch.ldexp(_lut_tensor(bits, device)[n % ADALOG_R] / _table_den(bits), -(n // ADALOG_R))
    return lvl.to(dtype)


def clamp_inclusive(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clamp(x, lo, hi) whose gradient is 1 on the closed interval [lo, hi] (0 outside).

    torch 1.10 (the reference's environment) passed the gradient at the bounds; torch ≥ 2 gives 0 there.
    In AdaLog's training form that matters: an STE code that lands exactly on 0 or 2^B − 1 would otherwise
    stop the cancellation of the scale's two dependencies and give it a spurious gradient.
    """
    inside = (x >= lo) & (x <= hi)
    return torch.where(inside, x, x.detach().clamp(lo, hi))


def adalog_codes(x: torch.Tensor, scale: torch.Tensor | float, q: torch.Tensor | float, bits: int,
                 ste: bool = False, clamp_min: float | None = CLAMP_MIN) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes of x: (clamped codes i_c as floats, in-range mask m as bool).

    `clamp_min=None` skips the 1e-15 / 1 clamp (the reference's post-softmax base search: −log2(0) = ∞ is
    masked to 0). `ste` makes the rounding straight-through (training), with the reference's autograd graph
    clamp → log2 → ·r/q → STE round → clamp (both clamps with the torch-1.10 gradient, `clamp_inclusive`).
    """
    clamp = clamp_inclusive if ste else torch.clamp
    xs = x / scale
    if clamp_min is not None:
        xs = clamp(xs, clamp_min, 1.0)
    u = -torch.log2(xs) * float(ADALOG_R) / q
    i = round_ste(u) if ste else torch.round(u)
    mask = i < 2 ** bits
    return clamp(i, 0, 2 ** bits - 1), mask


def fake_quant_adalog(x: torch.Tensor, scale: torch.Tensor | float, q: torch.Tensor | int, bits: int,
                      exact: bool = False, ste: bool = False, clamp_min: float | None = CLAMP_MIN,
                      levels: torch.Tensor | None = None) -> torch.Tensor:
    """AdaLog fake-quant of a non-negative input (module docstring), one base q.

    Args:
        x: input; scale: s (broadcastable); q: the base exponent (int or one-element tensor).
        exact: the training form s·2^(−i·q/r) (differentiable in s and, with `ste`, in x); otherwise the
            table form.
        ste: straight-through rounding (the reference's training mode; used with `exact`).
        clamp_min: see `adalog_codes`.
        levels: precomputed `adalog_levels(q, bits)` (table form only).
    """
    i, mask = adalog_codes(x, scale, q, bits, ste=ste, clamp_min=clamp_min)
    if exact:
        y = torch.pow(2.0, -(i * q) / float(ADALOG_R)) * scale
    else:
        if levels is None:
            levels = adalog_levels(q, bits, x.dtype if x.is_floating_point() else torch.float32)
        y = levels.to(device=x.device, dtype=x.dtype)[i.detach().long()] * scale
    return y * mask


def adalog_integer_form(codes: torch.Tensor, q: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift-plus-lookup form of integer codes i ∈ [0, 2^B − 1]: (mantissa LUT[(i·q) mod 37], shift ⌊i·q/37⌋),
    both int64, so that the table form is (s / (2^(B+1) − 2)) · mantissa · 2^(−shift)."""
    n = codes.to(torch.int64) * int(q)
    lut = torch.tensor(adalog_lut(bits), dtype=torch.int64, device=codes.device)
    return lut[n % ADALOG_R], n // ADALOG_R


def adalog_fixed_point(codes: torch.Tensor, q: int, bits: int, frac_bits: int) -> torch.Tensor:
    """(LUT[j] << frac_bits) >> shift as int64: the level times 2^frac_bits·(2^(B+1) − 2), truncated.

    Exact (no bit lost) whenever frac_bits ≥ the largest shift ⌊(2^B − 1)·q/37⌋; needs frac_bits + B + 1 < 63.
    """
    if frac_bits + bits + 1 >= 63:
        raise ValueError(f"frac_bits={frac_bits} overflows int64 at {bits} bits")
    mant, shift = adalog_integer_form(codes, q, bits)
    return torch.bitwise_right_shift(torch.bitwise_left_shift(mant, frac_bits), shift)


class AdaLogQuantizer(Quantizer):
    """AdaLog activation quantizer: per-tensor scale `s` (learnable), integer base exponent `q` (searched).

    Args:
        bits: B (2^B codes plus the implicit underflow zero).
        shift: c added before quantization (post-GELU: `GELU_SHIFT`; post-softmax: 0).
        q: initial base exponent (37 = base 2, the reference's initial value).

    State: `scale` (Parameter (1,)), `q` (int64 buffer (1,)), `shift` (buffer (1,), never learned) and
    `bias_folded` (bool buffer: the −c has been folded into the consumer's bias). Training knobs set by
    block reconstruction: `ste` (exact-base form with straight-through rounding, so `scale` learns) and
    `drop_prob` (QDrop; AdaLog's own "Retrain" does not use it). While disabled or uncalibrated the
    quantizer is the identity, except that after the bias fold it returns x + c, so the layer keeps its
    FP function.
    """

    r = ADALOG_R

    def __init__(self, bits: int, shift: float = 0.0, q: int = ADALOG_R):
        super().__init__(bits, "act")
        self.ste = False
        self.drop_prob = 1.0
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("q", torch.tensor([int(q)], dtype=torch.int64))
        self.register_buffer("shift", torch.tensor([float(shift)]))
        self.register_buffer("bias_folded", torch.tensor(False))
        self._shifted = float(shift) != 0.0  # python mirrors of the buffers (no device sync per forward)
        self._folded = False

    def extra_repr(self) -> str:
        return f"bits={self.bits}, q={int(self.q)}, base={self.base:.4f}, shift={float(self.shift):.5f}"

    @property
    def base(self) -> float:
        """β = 2^(q/37)."""
        return 2.0 ** (int(self.q) / ADALOG_R)

    @property
    def shifted(self) -> bool:
        return self._shifted

    @property
    def folded(self) -> bool:
        return self._folded

    @torch.no_grad()
    def mark_folded(self) -> None:
        self.bias_folded.fill_(True)
        self._folded = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._shifted = float(self.shift) != 0.0
        self._folded = bool(self.bias_folded)

    def scale_parameters(self) -> list[nn.Parameter]:
        return [self.scale]

    @torch.no_grad()
    def set_qparams(self, scale: torch.Tensor | float, q: int | torch.Tensor | None = None) -> None:
        """Install a searched scale (one value) and optionally a base exponent; marks the quantizer calibrated."""
        s = torch.as_tensor(scale, dtype=torch.float32).detach().reshape(-1)
        if s.numel() != 1:
            raise ValueError(f"AdaLog is per-tensor: got {s.numel()} scale values")
        self.scale.data.copy_(s.to(self.scale.device))
        if q is not None:
            qi = int(torch.as_tensor(q).reshape(-1)[0])
            if qi < 1:
                raise ValueError(f"AdaLog base exponent q={qi} out of range")
            self.q.fill_(qi)
        self.calibrated.fill_(True)

    def levels(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Table-form levels for the current q (2^B values, without the scale)."""
        return adalog_levels(self.q, self.bits, dtype)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        xs = x + self.shift.to(x.dtype) if self.shifted else x
        y = fake_quant_adalog(xs, self.scale, self.q, self.bits, exact=self.ste, ste=self.ste,
                              levels=None if self.ste else self.levels(x.dtype))
        if self.training and self.drop_prob < 1.0:
            y = torch.where(torch.rand_like(xs) < self.drop_prob, y, xs)
        if self.shifted and not self.folded:
            y = y - self.shift.to(x.dtype)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active:
            return self.fake_quant(x)
        if self.shifted and self.folded:
            return x + self.shift.to(x.dtype)
        return x


def _layers_with_shift(model: nn.Module) -> Iterator[nn.Module]:
    from .modules import QuantLinear

    for m in model.modules():
        if isinstance(m, QuantLinear) and isinstance(m.input_quantizer, AdaLogQuantizer) \
                and m.input_quantizer.shifted:
            yield m


@torch.no_grad()
def fold_shift_into_bias(layer: nn.Module) -> bool:
    """Bias reparameterization (spec §2.2.3): b ← b + Ŵ·(−c𝟙) with Ŵ the weights as fake-quantized now, and
    the quantizer stops subtracting c. The layer's function is unchanged. Returns whether it folded."""
    q = layer.input_quantizer
    if not isinstance(q, AdaLogQuantizer) or not q.shifted or q.folded:
        return False
    w_hat = layer.quantized_weight() if hasattr(layer, "quantized_weight") else layer.weight
    extra = w_hat.detach() @ torch.full((w_hat.shape[1],), -float(q.shift), device=w_hat.device, dtype=w_hat.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(extra.clone(), requires_grad=False)
    else:
        layer.bias.add_(extra)
    q.mark_folded()
    return True


def fold_gelu_shift(model: nn.Module) -> int:
    """Fold the shift of every shifted AdaLog input quantizer into its layer's bias; returns how many."""
    return sum(fold_shift_into_bias(m) for m in list(_layers_with_shift(model)))
