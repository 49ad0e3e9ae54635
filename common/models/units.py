"""Split a timm ViT/DeiT/Swin into sequential "units" (the reconstruction granularity of BRECQ/APHQ).

Units, in forward order:
  ViT/DeiT: patch_embed, blocks.0 … blocks.{L-1}, head (the Linear)
  Swin:     patch_embed, layers.s.downsample (PatchMerging, s ≥ 1), layers.s.blocks.j …, head (ClassifierHead)
Each unit carries `pre`, the FP glue that turns the previous unit's output into this unit's input
(ViT: cls token + pos-embed + norm_pre before blocks.0; final norm + pooling before head), so
`run_units(units, images)` equals `model(images)` and a unit's input can be computed incrementally
from the previous unit's output (one unit forward instead of a whole-model sweep).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

__all__ = ["Unit", "model_units", "run_units", "model_family"]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class Unit:
    """One reconstruction unit: `module(pre(previous_output))` is its output."""

    name: str
    module: nn.Module
    pre: Callable[[torch.Tensor], torch.Tensor] = field(default=_identity, repr=False)
    kind: str = "block"  # patch_embed | block | merge | head

    def __call__(self, prev: torch.Tensor) -> torch.Tensor:
        return self.module(self.pre(prev))


def model_family(model: nn.Module) -> str:
    """'vit' for timm VisionTransformer (ViT, DeiT, demo), 'swin' for SwinTransformer."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, SwinTransformer):
        return "swin"
    if isinstance(model, VisionTransformer):
        return "vit"
    raise TypeError(f"unsupported model class {type(model).__name__}: expected a timm VisionTransformer or "
                    "SwinTransformer")


def model_units(model: nn.Module) -> list[Unit]:
    """The model's units in forward order (a model with a `vitq_units()` method, e.g. a task adapter such as
    `common.tasks.sr.SRModel`, defines its own)."""
    if callable(getattr(model, "vitq_units", None)):
        return model.vitq_units()
    family = model_family(model)
    units = [Unit("patch_embed", model.patch_embed, kind="patch_embed")]
    if family == "vit":
        def embed(x: torch.Tensor) -> torch.Tensor:
            return model.norm_pre(model.patch_drop(model._pos_embed(x)))

        for i, blk in enumerate(model.blocks):
            units.append(Unit(f"blocks.{i}", blk, embed if i == 0 else _identity))

        def pool(x: torch.Tensor) -> torch.Tensor:
            return model.forward_head(model.norm(x), pre_logits=True)

        units.append(Unit("head", model.head, pool, kind="head"))
    else:
        for s, stage in enumerate(model.layers):
            if not isinstance(stage.downsample, nn.Identity):
                units.append(Unit(f"layers.{s}.downsample", stage.downsample, kind="merge"))
            for j, blk in enumerate(stage.blocks):
                units.append(Unit(f"layers.{s}.blocks.{j}", blk))
        units.append(Unit("head", model.head, model.norm, kind="head"))
    return units


def run_units(units: list[Unit], x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Apply units[start:stop] in order to `x` (the input of unit `start`'s `pre`)."""
    for unit in units[start:stop]:
        x = unit(x)
    return x
