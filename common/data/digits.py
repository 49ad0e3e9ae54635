"""The demo dataset: scikit-learn's 8x8 digits (1797 real images, shipped with scikit-learn, no download).

It is split once and for all into ``train`` (1200), ``calib_pool`` (197, only for PTQ calibration, never
for training) and ``test`` (400) by a fixed permutation. The demo model that is trained on it lives in
:mod:`common.models.demo`.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "DIGITS_NUM_CLASSES", "SPLIT_SIZES", "SPLIT_RNG_SEED",
           "load_digits_tensors", "digits_split", "digits_split_indices"]

#: Normalisation applied to the [0, 1]-scaled images: ``(x - 0.5) / 0.5`` -> [-1, 1].
DIGITS_MEAN: float = 0.5
DIGITS_STD: float = 0.5
DIGITS_NUM_CLASSES: int = 10

#: Split sizes, in the order they are cut from the fixed permutation (sum = 1797).
SPLIT_SIZES: dict[str, int] = {"train": 1200, "calib_pool": 197, "test": 400}
#: Seed of the one permutation that defines the split; independent of any run seed.
SPLIT_RNG_SEED: int = 12345


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
