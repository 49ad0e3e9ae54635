"""Calibration: I/O capture, range / percentile / grid searches, LayerNorm reparameterization.

Owns the statistics that fit quantizer parameters before any training. May import `common.quant`,
`common.models` (the unit partition) and the leaf helpers; never `recon`, `run` or a method.
"""
from common.calib.capture import (batched, capture_io, clip_candidates, gram_of, iter_unit_inputs, reduce_minmax,
                                  reduce_quantile, search_by_error, search_weight_by_gram)

__all__ = ["batched", "capture_io", "clip_candidates", "gram_of", "iter_unit_inputs", "reduce_minmax",
           "reduce_quantile", "search_by_error", "search_weight_by_gram"]
