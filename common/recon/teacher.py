"""The FP teacher's side of KL-based reconstruction losses: strict-fp32 passes, the temperature KL.

Shared by every method whose loss weights come from gradients of KL(p_FP ‖ softmax(f(·)/T)) (APHQ's APH
and BRECQ Fisher, FIMA-Q's Fisher snapshots). Moved here unchanged from `aphq/aph.py`, which re-exports
the names.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["strict_fp32", "kl_batchmean", "fp_logits", "device_of"]


@contextlib.contextmanager
def strict_fp32(model: nn.Module, unfused_attention: bool = True) -> Iterator[nn.Module]:
    """Eval mode, frozen parameters, TF32 off, optionally unfused timm attention; all restored on exit."""
    saved_rg = [(p, p.requires_grad) for p in model.parameters()]
    saved_train = [(m, m.training) for m in model.modules()]
    saved_fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    saved_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                  torch.get_float32_matmul_precision())
    try:
        model.eval()
        for p, _ in saved_rg:
            p.requires_grad_(False)
        if unfused_attention:
            for m, _ in saved_fused:
                m.fused_attn = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        with contextlib.ExitStack() as stack:
            for kind in ("cpu",) + (("cuda",) if torch.cuda.is_available() else ()):
                stack.enter_context(torch.autocast(device_type=kind, enabled=False))
            yield model
    finally:
        for p, flag in saved_rg:
            p.requires_grad_(flag)
        for m, flag in saved_train:
            m.training = flag
        for m, flag in saved_fused:
            m.fused_attn = flag
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_tf32[:2]
        torch.set_float32_matmul_precision(saved_tf32[2])


def kl_batchmean(logits: torch.Tensor, p: torch.Tensor, temp: float, divisor: int | None = None) -> torch.Tensor:
    """KL(p ‖ softmax(logits / T)) summed over classes and divided by `divisor` (default: batch size).

    Stacked ±ε batches pass `divisor` = the per-sign batch, so each half matches the reference's
    'batchmean' over its batch of 32.
    """
    kl = F.kl_div(F.log_softmax(logits / temp, dim=-1), p, reduction="sum")
    return kl / (logits.shape[0] if divisor is None else divisor)


@torch.no_grad()
def fp_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 32,
              device: torch.device | str | None = None) -> torch.Tensor:
    """Logits of `model` over `images` in strict fp32 (the teacher for KL-based losses)."""
    device = device_of(model) if device is None else torch.device(device)
    with strict_fp32(model):
        return torch.cat([model(b.to(device)) for b in images.split(batch_size)])


def device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


_device_of = device_of
