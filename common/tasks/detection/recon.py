"""Detection pieces of APHQ-ViT's detection pipeline (detection spec §3.3, §3.5, §3.6): the reconstruction units
(patch_embed, PatchMergings and Swin blocks in model order, the whole FPN as one unit), per-image capture of a
unit's input and output (every image keeps its own size: lists, batch 1), the detector's RPN outputs, and the
RPN loss whose gradients give the perturbation weights.

Unit inputs / outputs are tensors, or for the FPN unit (an OrderedDict of levels in, of levels out) lists of
tensors in level order; `as_list` / `unit_call` hide the difference.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections import OrderedDict
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.models.units import Unit

__all__ = ["detection_units", "rpn_outputs", "rpn_loss", "capture_unit_io", "unit_call", "as_list",
           "perturbed_output", "pad_image", "warn_no_positive", "FPN_UNIT"]

#: name of the FPN unit (the whole neck, as the reference's `neck`)
FPN_UNIT = "backbone.fpn"

def pad_image(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """A pre-processed image (3, h, w) as the detector's batch of one: bottom/right zero pad to 32."""
    return model._pad(image[None])


def detection_units(model: nn.Module, with_fpn: bool = True) -> list[Unit]:
    """patch_embed, PatchMergings and Swin blocks (forward order, `vitq_units`), then the FPN (kind "fpn")."""
    units = list(model.vitq_units())
    if with_fpn:
        units.append(Unit(FPN_UNIT, model.backbone.fpn, kind="fpn"))
    return units


def as_list(x) -> list[torch.Tensor]:
    """An FPN OrderedDict (or a list) as a list of levels; a tensor as [tensor]."""
    if isinstance(x, dict):
        return list(x.values())
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


def unit_call(unit: Unit, x) -> torch.Tensor | list[torch.Tensor]:
    """Run a unit on a stored input (a tensor, or the FPN's list of levels); the FPN returns its levels."""
    if unit.kind == "fpn":
        return as_list(unit.module(OrderedDict((str(i), t) for i, t in enumerate(x))))
    return unit.module(x)


def _first_arg(args):
    a = args[0]
    return [t.detach().cpu() for t in a.values()] if isinstance(a, dict) else a.detach().cpu()


def _detached(out):
    return [t.detach().cpu() for t in out.values()] if isinstance(out, dict) else out.detach().cpu()


@torch.no_grad()
def capture_unit_io(model: nn.Module, modules: dict[str, nn.Module], images: Sequence[torch.Tensor],
                    device: torch.device, outputs: bool = True, rpn: bool = False) -> dict[str, dict[str, list]]:
    """Per image and module: the input (and output) of each of `modules` during the backbone forward of
    `model` (CPU copies; an FPN unit's levels as lists), and under key "rpn" with `rpn` the RPN outputs
    (σ(objectness), deltas per level) per image. The RoI heads are not run."""
    store: dict[str, dict[str, list]] = {k: {"inputs": [], "outputs": []} for k in modules}
    store["rpn"] = {"outputs": []}

    def make(key: str):
        def hook(_m, args, out):
            store[key]["inputs"].append(_first_arg(args))
            if outputs:
                store[key]["outputs"].append(_detached(out))
        return hook

    handles = [m.register_forward_hook(make(k)) for k, m in modules.items()]
    try:
        for img in images:
            x = pad_image(model, img.to(device))
            if rpn:
                cls, reg = rpn_outputs(model, x)
                store["rpn"]["outputs"].append(([c.cpu() for c in cls], [r.cpu() for r in reg]))
            else:
                model.backbone(x)
    finally:
        for h in handles:
            h.remove()
    return store


def rpn_outputs(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """σ(objectness) and raw deltas per FPN level of a padded batch (the RPN head's conv outputs)."""
    feats = model.backbone(x)
    cls, reg = model.rpn.head(list(feats.values()))
    return [torch.sigmoid(c) for c in cls], list(reg)


def _bkl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """mean[q log(q/p) + (1−q) log((1−q)/(1−p))], both clamped to [eps, 1 − eps]."""
    p, q = p.clamp(eps, 1 - eps), q.clamp(eps, 1 - eps)
    return (q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))).mean()


def rpn_loss(cls: Sequence[torch.Tensor], reg: Sequence[torch.Tensor], cls_fp: Sequence[torch.Tensor],
             reg_fp: Sequence[torch.Tensor], pos_thresh: float = 0.7) -> tuple[torch.Tensor, bool]:
    """APHQ's RPN loss ℓ_cls/sg(ℓ_cls) + ℓ_reg/sg(ℓ_reg) (spec §3.5 step 3) and whether ℓ_reg is defined.

    ℓ_cls = Σ_l BKL(σ_l, σ_l^FP); ℓ_reg = Σ_l SmoothL1_mean(M_l ⊙ reg_l, M_l ⊙ reg_l^FP) (β = 1), M_l = 1[σ^FP > 0.7]
    repeated over the 4 delta channels of each anchor. Hazard (spec §3.5): with no anchor above `pos_thresh`
    ℓ_reg = 0 and the reference's 0/0 is NaN; here that term (or a zero ℓ_cls) is dropped and the second value
    is False (the caller warns). The terms are float32 as in the reference; a site whose ±ε shift the detector
    cannot see (a stage's last block: its output only feeds LayerNorms, which remove a constant shift) gets
    rounding-level losses and gradients there too."""
    l_cls = sum(_bkl(c, f) for c, f in zip(cls, cls_fp))
    l_reg = 0.0
    for r, f, c in zip(reg, reg_fp, cls_fp):
        m = (c > pos_thresh).repeat_interleave(4, dim=1).to(r.dtype)
        l_reg = l_reg + F.smooth_l1_loss(m * r, m * f, beta=1.0)
    terms, ok = [], True
    for term in (l_cls, l_reg):
        v = float(term.detach()) if torch.is_tensor(term) else 0.0
        if v != 0 and math.isfinite(v):  # as the reference, also for a float32-rounding-level (even negative) value
            terms.append(term / v)
        else:
            ok = False
    if not terms:
        return torch.zeros((), device=cls[0].device, requires_grad=True), False
    return sum(terms[1:], terms[0]), ok


@contextlib.contextmanager
def perturbed_output(module: nn.Module, shift: Callable[[], float]) -> Iterator[list[torch.Tensor]]:
    """While active, `module`'s output is replaced by a leaf copy + shift() (gradients are taken w.r.t. it;
    the graph upstream of the module is cut, which the perturbation gradients never need). Yields the list
    that receives each call's leaf."""
    leaves: list[torch.Tensor] = []

    def hook(_m, _args, out):
        leaf = (out.detach() + shift()).requires_grad_(True)
        leaves.append(leaf)
        return leaf

    h = module.register_forward_hook(hook)
    try:
        yield leaves
    finally:
        h.remove()


def warn_no_positive(where: str, n: int) -> None:
    """The NaN hazard of the reference (spec §3.5/§3.8 item 7), guarded: say how often it was hit."""
    warnings.warn(f"{where}: {n} image(s) have no RPN anchor with FP objectness > the positive threshold; their "
                  "RPN regression term is dropped from the perturbation loss (the reference computes 0/0 = NaN)")
