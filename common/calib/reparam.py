"""RepQ-ViT LayerNorm reparameterization, shared by RepQ/ERQ and APHQ.

Given per-channel activation quantization parameters (Δ_c, z_c) of a LayerNorm output that feeds a
linear layer (qkv, fc1, Swin `reduction`), fold the channel variation into the LayerNorm affine and
the linear weights so that one per-tensor quantizer (Δ̄, z̄) reproduces the per-channel grid:

    Δ̄ = mean_c Δ_c,  z̄ = mean_c z_c (RepQ/ERQ keep it fractional; APHQ rounds it)
    r_c = Δ_c / Δ̄,   β_c = (−z_c Δ_c) / r_c − (−z̄ Δ̄)
    LayerNorm:  γ_c ← γ_c / r_c,   η_c ← η_c / r_c − β_c          (so x'_c = x_c / r_c − β_c)
    Linear:     W[:, c] ← W[:, c] · r_c,   b ← b + W_new β         (bias created if absent)

The FP function is unchanged: W_new x' + b_new = W x + b. Quantized, x'_c/Δ̄ = x_c/Δ_c + z_c − z̄, so
the per-tensor grid equals the per-channel one whenever z_c − z̄ is an integer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Reparam", "reparameterize_layernorm", "LN_SITES", "prev_norm"]

#: Linear sites whose input is a LayerNorm output folded by the reparameterization.
LN_SITES = ("qkv", "fc1", "reduction")


def prev_norm(model: nn.Module, qname: str, site: str) -> nn.LayerNorm | None:
    """The affine LayerNorm feeding a qkv (norm1), fc1 (norm2) or Swin reduction (PatchMerging.norm) layer
    named `qname` in `model`, or None (other sites, no such module, no affine parameters)."""
    parts = qname.split(".")
    if site in ("qkv", "fc1") and len(parts) >= 3:
        name = ".".join(parts[:-2] + ["norm1" if site == "qkv" else "norm2"])
    elif site == "reduction":
        name = ".".join(parts[:-1] + ["norm"])
    else:
        return None
    try:
        norm = model.get_submodule(name)
    except AttributeError:
        return None
    ok = isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is not None
    return norm if ok else None


@dataclass
class Reparam:
    """Result of one reparameterization: channel ratios r, shifts β, and the per-tensor (Δ̄, z̄)."""

    ratio: torch.Tensor
    shift: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """Map a cached FP LayerNorm output to the reparameterized one: x / r − β."""
        return x / self.ratio - self.shift


@torch.no_grad()
def reparameterize_layernorm(norm: nn.LayerNorm, linear: nn.Linear, scale: torch.Tensor, zero_point: torch.Tensor,
                             round_mean_zero_point: bool = False) -> Reparam:
    """Fold per-channel (Δ_c, z_c) of `norm`'s output into `norm` and `linear`, in place.

    Args:
        norm: the LayerNorm whose output feeds `linear` (must have an affine weight and bias).
        linear: the consumer; its weight (out, C) columns are scaled, its bias updated or created.
        scale, zero_point: per-channel parameters, any shape with C elements.
        round_mean_zero_point: round z̄ (APHQ) instead of keeping it fractional (RepQ-ViT, ERQ).
    """
    s = scale.reshape(-1).to(torch.float32)
    z = zero_point.reshape(-1).to(torch.float32)
    s_bar = s.mean()
    z_bar = z.mean().round() if round_mean_zero_point else z.mean()
    r = s / s_bar
    shift = (-z * s) / r - (-z_bar * s_bar)
    norm.weight.div_(r)
    norm.bias.div_(r).sub_(shift)
    linear.weight.mul_(r[None, :])
    extra = linear.weight @ shift
    if linear.bias is None:
        linear.bias = nn.Parameter(extra.clone())
    else:
        linear.bias.add_(extra)
    return Reparam(ratio=r, shift=shift, scale=s_bar.reshape(1), zero_point=z_bar.reshape(1))
