"""Turn a timm ViT/DeiT/Swin model into a fake-quantizable one, in place.

Attention modules get their two matmuls as `QuantMatMul` submodules (`matmul1`: q·kᵀ, `matmul2`:
attn·v); every nn.Linear / nn.Conv2d becomes a QuantLinear / QuantConv2d. The attention forwards
follow the reference implementations: ViT multiplies the *output* of matmul1 by d^-1/2, Swin
multiplies q *before* matmul1; relative-position bias, shift mask and softmax stay in FP.
With every quantizer disabled the wrapped model reproduces the timm model.
"""
from __future__ import annotations

import torch
from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.models.swin_transformer import WindowAttention
from torch import nn

from .modules import QuantConv2d, QuantLinear, QuantMatMul
from .scheme import QuantScheme, site_of

__all__ = ["QuantViTAttention", "QuantWindowAttention", "wrap_model", "quant_layers", "register_attention"]


class QuantViTAttention(Attention):
    """timm Attention whose q·kᵀ and attn·v are quantizable matmuls (scale applied after matmul1)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.matmul1(q, k.transpose(-2, -1)) * self.scale
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.matmul2(attn, v)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class QuantWindowAttention(WindowAttention):
    """timm Swin WindowAttention with quantizable matmuls (q pre-scaled, as in the references)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self.matmul1(q * self.scale, k.transpose(-2, -1)) + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(self.softmax(attn))
        x = self.matmul2(attn, v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


_ATTENTION_SWAPS = [(WindowAttention, QuantWindowAttention), (Attention, QuantViTAttention)]


def register_attention(base: type, quant_cls: type) -> None:
    """Let `wrap_model` swap attention class `base` for `quant_cls` (a subclass whose forward calls
    `self.matmul1` / `self.matmul2`); task model adapters (e.g. SwinIR in `common.tasks.sr`) call this."""
    if (base, quant_cls) not in _ATTENTION_SWAPS:
        _ATTENTION_SWAPS.append((base, quant_cls))


def _swap_attention(module: nn.Module, scheme: QuantScheme) -> bool:
    for base, quant_cls in _ATTENTION_SWAPS:
        if type(module) is base:
            module.__class__ = quant_cls
            module.matmul1 = QuantMatMul(*scheme.matmul_quantizers("matmul1"), num_heads=module.num_heads)
            module.matmul2 = QuantMatMul(*scheme.matmul_quantizers("matmul2"), num_heads=module.num_heads)
            return True
    return False


def wrap_model(model: nn.Module, scheme: QuantScheme) -> nn.Module:
    """Wrap `model` in place and return it. Every wrapped module gets `.site` and `.qname` attributes.
    A model may name its own sites with a `quant_site(name, module)` method (default: `site_of`); a site of
    None leaves that layer FP."""
    site_fn = getattr(model, "quant_site", None) or site_of
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantLinear, QuantConv2d, QuantMatMul)):
            raise ValueError("model is already wrapped")
        if _swap_attention(module, scheme):
            for mm in ("matmul1", "matmul2"):
                sub = getattr(module, mm)
                sub.site, sub.qname = mm, f"{name}.{mm}"
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) in (nn.Linear, nn.Conv2d) and site_fn(full, child) is None:
                continue  # the model's `quant_site` keeps this layer FP (e.g. detection heads)
            if type(child) is nn.Linear:
                site = site_fn(full, child)
                new = QuantLinear.from_float(child, *scheme.layer_quantizers(site))
            elif type(child) is nn.Conv2d:
                site = site_fn(full, child)
                new = QuantConv2d.from_float(child, *scheme.layer_quantizers(site))
            else:
                continue
            new.site, new.qname = site, full
            setattr(module, child_name, new)
    return model


def quant_layers(model: nn.Module, kinds: tuple[type, ...] = (QuantLinear, QuantConv2d, QuantMatMul)):
    """(name, module) of every quantized layer in forward (named_modules) order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
