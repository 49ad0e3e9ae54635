"""Baseline methods: `fp` (no quantization) and `ptq` (plain per-layer PTQ).

`ptq`: per-output-channel asymmetric weights and per-tensor asymmetric activations (including both
attention-matmul operands and the post-softmax probabilities), every module calibrated on FP
activations. Scales come from a grid of clipping ratios of the min/max range:
  * weights, per row: the ratio minimising the layer-output error on the calibration inputs,
    eᵀ(XᵀX)e with e = ŵ − w (exact output SSE, computed from the Gram matrix);
  * activations, per tensor: the ratio minimising the output MSE of the layer (with quantized weights)
    or of the matmul (A searched with B in FP, then B with A quantized).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from common.calib.capture import (batched, capture_io, clip_candidates, gram_of, iter_unit_inputs, reduce_minmax,
                          search_by_error, search_weight_by_gram)
from common.run.registry import PTQMethod, register_method, scheme_from_bits
from common.quant import PerTensor, QuantConv2d, QuantLinear, QuantMatMul, UniformQuantizer, quant_state
from common.quant.primitives import fake_quant_affine
from common.quant.wrap import quant_layers, wrap_model
from common.models.units import model_units

__all__ = ["FloatingPoint", "MinMaxMSE"]


@register_method("fp")
class FloatingPoint(PTQMethod):
    """No quantization: the quantized model is the FP model (a sanity row in tables)."""

    tasks = ("classification", "sr", "detection")

    def quantize(self, model: nn.Module, data) -> nn.Module:
        return model


def _patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col rows (N·L, C·kh·kw) of a conv input, matching weight.reshape(out, -1)."""
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@register_method("ptq")
class MinMaxMSE(PTQMethod):
    """Per-channel weights, per-tensor activations, clip ratios searched by output MSE."""

    tasks = ("classification", "sr", "detection")

    def quantize(self, model: nn.Module, data) -> nn.Module:
        cfg = self.cfg
        images, _ = data.calibration(self.n_calib())
        wrap_model(model, scheme_from_bits(self.bits))
        model.to(self.ctx.device)
        units = model_units(model)

        def compute() -> dict:
            w_ratios = [float(r) for r in cfg.weight_clip_ratios]
            a_ratios = [float(r) for r in cfg.act_clip_ratios]
            with quant_state(model, weight=False, act=False):
                bar = tqdm(iter_unit_inputs(units, images, cfg.batch_size, self.ctx.device), total=len(units),
                           desc="ptq calibration", mininterval=2.0)
                for _, unit, x in bar:
                    layers = dict(quant_layers(unit.module))
                    with capture_io(layers, arg=None, outputs=True) as io:
                        for b in batched(x, cfg.batch_size):
                            unit.module(b)
                    for name, layer in layers.items():
                        ins = [torch.cat(t) for t in zip(*io[name]["inputs"])]
                        out = torch.cat(io[name]["outputs"])
                        if isinstance(layer, QuantMatMul):
                            self._calibrate_matmul(layer, ins[0], ins[1], out, a_ratios)
                        else:
                            self._calibrate_layer(layer, ins[0], out, w_ratios, a_ratios)
            return {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}

        result, _ = self.ctx.stage("ptq_calibrate", self.config_key(), compute)
        model.load_state_dict(result["state_dict"])
        return model

    @staticmethod
    def _act_candidates(q: UniformQuantizer, x: torch.Tensor, ratios):
        lo, hi = reduce_minmax(x, PerTensor())
        return clip_candidates(lo.reshape(1).clamp(max=0), hi.reshape(1).clamp(min=0), q.bits, ratios)

    def _calibrate_layer(self, layer, x, y, w_ratios, a_ratios) -> None:
        wq, aq = layer.weight_quantizer, layer.input_quantizer
        if isinstance(wq, UniformQuantizer):
            rows = _patches(layer, x) if isinstance(layer, QuantConv2d) else x.reshape(-1, x.shape[-1])
            s, z = search_weight_by_gram(layer.weight.detach(), wq.bits, gram_of(rows), w_ratios)
            wq.set_qparams(s, z)
        if isinstance(aq, UniformQuantizer):
            w_hat = wq.fake_quant(layer.weight) if isinstance(wq, UniformQuantizer) else layer.weight
            fwd = (lambda inp: F.linear(inp, w_hat, layer.bias)) if isinstance(layer, QuantLinear) else \
                (lambda inp: layer._conv_forward(inp, w_hat, layer.bias))

            def err(s, z):
                return sum(F.mse_loss(fwd(fake_quant_affine(xb, s, z, aq.bits)), yb, reduction="sum")
                           for xb, yb in zip(batched(x, 64), batched(y, 64)))
            aq.set_qparams(*search_by_error(self._act_candidates(aq, x, a_ratios), err))

    def _calibrate_matmul(self, mm: QuantMatMul, a, b, y, ratios) -> None:
        qa, qb = mm.a_quantizer, mm.b_quantizer
        a_hat = a
        if isinstance(qa, UniformQuantizer):
            qa.set_qparams(*search_by_error(self._act_candidates(qa, a, ratios),
                                            lambda s, z: F.mse_loss(fake_quant_affine(a, s, z, qa.bits) @ b, y)))
            a_hat = qa.fake_quant(a)
        if isinstance(qb, UniformQuantizer):
            qb.set_qparams(*search_by_error(self._act_candidates(qb, b, ratios),
                                            lambda s, z: F.mse_loss(a_hat @ fake_quant_affine(b, s, z, qb.bits), y)))
