"""Fake-quantization core: pure primitives, granularities, quantizer modules, quantized layers, model wrapping."""
from .granularity import Granularity, PerAxis, PerChannel, PerHead, PerTensor, PerToken
from .primitives import (fake_quant_affine, fake_quant_log2, fake_quant_log_sqrt2, fake_quant_symmetric,
                         qparams_from_range, round_ste)
from .quantizers import LogQuantizer, Quantizer, UniformQuantizer, quant_state, quantizers_of, set_quant_state
from .modules import QuantConv2d, QuantLinear, QuantMatMul
from .adalog import AdaLogQuantizer, fake_quant_adalog, fold_gelu_shift

__all__ = [
    "Granularity", "PerAxis", "PerChannel", "PerHead", "PerTensor", "PerToken",
    "fake_quant_affine", "fake_quant_symmetric", "fake_quant_log2", "fake_quant_log_sqrt2", "qparams_from_range",
    "round_ste", "Quantizer", "UniformQuantizer", "LogQuantizer", "quantizers_of", "set_quant_state", "quant_state",
    "QuantLinear", "QuantConv2d", "QuantMatMul", "AdaLogQuantizer", "fake_quant_adalog", "fold_gelu_shift",
]
