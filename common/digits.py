"""The embedded demo model and dataset: a tiny timm ViT on scikit-learn's 8x8 digits.

Importing this module registers the timm model ``vit_digits`` (a real
:class:`timm.models.vision_transformer.VisionTransformer`: cls token, learned pos
embed, multi-head attention, GELU MLPs, LayerNorm) so that
``timm.create_model('vit_digits')`` works. Nothing heavy happens at import: the
dataset is only read when one of the loader functions is called.

The dataset is scikit-learn's ``load_digits`` (1797 real 8x8 grey-scale images with
values 0..16, shipped inside scikit-learn, no download). It is split once and for
all into ``train`` (1200), ``calib_pool`` (197, only for PTQ calibration, never for
training) and ``test`` (400) by a fixed permutation.

The trained weights live in :data:`DEFAULT_WEIGHTS`; they are produced by
``python -m common.train_digits`` (see that module).
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import numpy as np
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, is_model, register_model
from timm.models.vision_transformer import VisionTransformer

__all__ = [
    "DIGITS_MEAN",
    "DIGITS_STD",
    "DIGITS_NUM_CLASSES",
    "SPLIT_SIZES",
    "SPLIT_RNG_SEED",
    "DEFAULT_WEIGHTS",
    "VIT_DIGITS_ARGS",
    "vit_digits",
    "load_digits_tensors",
    "digits_split",
    "digits_split_indices",
]

#: Normalisation applied to the [0, 1]-scaled images: ``(x - 0.5) / 0.5`` -> [-1, 1].
DIGITS_MEAN: float = 0.5
DIGITS_STD: float = 0.5
DIGITS_NUM_CLASSES: int = 10

#: Split sizes, in the order they are cut from the fixed permutation (sum = 1797).
SPLIT_SIZES: dict[str, int] = {"train": 1200, "calib_pool": 197, "test": 400}
#: Seed of the one permutation that defines the split; independent of any run seed.
SPLIT_RNG_SEED: int = 12345

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
                "create them with `python -m common.train_digits`"
            )
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(DEFAULT_WEIGHTS)), strict=True)
    return model


@functools.lru_cache(maxsize=1)
def _digits_numpy() -> tuple[np.ndarray, np.ndarray]:
    """Raw scikit-learn digits, cached: images (1797, 8, 8) float64 in 0..16, labels (1797,)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.asarray(data.images, dtype=np.float64)
    labels = np.asarray(data.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as fresh tensors.

    Returns:
        images: float32, shape (1797, 1, 8, 8), ``(x / 16 - DIGITS_MEAN) / DIGITS_STD``
            (so background is -1 and full ink is +1);
        labels: int64, shape (1797,), values 0..9.
    """
    images, labels = _digits_numpy()
    x = torch.from_numpy((images / 16.0).astype(np.float32)).unsqueeze(1)
    x = (x - DIGITS_MEAN) / DIGITS_STD
    y = torch.from_numpy(labels.copy())
    return x.contiguous(), y


def digits_split_indices() -> dict[str, np.ndarray]:
    """Indices into :func:`load_digits_tensors` of the fixed split.

    The permutation is always ``numpy.random.default_rng(12345).permutation(1797)``;
    ``train`` is its first 1200 entries, ``calib_pool`` the next 197 and ``test`` the
    last 400. Within each split the indices keep the permutation order (so the first
    N of ``calib_pool`` are a random subset). Disjoint, and together cover 0..1796.
    """
    _, labels = _digits_numpy()
    n = len(labels)
    assert n == sum(SPLIT_SIZES.values()), f"expected {sum(SPLIT_SIZES.values())} digits, got {n}"
    perm = np.random.default_rng(SPLIT_RNG_SEED).permutation(n).astype(np.int64)
    out: dict[str, np.ndarray] = {}
    start = 0
    for name, size in SPLIT_SIZES.items():
        out[name] = perm[start : start + size].copy()
        start += size
    return out


def digits_split(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The fixed split as ``{name: (images, labels)}`` for ``train``, ``calib_pool``, ``test``.

    Args:
        seed: accepted for interface symmetry with other datasets and IGNORED: the split
            is the same for every run seed (see :func:`digits_split_indices`), so results
            of different seeds are measured on the same test images. Run seeds only
            affect which calibration images are drawn from ``calib_pool`` downstream.
    """
    del seed
    x, y = load_digits_tensors()
    return {
        name: (x[torch.from_numpy(idx)], y[torch.from_numpy(idx)])
        for name, idx in digits_split_indices().items()
    }
