"""Super-resolution metrics as the SR literature computes them (SwinIR / KAIR `util_calculate_psnr_ssim`).

* Images are compared as 8-bit values: the network output is clamped to [0, 1], scaled by 255 and
  rounded (what the SR test scripts save and score); ground truth is the (mod-cropped) uint8 HR image.
* Y channel of BT.601 YCbCr, studio range, in float64 without rounding:
  Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255, R, G, B in [0, 255] (MATLAB `rgb2ycbcr` coefficients).
* `scale` pixels are cropped from every border before scoring.
* PSNR = 10 log10(255² / MSE) (∞ for identical images); SSIM: Wang et al. 2004 with an 11×11 Gaussian
  window, σ = 1.5, K1 = 0.01, K2 = 0.03, L = 255, averaged over the 'valid' positions (no padding).
Everything is float64 numpy; images are (H, W, 3) RGB arrays.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["rgb_to_y", "modcrop", "shave", "psnr", "ssim", "to_uint8_image", "sr_scores", "gaussian_window"]

_Y_COEFFS = np.array([65.481, 128.553, 24.966], dtype=np.float64)


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma (studio range 16..235) of an RGB image with values in [0, 255], float64 (H, W)."""
    img = np.asarray(img, dtype=np.float64)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    return 16.0 + img @ _Y_COEFFS / 255.0


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so both sides are multiples of `scale` (SR test sets' HR convention)."""
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def shave(img: np.ndarray, border: int) -> np.ndarray:
    return img[border:-border, border:-border] if border > 0 else img


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB of two same-shape arrays (float64); inf when they are identical."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian taps (the separable factor of the SSIM window)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(img: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable correlation with `taps` along both axes, 'valid' part only."""
    k = len(taps)
    h, w = img.shape
    rows = sum(taps[i] * img[i: h - k + 1 + i, :] for i in range(k))
    return sum(taps[i] * rows[:, i: w - k + 1 + i] for i in range(k))


def ssim(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Mean SSIM of two single-channel images (float64; 11×11 Gaussian σ = 1.5, valid positions)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two equal 2-D images, got {a.shape} and {b.shape}")
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    g = gaussian_window()
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a ** 2
    var_b = _filter_valid(b * b, g) - mu_b ** 2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def to_uint8_image(t: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (1, 3, H, W) float tensor in [0, 1] -> (H, W, 3) float64 array of rounded 8-bit values."""
    if t.dim() == 4:
        t = t[0]
    arr = t.detach().double().cpu().clamp(0, 1).mul(255.0).round().permute(1, 2, 0).numpy()
    return arr


def sr_scores(sr: np.ndarray, hr: np.ndarray, scale: int) -> dict[str, float]:
    """PSNR / SSIM on Y (the reported numbers) and PSNR on RGB, `scale` px border crop, both images 8-bit valued."""
    if sr.shape != hr.shape:
        raise ValueError(f"SR output {sr.shape} and HR {hr.shape} differ (HR must be mod-cropped to the scale)")
    y_sr, y_hr = shave(rgb_to_y(sr), scale), shave(rgb_to_y(hr), scale)
    return {"psnr_y": psnr(y_sr, y_hr), "ssim_y": ssim(y_sr, y_hr),
            "psnr_rgb": psnr(shave(np.asarray(sr, np.float64), scale), shave(np.asarray(hr, np.float64), scale))}
