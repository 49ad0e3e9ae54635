"""Quantizing the detection heads (`model.quantize_heads=true`) with methods that only reach the backbone.

ptq and erq calibrate unit by unit over the units a model exposes (`vitq_units`: the Swin body), so with the heads
wrapped, FPN / RPN / RoI-head quantizers stay uncalibrated (= pass-through, FP). `calibrate_uncovered` fills them
in the RepQ-ViT way: every uncalibrated uniform weight quantizer gets a per-row percentile-MSE search on its
weights, then one forward over the calibration images fits every uncalibrated input quantizer lazily on the first
(upstream-quantized) tensor it receives (RepQ-ViT: a module called per FPN level is fitted on its first call, P2).
"""
from __future__ import annotations

import torch
from torch import nn

from common.calib.percentile import search_uniform_percentile
from common.quant.quantizers import UniformQuantizer, quantizers_of

__all__ = ["calibrate_uncovered", "GRID"]

GRID = (0.999, 0.9999, 0.99999)


def _fit(q: UniformQuantizer, x: torch.Tensor, per_row: bool) -> None:
    rows = x.reshape(x.shape[0], -1) if per_row else x.reshape(1, -1)
    s, z = search_uniform_percentile(rows, q.bits, GRID)
    if per_row:
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        s, z = s.reshape(shape), z.reshape(shape)
    q.set_qparams(s, z)


@torch.no_grad()
def calibrate_uncovered(model: nn.Module, images: torch.Tensor) -> list[str]:
    """Fit the enabled uniform quantizers the method left uncalibrated; returns their names."""
    filled: list[str] = []
    for name, m in model.named_modules():
        wq = getattr(m, "weight_quantizer", None)
        if isinstance(wq, UniformQuantizer) and wq.enabled and wq.bits < 32 and not bool(wq.calibrated):
            _fit(wq, m.weight.detach(), per_row=True)
            filled.append(f"{name}.weight_quantizer")
    handles = []
    names = {id(q): n for n, q in quantizers_of(model)}

    def hook(q: UniformQuantizer, args):
        if q.enabled and q.bits < 32 and not bool(q.calibrated):
            _fit(q, args[0].detach(), per_row=False)
            filled.append(names.get(id(q), "?"))

    for _, q in quantizers_of(model):
        if isinstance(q, UniformQuantizer) and q.role != "weight":
            handles.append(q.register_forward_pre_hook(hook))
    try:
        model.eval()
        model(list(images))
    finally:
        for h in handles:
            h.remove()
    return filled
