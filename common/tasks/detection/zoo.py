"""The detector named by a `conf/model/*.yaml` with `task: detection`, with its weights.

Weights: `model.checkpoint=` an STOD / mmdet 2.11 `.pth` (converted with the strict key map of `convert.py`), a
file already in this project's layout (`.safetensors` / `.pth`, e.g. the demo), or, without one, the
`checkpoint_url` through torch.hub's cache when reachable; offline without a file: a one-line error.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from common.errors import UserError

from .convert import load_mmdet_checkpoint
from .model import SwinMaskRCNN, build_detector

__all__ = ["build_detection_model", "detector_kwargs"]


def detector_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """`build_detector` keyword arguments from a model config node."""
    keys = ("arch", "num_classes", "timm_name", "swin", "fpn_channels", "representation", "mask_dim",
            "anchor_sizes", "quantize_heads", "score_thresh", "nms_thresh", "detections_per_img",
            "rpn_pre_nms_top_n", "rpn_post_nms_top_n", "rpn_nms_thresh")
    out = {k: cfg[k] for k in keys if cfg.get(k) is not None}
    if isinstance(out.get("swin"), Mapping):
        out["swin"] = {k: (tuple(v) if isinstance(v, (list, tuple)) or hasattr(v, "__len__") and not isinstance(v, str)
                           else v) for k, v in dict(out["swin"]).items()}
    if "anchor_sizes" in out:
        out["anchor_sizes"] = tuple(int(s) for s in out["anchor_sizes"])
    return out


def _resolve_checkpoint(cfg: Mapping[str, Any]) -> Path | None:
    ckpt = cfg.get("checkpoint")
    if ckpt:
        return Path(str(ckpt)).expanduser()
    url = cfg.get("checkpoint_url")
    if not cfg.get("pretrained", True):
        return None
    if not url:
        raise UserError(f"model {cfg.get('name')!r} needs weights: set model.checkpoint=FILE")
    try:
        from torch.hub import download_url_to_file, get_dir

        dst = Path(get_dir()) / "checkpoints" / str(url).rsplit("/", 1)[-1]
        if not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            download_url_to_file(str(url), str(dst), progress=False)
        return dst
    except Exception as exc:  # offline
        raise UserError(f"model {cfg.get('name')!r}: no model.checkpoint and {url} cannot be downloaded "
                        f"({type(exc).__name__}); download it and pass model.checkpoint=FILE") from None


def build_detection_model(cfg: Mapping[str, Any]) -> SwinMaskRCNN:
    """Build the detector of a model config and load its weights (strictly)."""
    model = build_detector(**detector_kwargs(cfg))
    path = _resolve_checkpoint(cfg)
    if path is None:
        return model.eval()
    if not path.is_file():
        raise UserError(f"model.checkpoint={path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}  # demo: fp16
        missing = set(model.state_dict()) ^ set(sd)
        if missing:
            raise UserError(f"{path.name} does not match model {cfg.get('name')!r}: keys {sorted(missing)[:6]}")
        model.load_state_dict(sd, strict=True)
    else:
        load_mmdet_checkpoint(path, model)
    return model.eval()


def checkpoint_info(path: str | Path) -> dict:
    """The training metadata stored in a demo `.safetensors` (empty for other files)."""
    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(p), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("info", "{}"))
