"""Which quantizer each tensor gets: a small declarative scheme shared by all methods.

Sites are named after the module they feed: `patch_embed` (conv), `qkv`, `proj`, `fc1`, `fc2`,
`reduction` (Swin patch merging), `head`, and the attention matmuls `matmul1` (q·kᵀ) and `matmul2`
(attn·v, whose A operand is the post-softmax probability). Each method builds a `QuantScheme` from
its config (bits + placement options) and `wrap_model` asks it for every module's quantizers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .granularity import Granularity, PerChannel, PerHead, PerTensor, PerToken
from .adalog import GELU_SHIFT, AdaLogQuantizer
from .modules import IdentityQuantizer
from .primitives import check_bits
from .quantizers import LogQuantizer, UniformQuantizer

__all__ = ["QuantScheme", "site_of"]

_ACT_GRAN = {"tensor": PerTensor(), "token": PerToken(), "channel": PerChannel(-1), "head": PerHead()}


def site_of(name: str, module: nn.Module) -> str:
    """Canonical site of a module from its qualified name."""
    last = name.split(".")[-1]
    if isinstance(module, nn.Conv2d):
        return "patch_embed"
    if last in ("matmul1", "matmul2", "qkv", "fc1", "fc2", "reduction"):
        return last
    if last == "proj" and ".attn." in f".{name}":
        return "proj"
    if name == "head" or name.startswith("head."):
        return "head"
    return "linear"


@dataclass
class QuantScheme:
    """Bit-widths and granularities per site.

    Attributes:
        w_bit / a_bit: default weight / activation bits (32 = FP).
        patch_embed_a_bit: bits of the image entering the patch-embed conv (32: FP, as both references).
        head_a_bit / head_w_bit: classifier input / weight bits (None: same as a_bit / w_bit).
        weight_granularity: "channel" (per output row) or "tensor".
        act_granularity: granularity of linear inputs: "tensor" or "token".
        ln_act_granularity: granularity at the LayerNorm-fed sites in `ln_sites` ("channel" for RepQ-style
            reparameterization before it is folded into the LayerNorm).
        matmul_granularity: "tensor" or "head" for both attention matmul operands.
        softmax_quantizer: post-softmax quantizer: "uniform", "log2", "log_sqrt2" or "adalog" (AdaLog,
            per tensor, scale 1 until searched/learned, one base per layer).
        softmax_a_bit: bits of matmul2's A operand, the post-softmax probabilities (None: a_bit; AdaLog's `s_bit`).
        post_gelu_quantizer: fc2 input quantizer: "uniform" (at act_granularity) or "adalog" (AdaLog on
            x + GELU_SHIFT, per tensor; the shift is later folded into fc2's bias).
        round_zero_point: round zero-points in the forward pass (APHQ) or allow fractional ones (RepQ/ERQ).
    """

    w_bit: int
    a_bit: int
    patch_embed_a_bit: int = 32
    head_a_bit: int | None = None
    head_w_bit: int | None = None
    weight_granularity: str = "channel"
    act_granularity: str = "tensor"
    ln_act_granularity: str = "tensor"
    ln_sites: tuple[str, ...] = ("qkv", "fc1")
    matmul_granularity: str = "tensor"
    softmax_quantizer: str = "uniform"
    softmax_a_bit: int | None = None
    post_gelu_quantizer: str = "uniform"
    symmetric_weights: bool = False
    round_zero_point: bool = True
    skip_sites: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        for b in (self.w_bit, self.a_bit, self.patch_embed_a_bit, self.head_a_bit, self.head_w_bit,
                  self.softmax_a_bit):
            if b is not None:
                check_bits(b)
        if self.softmax_quantizer not in ("uniform", "log2", "log_sqrt2", "adalog"):
            raise ValueError("softmax_quantizer must be uniform, log2, log_sqrt2 or adalog, "
                             f"not {self.softmax_quantizer!r}")
        if self.post_gelu_quantizer not in ("uniform", "adalog"):
            raise ValueError(f"post_gelu_quantizer must be uniform or adalog, not {self.post_gelu_quantizer!r}")

    def _act(self, bits: int, gran: str) -> nn.Module:
        if bits >= 32:
            return IdentityQuantizer("act")
        return UniformQuantizer(bits, granularity=_ACT_GRAN[gran], round_zero_point=self.round_zero_point)

    def _weight(self, bits: int) -> nn.Module:
        if bits >= 32:
            return IdentityQuantizer("weight")
        gran: Granularity = PerChannel(0) if self.weight_granularity == "channel" else PerTensor()
        return UniformQuantizer(bits, symmetric=self.symmetric_weights, granularity=gran,
                                round_zero_point=self.round_zero_point, role="weight")

    def layer_quantizers(self, site: str) -> tuple[nn.Module, nn.Module]:
        """(input quantizer, weight quantizer) for a Linear / Conv2d site."""
        if site in self.skip_sites:
            return IdentityQuantizer("act"), IdentityQuantizer("weight")
        if site == "patch_embed":
            return self._act(self.patch_embed_a_bit, "tensor"), self._weight(self.w_bit)
        if site == "head":
            a = self.a_bit if self.head_a_bit is None else self.head_a_bit
            w = self.w_bit if self.head_w_bit is None else self.head_w_bit
            return self._act(a, "tensor"), self._weight(w)
        if site == "fc2" and self.post_gelu_quantizer == "adalog" and self.a_bit < 32:
            return AdaLogQuantizer(self.a_bit, shift=GELU_SHIFT), self._weight(self.w_bit)
        gran = self.ln_act_granularity if site in self.ln_sites else self.act_granularity
        return self._act(self.a_bit, gran), self._weight(self.w_bit)

    def matmul_quantizers(self, site: str) -> tuple[nn.Module, nn.Module]:
        """(A quantizer, B quantizer) for `matmul1` (q, kᵀ) or `matmul2` (attn, v)."""
        if site in self.skip_sites:
            return IdentityQuantizer("act"), IdentityQuantizer("act")
        b = self._act(self.a_bit, self.matmul_granularity)
        s_bit = self.a_bit if self.softmax_a_bit is None else self.softmax_a_bit
        if site == "matmul2" and self.softmax_quantizer == "adalog" and s_bit < 32:
            a = AdaLogQuantizer(s_bit)
        elif site == "matmul2" and self.softmax_quantizer != "uniform" and s_bit < 32:
            a = LogQuantizer(s_bit, base="2" if self.softmax_quantizer == "log2" else "sqrt2")
        else:
            a = self._act(s_bit if site == "matmul2" else self.a_bit, self.matmul_granularity)
        return a, b
