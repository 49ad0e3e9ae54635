"""MATLAB-compatible bicubic `imresize` (what SR test sets' LR images are made with), float64 numpy.

MATLAB `imresize(img, 1/s, 'bicubic')`: Keys cubic kernel (a = -0.5); when shrinking, the kernel is
stretched by s (antialiasing: width 4·s taps, weights scaled by 1/s); output pixel x (1-based) samples
input coordinate u = x·s + 0.5·(1 − s); out-of-range taps are mirrored (symmetric padding); weights
are normalised to sum 1. Height is resized first, then width (equal scales). A uint8 image stays
uint8 after EACH axis pass (MATLAB's resize MEX returns the input class, so the height pass is rounded
half away from zero and clipped before the width pass); a float image is resized in float64 throughout.
`tests/test_sr_metrics.py` checks both against the MATLAB-made Set5 LR images in `assets/set5/LR_bicubic`:
X2, X3 and X4 (made from the uint8 HR) are reproduced bit-exactly by the uint8 path, X8 (made from the
HR as double, then converted to uint8) bit-exactly by the float path followed by one rounding.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["imresize", "bicubic_down", "bicubic_up", "cubic"]


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def _weights(in_len: int, out_len: int, scale: float) -> np.ndarray:
    """Dense (out_len, in_len) resampling matrix of one axis."""
    antialias = scale < 1
    width = 4.0 / scale if antialias else 4.0
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]       # 1-based input positions
    dist = u[:, None] - idx
    w = scale * cubic(scale * dist) if antialias else cubic(dist)
    w = w / w.sum(1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len)[::-1]])  # symmetric boundary
    cols = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    mat = np.zeros((out_len, in_len), dtype=np.float64)
    np.add.at(mat, (np.repeat(np.arange(out_len), taps), cols.ravel()), w.ravel())
    return mat


def imresize(img: np.ndarray, scale: float, out_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Bicubic resize of an (H, W) or (H, W, C) image by `scale` (MATLAB semantics).

    uint8 input -> uint8 output (rounded and clipped after each axis, as MATLAB); float input -> float64
    output (not clipped).
    """
    arr = np.asarray(img)
    is_uint8 = arr.dtype == np.uint8
    x = arr.astype(np.float64)
    h, w = x.shape[:2]
    oh, ow = out_shape if out_shape is not None else (int(math.ceil(h * scale)), int(math.ceil(w * scale)))
    wh, ww = _weights(h, oh, scale), _weights(w, ow, scale)
    out = np.einsum("oh,hwc->owc", wh, x.reshape(h, w, -1))
    if is_uint8:
        out = _to_uint8(out)
    out = np.einsum("pw,owc->opc", ww, out).reshape((oh, ow) + x.shape[2:])
    return _to_uint8(out).astype(np.uint8) if is_uint8 else out


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """MATLAB's double -> uint8: round half away from zero (values are >= 0 after clipping), clip to 0..255."""
    return np.clip(np.floor(x + 0.5), 0, 255)


def bicubic_down(hr: np.ndarray, scale: int) -> np.ndarray:
    """LR image of a mod-cropped HR image: imresize(hr, 1/scale, 'bicubic')."""
    h, w = hr.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f"HR size {h}x{w} is not a multiple of the scale {scale}: modcrop it first")
    return imresize(hr, 1.0 / scale, (h // scale, w // scale))


def bicubic_up(lr: np.ndarray, scale: int) -> np.ndarray:
    """The bicubic baseline: imresize(lr, scale, 'bicubic')."""
    h, w = lr.shape[:2]
    return imresize(lr, float(scale), (h * scale, w * scale))
