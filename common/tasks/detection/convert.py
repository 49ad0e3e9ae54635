"""mmdet (Swin-Transformer-Object-Detection, mmdet 2.11) checkpoint ↔ this project's detector: a strict key map.

`mmdet_to_ours(key)` / `ours_to_mmdet(key)` map one key (None: a key both sides drop, e.g. the buffer
`relative_position_index` that timm rebuilds); `convert_mmdet_state_dict(sd, model)` maps a whole
checkpoint and raises `UserError` naming every unmapped, missing or mis-shaped key. Tensors are copied
unchanged: the predictors keep mmdet's layouts (81 logits with background last, 320 class-specific
deltas, 80 mask channels) and reorder only their outputs (`model.MMDetBoxPredictor`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Mapping

import torch

from common.errors import UserError

__all__ = ["mmdet_to_ours", "ours_to_mmdet", "convert_mmdet_state_dict", "load_mmdet_checkpoint", "to_mmdet_state_dict"]

_DROP = re.compile(r"(^|\.)(relative_position_index|attn_mask)$")

# (mmdet pattern, ours template, ours pattern, mmdet template). Stage/downsample renumbering is a function.
_S = r"(\d+)"


def _rules() -> list[tuple[str, Callable[[re.Match], str], str, Callable[[re.Match], str]]]:
    r = []

    def add(mm: str, ours: str):
        """Same group order on both sides; templates use {0}, {1}, …"""
        def rx(t: str) -> str:  # {S}: an index, {R}: a dotted suffix, {P}: one parameter / buffer name
            return "^" + t.replace(".", r"\.").replace("{S}", _S).replace("{R}", r"(.+)").replace(
                "{P}", r"([A-Za-z_]+)") + "$"
        mm_re, ours_re = rx(mm), rx(ours)

        def fill(tmpl):
            parts = re.split(r"\{[SRP]\}", tmpl)
            return lambda m: "".join(p + (m.group(i + 1) if i < len(parts) - 1 else "") for i, p in enumerate(parts))
        r.append((mm_re, fill(ours), ours_re, fill(mm)))

    add("backbone.patch_embed.{R}", "backbone.body.swin.patch_embed.{R}")
    add("backbone.layers.{S}.blocks.{S}.{R}", "backbone.body.swin.layers.{S}.blocks.{S}.{R}")
    add("backbone.norm{S}.{P}", "backbone.body.out_norms.{S}.{P}")
    add("neck.lateral_convs.{S}.conv.{P}", "backbone.fpn.inner_blocks.{S}.0.{P}")
    add("neck.fpn_convs.{S}.conv.{P}", "backbone.fpn.layer_blocks.{S}.0.{P}")
    add("rpn_head.rpn_conv.{P}", "rpn.head.conv.0.0.{P}")
    add("rpn_head.rpn_cls.{P}", "rpn.head.cls_logits.{P}")
    add("rpn_head.rpn_reg.{P}", "rpn.head.bbox_pred.{P}")
    # Mask R-CNN (StandardRoIHead, Shared2FCBBoxHead, FCNMaskHead)
    add("roi_head.bbox_head.shared_fcs.0.{P}", "roi_heads.box_head.fc6.{P}")
    add("roi_head.bbox_head.shared_fcs.1.{P}", "roi_heads.box_head.fc7.{P}")
    add("roi_head.bbox_head.fc_cls.{P}", "roi_heads.box_predictor.fc_cls.{P}")
    add("roi_head.bbox_head.fc_reg.{P}", "roi_heads.box_predictor.fc_reg.{P}")
    add("roi_head.mask_head.convs.{S}.conv.{P}", "roi_heads.mask_head.{S}.0.{P}")
    add("roi_head.mask_head.upsample.{P}", "roi_heads.mask_predictor.upsample.{P}")
    add("roi_head.mask_head.conv_logits.{P}", "roi_heads.mask_predictor.conv_logits.{P}")
    # Cascade (3 × Shared4Conv1FCBBoxHead with BN, 3 × FCNMaskHead)
    add("roi_head.bbox_head.{S}.shared_convs.{S}.conv.{P}", "roi_heads.box_head.{S}.{S}.0.{P}")
    add("roi_head.bbox_head.{S}.shared_convs.{S}.bn.{P}", "roi_heads.box_head.{S}.{S}.1.{P}")
    add("roi_head.bbox_head.{S}.shared_fcs.0.{P}", "roi_heads.box_head.{S}.5.{P}")
    add("roi_head.bbox_head.{S}.fc_cls.{P}", "roi_heads.box_predictor.{S}.fc_cls.{P}")
    add("roi_head.bbox_head.{S}.fc_reg.{P}", "roi_heads.box_predictor.{S}.fc_reg.{P}")
    add("roi_head.mask_head.{S}.convs.{S}.conv.{P}", "roi_heads.mask_head.{S}.{S}.0.{P}")
    add("roi_head.mask_head.{S}.upsample.{P}", "roi_heads.mask_predictor.{S}.upsample.{P}")
    add("roi_head.mask_head.{S}.conv_logits.{P}", "roi_heads.mask_predictor.{S}.conv_logits.{P}")
    return r


_RULES = _rules()
# mmdet downsamples at the end of stage i, timm at the start of stage i+1
_DOWN_MM = re.compile(r"^backbone\.layers\.(\d+)\.downsample\.(.+)$")
_DOWN_OURS = re.compile(r"^backbone\.body\.swin\.layers\.(\d+)\.downsample\.(.+)$")


def mmdet_to_ours(key: str) -> str | None:
    """Our key for an mmdet key; None for dropped buffers; KeyError for an unmapped key."""
    if _DROP.search(key):
        return None
    m = _DOWN_MM.match(key)
    if m:
        return f"backbone.body.swin.layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    for mm_re, to_ours, _, _ in _RULES:
        m = re.match(mm_re, key)
        if m:
            return to_ours(m)
    raise KeyError(key)


def ours_to_mmdet(key: str) -> str | None:
    """The mmdet key for one of our keys (inverse of `mmdet_to_ours`); KeyError for an unmapped key."""
    if _DROP.search(key):
        return None
    m = _DOWN_OURS.match(key)
    if m:
        if int(m.group(1)) == 0:
            raise KeyError(key)
        return f"backbone.layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
    for _, _, ours_re, to_mm in _RULES:
        m = re.match(ours_re, key)
        if m:
            return to_mm(m)
    raise KeyError(key)


def convert_mmdet_state_dict(sd: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Map an mmdet state dict onto `model`'s keys; every key must map, every model key must be covered,
    shapes must agree. Raises UserError listing the offending keys."""
    target = model.state_dict()
    out, unmapped, unknown, shape = {}, [], [], []
    for k, v in sd.items():
        try:
            ours = mmdet_to_ours(k)
        except KeyError:
            unmapped.append(k)
            continue
        if ours is None:
            continue
        if ours not in target:
            unknown.append(f"{k} -> {ours}")
        elif tuple(target[ours].shape) != tuple(v.shape):
            shape.append(f"{k} {tuple(v.shape)} vs {ours} {tuple(target[ours].shape)}")
        else:
            out[ours] = v
    missing = [k for k in target if k not in out]
    problems = []
    if unmapped:
        problems.append(f"unmapped mmdet keys: {unmapped[:8]}{' …' if len(unmapped) > 8 else ''}")
    if unknown:
        problems.append(f"keys the model does not have (wrong model.arch / size?): {unknown[:8]}")
    if shape:
        problems.append(f"shape mismatches (wrong model size or num_classes?): {shape[:8]}")
    if missing:
        problems.append(f"model keys missing from the checkpoint: {missing[:8]}{' …' if len(missing) > 8 else ''}")
    if problems:
        raise UserError("mmdet checkpoint does not match the detector: " + "; ".join(problems))
    return out


def to_mmdet_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict in mmdet names (the inverse direction; used by tests and the parity script)."""
    return {mk: v for k, v in model.state_dict().items() if (mk := ours_to_mmdet(k)) is not None}


def load_mmdet_checkpoint(path: str | Path, model: torch.nn.Module) -> torch.nn.Module:
    """Load an STOD/mmdet `.pth` (a dict with `state_dict`, or a bare state dict) into `model`, strictly."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"detector checkpoint {p} not found (model.checkpoint=FILE: the STOD release .pth)")
    ckpt = torch.load(p, map_location="cpu", weights_only=False)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if any(k.startswith("backbone.body.") for k in sd):  # already in our layout (the demo checkpoint)
        model.load_state_dict(sd, strict=True)
    else:
        model.load_state_dict(convert_mmdet_state_dict(sd, model), strict=True)
    return model
