"""Data: datasets, transforms, calibration draws and evaluation subsets.

May import only the leaf helpers (`common.errors`, `common.settings`); every other part may import it.
"""
from common.data.datasets import DATASETS, IMAGENET_SAMPLE_ROOT, PTQData, build_data, eval_subset_indices, imagenet_wnids

__all__ = ["DATASETS", "IMAGENET_SAMPLE_ROOT", "PTQData", "build_data", "eval_subset_indices", "imagenet_wnids"]
