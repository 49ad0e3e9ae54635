"""Quantized layers: Linear, Conv2d and the attention MatMul, each with an input and a weight quantizer.

They keep the float module's parameter names (`weight`, `bias`), so state dicts stay readable, and
delegate all arithmetic to their quantizers. `freeze_weight()` caches the fake-quantized weight for
evaluation (weights are static after PTQ), `unfreeze_weight()` drops the cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import Quantizer

__all__ = ["QuantLinear", "QuantConv2d", "QuantMatMul", "IdentityQuantizer"]


class IdentityQuantizer(Quantizer):
    """Placeholder for a tensor that stays in floating point."""

    def __init__(self, role: str = "act"):
        super().__init__(32, role)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _WeightQuantMixin:
    """Weight fake-quant with an optional frozen cache."""

    cached_weight: torch.Tensor | None

    def quantized_weight(self) -> torch.Tensor:
        if self.cached_weight is not None:
            return self.cached_weight
        return self.weight_quantizer(self.weight)

    @torch.no_grad()
    def freeze_weight(self) -> None:
        self.cached_weight = self.weight_quantizer(self.weight).detach()

    def unfreeze_weight(self) -> None:
        self.cached_weight = None


class QuantLinear(_WeightQuantMixin, nn.Linear):
    """nn.Linear computing F.linear(Q_in(x), Q_w(W), b)."""

    @classmethod
    def from_float(cls, m: nn.Linear, input_quantizer: nn.Module, weight_quantizer: nn.Module) -> "QuantLinear":
        q = cls(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        q.weight, q.bias = m.weight, m.bias
        q.input_quantizer, q.weight_quantizer = input_quantizer, weight_quantizer
        q.cached_weight = None
        q.train(m.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)


class QuantConv2d(_WeightQuantMixin, nn.Conv2d):
    """nn.Conv2d computing conv(Q_in(x), Q_w(W), b)."""

    @classmethod
    def from_float(cls, m: nn.Conv2d, input_quantizer: nn.Module, weight_quantizer: nn.Module) -> "QuantConv2d":
        q = cls(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                dilation=m.dilation, groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode,
                device="meta")
        q.weight, q.bias = m.weight, m.bias
        q.input_quantizer, q.weight_quantizer = input_quantizer, weight_quantizer
        q.cached_weight = None
        q.train(m.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)


class QuantMatMul(nn.Module):
    """A @ B with both operands fake-quantized (q·kᵀ is `matmul1`, attn·v is `matmul2`)."""

    def __init__(self, a_quantizer: nn.Module, b_quantizer: nn.Module, num_heads: int = 1):
        super().__init__()
        self.a_quantizer = a_quantizer
        self.b_quantizer = b_quantizer
        self.num_heads = num_heads

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a_quantizer(a) @ self.b_quantizer(b)
