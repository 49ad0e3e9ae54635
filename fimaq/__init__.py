"""FIMA-Q (CVPR 2025): APHQ-ViT's calibration and block reconstruction with the DPLR-FIM loss.

Importing the package registers `fimaq` and `fimaq_brecq` (`common.run.registry.register_method`).
Modules: `loss` (the DPLR / diagonal / low-rank loss terms, the snapshot schedule, per-term
normalisation), `fisher` (the Fisher snapshot from the unit's cached FP input through the FP tail),
`method` (stages and caching).
"""
from . import method  # noqa: F401  (registers "fimaq", "fimaq_brecq")
from .method import FIMAQ

__all__ = ["FIMAQ"]
