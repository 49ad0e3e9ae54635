"""The embedded demo model: a tiny timm ViT trained on scikit-learn's 8x8 digits (:mod:`common.data.digits`).

Importing this module registers the timm model ``vit_digits`` (a real
:class:`timm.models.vision_transformer.VisionTransformer`: cls token, learned pos
embed, multi-head attention, GELU MLPs, LayerNorm) so that
``timm.create_model('vit_digits')`` works. Nothing heavy happens at import.

The trained weights live in :data:`DEFAULT_WEIGHTS`; they are produced by
``python -m common.models.train_demo`` (see that module).
"""

from __future__ import annotations

import pathlib
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, is_model, register_model
from timm.models.vision_transformer import VisionTransformer

from common.data.digits import DIGITS_MEAN, DIGITS_NUM_CLASSES, DIGITS_STD

__all__ = ["DEFAULT_WEIGHTS", "VIT_DIGITS_ARGS", "vit_digits"]

#: Trained weights (safetensors state dict of ``vit_digits`` with default arguments).
DEFAULT_WEIGHTS: pathlib.Path = pathlib.Path(__file__).parent / "assets" / "vit_digits.safetensors"

#: Architecture of ``vit_digits``; any of these can be overridden by kwargs.
VIT_DIGITS_ARGS: dict[str, Any] = dict(
    img_size=8,
    patch_size=2,
    in_chans=1,
    num_classes=DIGITS_NUM_CLASSES,
    embed_dim=64,
    depth=4,
    num_heads=4,
    mlp_ratio=2.0,
    class_token=True,
    global_pool="token",
)

# Pretrained/data config, read by ``timm.data.resolve_model_data_config(model)``.
_VIT_DIGITS_CFG: dict[str, Any] = dict(
    url="",
    num_classes=DIGITS_NUM_CLASSES,
    input_size=(1, 8, 8),
    pool_size=None,
    crop_pct=1.0,
    crop_mode="center",
    interpolation="bilinear",
    fixed_input_size=True,
    mean=(DIGITS_MEAN,),
    std=(DIGITS_STD,),
    first_conv="patch_embed.proj",
    classifier="head",
    license="bsd-3-clause",  # the data: scikit-learn's copy of the UCI optical digits
)

# Module-level ``default_cfgs`` is what ``timm.models.register_model`` reads to register
# the pretrained cfg (so ``timm.models.get_pretrained_cfg('vit_digits')`` works too).
default_cfgs = generate_default_cfgs({"vit_digits": _VIT_DIGITS_CFG})


def _register_once(fn):
    """``timm.models.register_model``, skipped when the name is already registered.

    Plain re-imports are cached by Python, but a second copy of this module (e.g.
    ``importlib.reload`` or importing it under another package path) would otherwise
    make timm warn about overwriting ``vit_digits``. The first registration wins; it is
    functionally identical.
    """
    if is_model(fn.__name__):
        return fn
    return register_model(fn)


@_register_once
def vit_digits(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Tiny ViT for 8x8x1 digits: 16 patches of 2x2 + cls token, dim 64, depth 4, 4 heads.

    Args:
        pretrained: load :data:`DEFAULT_WEIGHTS` (strictly) after building the model.
        **kwargs: override :data:`VIT_DIGITS_ARGS` or pass other ``VisionTransformer``
            arguments; timm's factory arguments (``pretrained_cfg``,
            ``pretrained_cfg_overlay``, ``cache_dir``) are accepted too.

    Returns:
        a ``timm.models.vision_transformer.VisionTransformer`` whose ``pretrained_cfg``
        gives input_size (1, 8, 8), mean (0.5,), std (0.5,), crop_pct 1.0, bilinear.
    """
    pretrained_cfg = kwargs.pop("pretrained_cfg", None) or dict(_VIT_DIGITS_CFG)
    pretrained_cfg_overlay = kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)  # no hub weights: nothing to cache
    model_args = {**VIT_DIGITS_ARGS, **kwargs}
    model = build_model_with_cfg(
        VisionTransformer,
        "vit_digits",
        pretrained=False,  # weights are local; loaded below
        pretrained_cfg=pretrained_cfg,
        pretrained_cfg_overlay=pretrained_cfg_overlay,
        **model_args,
    )
    if pretrained:
        if not DEFAULT_WEIGHTS.is_file():
            raise FileNotFoundError(
                f"vit_digits weights not found at {DEFAULT_WEIGHTS}; "
                "create them with `python -m common.models.train_demo`"
            )
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(DEFAULT_WEIGHTS)), strict=True)
    return model
