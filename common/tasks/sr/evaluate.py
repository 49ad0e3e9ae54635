"""Evaluation of an SR model on a test set, as the SwinIR test script does it.

Each LR image (batch 1) is padded at the bottom/right by mirroring (`torch.flip` concatenation, i.e.
symmetric padding) to the next multiple of the window strictly above its size (the official
`main_test_swinir.py` pads a full window when the size is already a multiple), upscaled, cropped back to
scale × the LR size, clamped to [0, 1] and rounded to 8 bits, then scored by `metrics.sr_scores`.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import SRImage, to_tensor
from .imresize import bicubic_up
from .metrics import sr_scores, to_uint8_image

__all__ = ["pad_like_swinir", "upscale", "evaluate_sr", "evaluate_bicubic", "summarize"]


def pad_like_swinir(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mirror-pad (N, C, H, W) at the bottom/right to (⌊H/w⌋+1)·w × (⌊W/w⌋+1)·w, like main_test_swinir.py."""
    h, w = x.shape[2:]
    ph, pw = (h // window + 1) * window - h, (w // window + 1) * window - w
    x = torch.cat([x, torch.flip(x, [2])], 2)[:, :, : h + ph, :]
    return torch.cat([x, torch.flip(x, [3])], 3)[:, :, :, : w + pw]


@torch.no_grad()
def upscale(model: nn.Module, lr: np.ndarray, scale: int, window: int, device: torch.device | str = "cpu") -> np.ndarray:
    """SR output of one uint8 LR image as 8-bit values (float64 (H·s, W·s, 3))."""
    x = to_tensor(lr)[None].to(device)
    h, w = x.shape[2:]
    y = model(pad_like_swinir(x, window))[..., : h * scale, : w * scale]
    return to_uint8_image(y.float().cpu())


def evaluate_sr(model: nn.Module, images: Iterable[SRImage], scale: int, window: int,
                device: torch.device | str = "cpu", desc: str = "SR eval") -> list[dict]:
    """Per-image {name, psnr_y, ssim_y, psnr_rgb} of the model, model in eval mode."""
    model.eval()
    out = []
    for im in tqdm(list(images), desc=desc, leave=False, mininterval=2.0):
        out.append({"name": im.name, **sr_scores(upscale(model, im.lr, scale, window, device), im.hr, scale)})
    return out


def evaluate_bicubic(images: Iterable[SRImage], scale: int) -> list[dict]:
    """Per-image scores of MATLAB-bicubic upscaling (the SR tables' 'Bicubic' row)."""
    return [{"name": im.name, **sr_scores(bicubic_up(im.lr, scale).astype(np.float64), im.hr, scale)}
            for im in images]


def summarize(per_image: list[dict]) -> dict[str, float]:
    """Means over images (the SR literature averages PSNR in dB over images)."""
    keys = ("psnr_y", "ssim_y", "psnr_rgb")
    return {k: float(np.mean([r[k] for r in per_image])) for k in keys}
