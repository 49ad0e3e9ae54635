"""AdaRound weight quantizer (Nagel et al. 2020), shared by BRECQ, QDrop and APHQ block reconstruction.

A calibrated asymmetric weight quantizer (s, z) is turned into a learnable rounding: each weight
is ⌊W/s⌋ + h(α) on the integer grid, with the rectified sigmoid

    h(α) = clamp(σ(α)(ζ − γ) + γ, 0, 1),        ζ = 1.1, γ = −0.1
    Ŵ    = (clamp(⌊W/s⌋ + h(α) + z, 0, 2^b − 1) − z) · s          (soft, during training)
    Ŵ    = (clamp(⌊W/s⌋ + 1[α ≥ 0] + z, 0, 2^b − 1) − z) · s       (hard, after training)

α is initialised so that h(α₀) = frac(W/s) (aphq spec §4.5): α₀ = −log((ζ − γ)/(frac − γ) − 1),
so the soft weight starts at W itself and the hard weight at round-to-nearest. The rounding
regulariser is Σ (1 − |2h(α) − 1|^β) with β annealed by :func:`beta_schedule` (λ is applied by the
caller). W and s are fixed during training, so ⌊W/s⌋ and z are cached (spec §7 item 5): a step is
one fused elementwise expression of α.

:func:`attach_adaround` swaps the calibrated weight quantizers of a unit for AdaRound ones;
:func:`finalize_adaround` writes the hard-rounded weights back and restores plain round-to-nearest
quantizers that reproduce them exactly (the reference's ``get_hard_value`` + ``round_mode='nearest'``,
with zp and clamp applied explicitly so the stored weight is the dequantized integer weight).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from common.quant.modules import QuantConv2d, QuantLinear
from common.quant.quantizers import Quantizer, UniformQuantizer
from common.models.units import Unit

__all__ = ["AdaRoundQuantizer", "beta_schedule", "attach_adaround", "finalize_adaround", "adaround_quantizers"]


def _broadcast_param(p: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Reshape a per-tensor or per-output-row parameter to broadcast against `weight`: (1,…) or (out, 1, …).

    A parameter with as many elements as the weight has rows is always read as per-row (so (out, 1)
    works for a 4-D conv weight too); other layouts must already have the weight's number of dims.
    """
    p = p.detach()
    if p.numel() == 1:
        return p.reshape((1,) * weight.dim())
    if p.numel() == weight.shape[0]:
        return p.reshape((weight.shape[0],) + (1,) * (weight.dim() - 1))
    if p.dim() == weight.dim() and torch.broadcast_shapes(p.shape, weight.shape) == weight.shape:
        return p
    raise ValueError(f"quantizer parameter of shape {tuple(p.shape)} does not broadcast against a weight of shape "
                     f"{tuple(weight.shape)}: use a per-tensor (1,) or per-output-row (out, 1, ...) scale")


class AdaRoundQuantizer(Quantizer):
    """Learnable-rounding weight quantizer built from a calibrated asymmetric :class:`UniformQuantizer`.

    Args:
        base: the calibrated weight quantizer (scale of any shape broadcasting against the weight,
            typically one per output row; integer or to-be-rounded zero-point). Must be asymmetric.
        weight: the float weight W (fixed during reconstruction).
        zeta, gamma: stretch of the rectified sigmoid (1.1, −0.1 as in AdaRound and the reference).

    Attributes:
        alpha: the learnable rounding logits, same shape as W.
        soft: True → h(α) (training); False → 1[α ≥ 0] (hard rounding).
        scale, zero_point, w_floor: cached buffers s, round(z), ⌊W/s⌋ (not learned).
    """

    def __init__(self, base: UniformQuantizer, weight: torch.Tensor, zeta: float = 1.1, gamma: float = -0.1):
        super().__init__(base.bits, "weight")
        if getattr(base, "symmetric", False):
            raise ValueError("AdaRoundQuantizer supports asymmetric quantizers only (all APHQ/BRECQ weights are)")
        if not bool(base.calibrated):
            raise ValueError("AdaRoundQuantizer needs a calibrated base quantizer (call set_qparams first)")
        self.zeta, self.gamma = float(zeta), float(gamma)
        self.enabled = base.enabled
        self.calibrated.fill_(True)
        # Remember how to rebuild the plain quantizer after training (see `to_uniform`).
        self.base_granularity = base.granularity
        self.base_round_zero_point = base.round_zero_point
        self.base_scale_shape = tuple(base.scale.shape)
        self.base_zp_shape = tuple(base.zero_point.shape)
        w = weight.detach().to(torch.float32)
        s = _broadcast_param(base.scale, w).to(torch.float32)
        z = torch.round(_broadcast_param(base.zero_point, w).to(torch.float32))
        w_div = w / s
        w_floor = torch.floor(w_div)
        rest = w_div - w_floor  # frac(W/s) in [0, 1)
        alpha = -torch.log((self.zeta - self.gamma) / (rest - self.gamma) - 1)
        self.register_buffer("scale", s.clone())
        self.register_buffer("zero_point", z.clone())
        self.register_buffer("w_floor", w_floor)
        self.alpha = nn.Parameter(alpha)
        self.soft = True

    def extra_repr(self) -> str:
        return f"bits={self.bits}, soft={self.soft}, shape={tuple(self.alpha.shape)}"

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1

    def h(self) -> torch.Tensor:
        """Rectified sigmoid h(α) ∈ [0, 1]."""
        return torch.clamp(torch.sigmoid(self.alpha) * (self.zeta - self.gamma) + self.gamma, 0, 1)

    def hard_rounding(self) -> torch.Tensor:
        """1[α ≥ 0] (float)."""
        return (self.alpha >= 0).to(self.alpha.dtype)

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        """Dequantized weight; `w` only provides shape/device (W itself is cached as ⌊W/s⌋)."""
        if w.shape != self.alpha.shape:
            raise ValueError(f"AdaRound quantizer was built for a weight of shape {tuple(self.alpha.shape)}, "
                             f"got {tuple(w.shape)}")
        r = self.h() if self.soft else self.hard_rounding()
        q = torch.clamp(self.w_floor + r + self.zero_point, 0, self.qmax)
        return (q - self.zero_point) * self.scale

    def round_loss(self, beta: float) -> torch.Tensor:
        """Σ (1 − |2h(α) − 1|^β) over all weights (multiply by λ outside)."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        """Dequantized weight with hard rounding; zero-point and clamp applied explicitly."""
        q = torch.clamp(self.w_floor + self.hard_rounding() + self.zero_point, 0, self.qmax)
        return (q - self.zero_point) * self.scale

    @torch.no_grad()
    def to_uniform(self) -> UniformQuantizer:
        """A plain round-to-nearest quantizer with the same (s, z) (shapes as the base quantizer had)."""
        q = UniformQuantizer(self.bits, symmetric=False, granularity=self.base_granularity,
                             round_zero_point=self.base_round_zero_point, role="weight")
        q.set_qparams(self.scale.reshape(self.base_scale_shape), self.zero_point.reshape(self.base_zp_shape))
        q.enabled = self.enabled
        return q.to(self.scale.device)


def beta_schedule(step: int, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float:
    """Annealing temperature β of the rounding regulariser (BRECQ/QDrop/APHQ ``LinearTempDecay``).

    β = start while step < warmup·iters, then linear decay to `end` over the remaining iterations:
    β = end + (start − end)·max(0, 1 − (step − warmup·iters)/((1 − warmup)·iters)).
    With iters = 20 000: β(3999) = β(4000) = 20, β(12 000) = 11, β(20 000) = 2.
    """
    start_decay = warmup * iters
    if step < start_decay:
        return float(start)
    rel = (step - start_decay) / max(iters - start_decay, 1e-12)
    return float(end + (start - end) * max(0.0, 1.0 - rel))


def _layers(module_or_unit: nn.Module | Unit) -> list[nn.Module]:
    module = module_or_unit.module if isinstance(module_or_unit, Unit) else module_or_unit
    return [m for m in module.modules() if isinstance(m, (QuantLinear, QuantConv2d))]


def adaround_quantizers(module_or_unit: nn.Module | Unit) -> list[AdaRoundQuantizer]:
    """The AdaRound quantizers currently attached inside a module / unit."""
    return [m.weight_quantizer for m in _layers(module_or_unit) if isinstance(m.weight_quantizer, AdaRoundQuantizer)]


def attach_adaround(module_or_unit: nn.Module | Unit, zeta: float = 1.1, gamma: float = -0.1
                    ) -> list[AdaRoundQuantizer]:
    """Replace every calibrated, quantizing UniformQuantizer weight quantizer of the QuantLinear /
    QuantConv2d layers in a unit by an AdaRound quantizer (soft rounding). Frozen weight caches are
    dropped (the weight is now trained) and restored by :func:`finalize_adaround`.

    Returns the new quantizers, in module order.
    """
    out = []
    for layer in _layers(module_or_unit):
        wq = layer.weight_quantizer
        if isinstance(wq, AdaRoundQuantizer):
            out.append(wq)
            continue
        if not isinstance(wq, UniformQuantizer) or not wq.active:
            continue
        ada = AdaRoundQuantizer(wq, layer.weight, zeta=zeta, gamma=gamma).to(layer.weight.device)
        ada.train(wq.training)
        ada.was_frozen = getattr(layer, "cached_weight", None) is not None
        layer.unfreeze_weight()
        layer.weight_quantizer = ada
        out.append(ada)
    return out


@torch.no_grad()
def finalize_adaround(module_or_unit: nn.Module | Unit) -> int:
    """Hard-round every AdaRound quantizer of a unit and put back plain quantizers.

    The layer's weight becomes Ŵ = hard_weight() (dequantized integer weight, zp and clamp applied) and
    its weight quantizer a round-to-nearest UniformQuantizer with the same (s, z). Since Ŵ/s is an
    integer within the clamp range, round-to-nearest reproduces Ŵ bit for bit, so the finalised layer
    evaluates exactly like the hard AdaRound forward. Returns the number of layers finalised.
    """
    n = 0
    for layer in _layers(module_or_unit):
        ada = layer.weight_quantizer
        if not isinstance(ada, AdaRoundQuantizer):
            continue
        ada.soft = False
        w_hat = ada.hard_weight()
        layer.weight.data.copy_(w_hat.to(layer.weight.dtype))
        uq = ada.to_uniform()
        uq.train(layer.training)
        check = uq.fake_quant(layer.weight)
        if not torch.equal(check, w_hat):  # pragma: no cover - guards against an exotic scale layout
            bad = (check != w_hat).sum().item()
            raise RuntimeError(f"finalize_adaround: round-to-nearest does not reproduce {bad} hard AdaRound weights")
        layer.weight_quantizer = uq
        if getattr(ada, "was_frozen", False):
            layer.freeze_weight()
        n += 1
    return n

