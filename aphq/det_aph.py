"""APHQ-ViT's detection perturbation weights (detection spec §3.3, §3.5 step 3): per image, not averaged.

For a site (a block MLP, or a backbone unit) of the FP detector, the site's output is shifted by ±ε·𝟙
(ε = 1e-3 in detection), the FP detector runs to its RPN head, and the RPN loss against the unshifted FP RPN
outputs (`common.tasks.detection.recon.rpn_loss`) is differentiated w.r.t. the site output, giving g₊ and g₋.
The weight of image i is G_i = |g₊ − g₋| · numel / Σ|g₊ − g₋| (mean 1), one tensor per image, each of its own
shape (images differ in size).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from common.tasks.detection.recon import pad_image, perturbed_output, rpn_loss, rpn_outputs, warn_no_positive

__all__ = ["perturbation_weights", "normalise_mean_one", "frozen"]


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Parameters of `model` without gradients for the duration (restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def normalise_mean_one(d: torch.Tensor) -> torch.Tensor:
    """d · numel / Σd (mean 1); a zero tensor (a site the RPN loss does not reach) becomes all ones."""
    total = d.sum()
    if not float(total) > 0:
        return torch.ones_like(d)
    return d * (d.numel() / total)


def perturbation_weights(fp_model: nn.Module, site: nn.Module, images: Sequence[torch.Tensor],
                         fp_rpn: Sequence[tuple[list[torch.Tensor], list[torch.Tensor]]], eps: float,
                         device: torch.device, pos_thresh: float = 0.7, where: str = "") -> list[torch.Tensor]:
    """Per-image G (CPU, shape of the site's output) for `site` (a module of `fp_model`)."""
    out, bad = [], 0
    fp_model.eval()
    with frozen(fp_model), torch.enable_grad():
        for img, (cls_fp, reg_fp) in zip(images, fp_rpn):
            x = pad_image(fp_model, img.to(device))
            cls_fp = [c.to(device) for c in cls_fp]
            reg_fp = [r.to(device) for r in reg_fp]
            grads = []
            for sign in (1.0, -1.0):
                with perturbed_output(site, lambda s=sign: s * eps) as leaves:
                    cls, reg = rpn_outputs(fp_model, x)
                loss, ok = rpn_loss(cls, reg, cls_fp, reg_fp, pos_thresh)
                bad += 0 if ok or sign < 0 else 1
                if len(leaves) != 1:
                    raise RuntimeError(f"perturbation site {where!r} ran {len(leaves)} times in one forward")
                g = torch.autograd.grad(loss, leaves[0], allow_unused=True)[0] if loss.requires_grad else None
                grads.append(torch.zeros_like(leaves[0]) if g is None else g.detach())
            out.append(normalise_mean_one((grads[0] - grads[1]).abs()).cpu())
    if bad:
        warn_no_positive(where or "perturbation weights", bad)
    return out

