"""SR metrics and MATLAB bicubic (common.tasks.sr.metrics / imresize): independent float64 checks, closed forms,
and the MATLAB-made Set5 LR images as the oracle of the bicubic downsampling."""
from __future__ import annotations

import math

import numpy as np
import pytest

from common.tasks.sr.data import SET5_ROOT, load_rgb
from common.tasks.sr.imresize import bicubic_down, bicubic_up, imresize
from common.tasks.sr.metrics import modcrop, psnr, rgb_to_y, shave, sr_scores, ssim

NAMES = ("baby", "bird", "butterfly", "head", "woman")


def _hr(name: str, scale: int, crop: int | None = None) -> np.ndarray:
    hr = modcrop(load_rgb(SET5_ROOT / "HR" / f"{name}.png"), scale)
    return hr if crop is None else hr[:crop, :crop]


def test_y_channel_is_bt601():
    rgb = np.random.RandomState(0).randint(0, 256, (7, 5, 3)).astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    expected = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0
    np.testing.assert_allclose(rgb_to_y(rgb), expected, rtol=0, atol=1e-12)
    assert rgb_to_y(np.zeros((1, 1, 3)))[0, 0] == 16.0
    assert abs(rgb_to_y(np.full((1, 1, 3), 255.0))[0, 0] - 235.0) < 1e-12


def test_identical_images():
    img = _hr("bird", 2, 64).astype(np.float64)
    s = sr_scores(img, img, 2)
    assert s["psnr_y"] == math.inf and s["psnr_rgb"] == math.inf
    assert s["ssim_y"] == pytest.approx(1.0, abs=1e-12)


def test_psnr_closed_form_for_known_noise():
    """Mid-grey image + a ±d checkerboard on every channel: the Y error is ±219·d/255 everywhere."""
    d = 3.0
    hr = np.full((40, 48, 3), 128.0)
    sign = np.where((np.arange(40)[:, None] + np.arange(48)[None, :]) % 2 == 0, 1.0, -1.0)
    sr = hr + d * sign[..., None]
    expected = 20 * math.log10(255.0 / (219.0 * d / 255.0))
    assert sr_scores(sr, hr, 2)["psnr_y"] == pytest.approx(expected, abs=1e-9)
    assert sr_scores(sr, hr, 2)["psnr_rgb"] == pytest.approx(20 * math.log10(255.0 / d), abs=1e-9)


def test_psnr_ssim_match_independent_float64():
    """Against scikit-image's implementations (Gaussian σ=1.5, population covariance = Wang et al. / MATLAB)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    hr = _hr("butterfly", 2, 96).astype(np.float64)
    sr = np.clip(hr + np.random.RandomState(1).normal(0, 6, hr.shape), 0, 255).round()
    ys, yh = shave(rgb_to_y(sr), 2), shave(rgb_to_y(hr), 2)
    assert psnr(ys, yh) == pytest.approx(peak_signal_noise_ratio(yh, ys, data_range=255), abs=1e-10)
    ref = structural_similarity(yh, ys, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    assert ssim(ys, yh) == pytest.approx(ref, abs=1e-10)
    # and a direct float64 double loop on a tiny crop (no filtering shortcut)
    a, b = ys[:14, :15], yh[:14, :15]
    x = np.arange(11) - 5.0
    g = np.exp(-x ** 2 / 4.5)
    w = np.outer(g, g) / np.outer(g, g).sum()
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * pa * pa).sum() - ma ** 2, (w * pb * pb).sum() - mb ** 2
            cov = (w * pa * pb).sum() - ma * mb
            c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    assert ssim(a, b) == pytest.approx(float(np.mean(vals)), abs=1e-12)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_matches_matlab_lr_of_set5(scale):
    """MATLAB imresize(HR, 1/s, 'bicubic') on uint8 (rounded after each axis): the shipped X2/X3/X4 LR files are
    reproduced bit-exactly (tolerance 0 grey levels; measured on all five images)."""
    for name in NAMES:
        lr = load_rgb(SET5_ROOT / "LR_bicubic" / f"X{scale}" / f"{name}x{scale}.png")
        mine = bicubic_down(_hr(name, scale), scale)
        assert mine.dtype == np.uint8 and mine.shape == lr.shape
        assert np.abs(mine.astype(int) - lr.astype(int)).max() == 0, name


def test_bicubic_x8_float_path_matches_matlab():
    """Set5's X8 files were made from the HR as double: the float path + one rounding matches them exactly."""
    for name in NAMES[:2]:
        lr = load_rgb(SET5_ROOT / "LR_bicubic" / "X8" / f"{name}x8.png")
        out = imresize(_hr(name, 8).astype(np.float64), 1 / 8, lr.shape[:2])
        assert np.abs(np.clip(np.floor(out + 0.5), 0, 255) - lr).max() == 0


def test_bicubic_up_shapes_and_constant_images():
    hr = _hr("head", 2, 64)
    lr = bicubic_down(hr, 2)
    up = bicubic_up(lr, 2)
    assert up.shape == hr.shape and up.dtype == np.uint8
    assert sr_scores(up.astype(np.float64), hr.astype(np.float64), 2)["psnr_y"] > 30
    const = np.full((8, 8), 77.0)
    np.testing.assert_allclose(imresize(const, 0.5), 77.0, atol=1e-12)   # weights sum to one
    np.testing.assert_allclose(imresize(const, 3.0), 77.0, atol=1e-12)
