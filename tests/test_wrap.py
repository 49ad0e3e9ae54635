"""Wrapping keeps the timm function exactly when quantization is off; units reproduce the model."""
from __future__ import annotations

import pytest
import timm
import torch

from common.quant import QuantConv2d, QuantLinear, QuantMatMul, UniformQuantizer, quant_state
from common.quant.scheme import QuantScheme
from common.quant.wrap import QuantViTAttention, QuantWindowAttention, quant_layers, wrap_model
from common.models.units import model_units, run_units

ARCHS = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "vit_small_patch16_224",
         "vit_base_patch16_224", "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224",
         "swin_base_patch4_window7_224"]


@pytest.mark.parametrize("name", ARCHS)
def test_wrapped_model_reproduces_timm_logits(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        units_out = run_units(model_units(model), x)
        wrap_model(model, QuantScheme(w_bit=4, a_bit=4, matmul_granularity="head"))
        out = model(x)
    assert (units_out - ref).abs().max().item() < 1e-4
    assert (out - ref).abs().max().item() < 1e-4
    layers = dict(quant_layers(model))
    n_blocks = sum(1 for n in layers if n.endswith("matmul1"))
    assert n_blocks == sum(isinstance(m, (QuantViTAttention, QuantWindowAttention)) for m in model.modules()) > 0
    assert sum(isinstance(m, QuantMatMul) for m in layers.values()) == 2 * n_blocks
    assert sum(isinstance(m, QuantConv2d) for m in layers.values()) == 1
    expected_linear = 4 * n_blocks + 1 + (3 if name.startswith("swin") else 0)  # qkv proj fc1 fc2, head, reductions
    assert sum(isinstance(m, QuantLinear) for m in layers.values()) == expected_linear


def test_quantizers_act_where_the_scheme_puts_them():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1).eval()
    wrap_model(model, QuantScheme(w_bit=4, a_bit=3, head_a_bit=8, softmax_quantizer="log_sqrt2",
                                  matmul_granularity="head"))
    layers = dict(quant_layers(model))
    assert layers["patch_embed.proj"].input_quantizer.bits == 32  # image stays FP
    assert layers["head"].input_quantizer.bits == 8
    assert layers["blocks.0.attn.qkv"].weight_quantizer.bits == 4
    assert type(layers["blocks.0.attn.matmul2"].a_quantizer).__name__ == "LogQuantizer"
    assert layers["blocks.0.attn.matmul1"].a_quantizer.granularity.axes == (1,)
    assert layers["blocks.0.mlp.fc2"].site == "fc2" and layers["blocks.0.attn.proj"].site == "proj"


def test_quantization_changes_output_only_when_enabled():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        wrap_model(model, QuantScheme(w_bit=4, a_bit=4))
        for _, m in model.named_modules():
            if isinstance(m, UniformQuantizer):
                m.set_qparams(torch.tensor([0.05]), torch.tensor([8.0]))
        quantized = model(x)
        with quant_state(model, weight=False, act=False):
            off = model(x)
    assert torch.equal(off, ref) or (off - ref).abs().max() < 1e-5
    assert (quantized - ref).abs().max() > 1e-2
