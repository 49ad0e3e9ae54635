"""Streaming sufficient statistics of a layer's calibration input (replaces the reference's activation dump).

ERQ's Aqer and Wqer see a layer only through its FP input X (N rows) and its own activation quantizer
Q_a. With Ã = [X̃, 1], X̃ = Q_a(X), everything they need is (spec §10.1):

    G = ÃᵀÃ             ((d+1) × (d+1); the ones column gives the column sums and N)
    ÃᵀR = Ãᵀ(X − X̃)Wᵀ   ((d+1) × d_out; Aqer's right-hand side, the FP outputs are never stored)

ÃᵀR is accumulated as C = Ãᵀ(X − X̃) (then C Wᵀ) when d_in < 2 d_out, else directly from the
batch residual (X − X̃)Wᵀ, whichever costs fewer multiply-adds (fc2: half). Everything is summed
batch by batch in float64 (each batch product in `dtype`), so any number of calibration images fits
in O(d²) memory per layer, and only the layers of one unit are live at once.
For a conv (the patch embedding) the rows are im2col patches in the weight's (C, kh, kw) order.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from common.quant.modules import QuantConv2d
from common.quant.quantizers import Quantizer, UniformQuantizer

__all__ = ["LayerStats", "layer_rows", "collect_stats", "apply_quantizer"]


def apply_quantizer(q: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """q's fake-quant of x regardless of its `enabled` flag (identity when FP or uncalibrated).

    A per-tensor asymmetric uniform quantizer (every ERQ linear input after reparameterization) takes
    an in-place path with the same operations in the same order as `fake_quant_affine` (bit-identical,
    one allocation instead of six).
    """
    if not (isinstance(q, Quantizer) and q.bits < 32 and bool(q.calibrated)):
        return x
    if isinstance(q, UniformQuantizer) and not q.symmetric and q.scale.numel() == 1:
        scale = float(q.scale.detach())
        zp = float(torch.round(q.zero_point)) if q.round_zero_point else float(q.zero_point)
        t = x / scale
        t.round_().add_(zp).clamp_(0, 2 ** q.bits - 1)
        return t.sub_(zp).mul_(scale)
    return q.fake_quant(x)


def _im2col(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def layer_rows(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, X̃) as (rows, features) matrices for a QuantLinear / QuantConv2d input x."""
    xq = apply_quantizer(layer.input_quantizer, x)
    if isinstance(layer, QuantConv2d):
        return _im2col(layer, x), _im2col(layer, xq)
    return x.reshape(-1, x.shape[-1]), xq.reshape(-1, xq.shape[-1])


class LayerStats:
    """G = ÃᵀÃ and (optionally) Aqer's right-hand side ÃᵀR of one layer, accumulated in float64.

    Args:
        features: d_in (conv: C·kh·kw).
        weight: the layer's FP weight (d_out, d_in) when Aqer needs ÃᵀR = Ãᵀ(X − X̃)Wᵀ; None for G only.
        dtype: dtype of each batch's products (float32 like the reference, or float64).
    """

    def __init__(self, features: int, weight: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.features = features
        self.dtype = dtype
        self._gram = torch.zeros(features + 1, features + 1, dtype=torch.float64, device=device)
        self._mirrored = True
        nb = max(1, min(4, features // 256))  # Gram column blocks: only the upper block pairs are multiplied
        self._blocks = [(i * features // nb, (i + 1) * features // nb) for i in range(nb)]
        self.weight = None if weight is None else weight.detach().reshape(weight.shape[0], -1)
        self._via_cross = self.weight is not None and features < 2 * self.weight.shape[0]
        self._acc = None
        if self.weight is not None:
            cols = features if self._via_cross else self.weight.shape[0]
            self._acc = torch.zeros(features + 1, cols, dtype=torch.float64, device=device)

    @property
    def gram(self) -> torch.Tensor:
        """G = ÃᵀÃ, (d+1) × (d+1) float64, the ones column last."""
        if not self._mirrored:
            for i, (a0, a1) in enumerate(self._blocks):
                for b0, b1 in self._blocks[i + 1:]:
                    self._gram[b0:b1, a0:a1] = self._gram[a0:a1, b0:b1].T
            self._mirrored = True
        return self._gram

    @property
    def rows(self) -> int:
        """N, the number of input rows seen."""
        return int(round(float(self._gram[-1, -1])))

    @property
    def has_rhs(self) -> bool:
        return self._acc is not None

    def aqer_rhs(self) -> torch.Tensor:
        """ÃᵀR = Ãᵀ(X − X̃)Wᵀ, shape (d_in + 1, d_out), float64 (rows: the ones column last)."""
        if self._acc is None:
            raise ValueError("Aqer statistics were not collected (LayerStats(weight=...))")
        return self._acc @ self.weight.double().T if self._via_cross else self._acc

    @torch.no_grad()
    def update(self, x: torch.Tensor, xq: torch.Tensor) -> None:
        """Add a batch of FP rows x and their quantized version xq (both (rows, features))."""
        d = self.features
        xq_c = xq.to(self.dtype)
        colsum = xq.sum(0, dtype=torch.float64)
        g = self._gram
        for i, (a0, a1) in enumerate(self._blocks):  # symmetric: upper block pairs only
            for b0, b1 in self._blocks[i:]:
                g[a0:a1, b0:b1] += xq_c[:, a0:a1].T @ xq_c[:, b0:b1]
        self._mirrored = len(self._blocks) == 1
        g[:d, d] += colsum
        g[d, :d] += colsum
        g[d, d] += xq.shape[0]
        if self._acc is not None:
            diff = (x - xq).to(self.dtype)
            if not self._via_cross:  # residual of the layer output, (rows, d_out)
                diff = diff @ self.weight.to(self.dtype).T
            self._acc[:d] += xq_c.T @ diff
            self._acc[d] += diff.sum(0, dtype=torch.float64)


@contextlib.contextmanager
def collect_stats(layers: dict[str, nn.Module], stats: dict[str, LayerStats]) -> Iterator[None]:
    """Forward hooks that feed each layer's input into its LayerStats (nothing is stored)."""
    handles = []

    def make(name: str):
        def hook(mod, args, _out):
            x, xq = layer_rows(mod, args[0].detach())
            stats[name].update(x, xq)
        return hook

    for name, layer in layers.items():
        handles.append(layer.register_forward_hook(make(name)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
