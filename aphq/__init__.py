"""APHQ-ViT (CVPR 2025) and its BRECQ / QDrop baselines on the common fake-quant core.

Importing the package registers the `aphq` method (`common.run.registry.register_method`); the
baselines are configs of the same class (conf/method/{brecq,brecq_qinp,qdrop,aphq_*}.yaml).
Modules: `search` (candidate grids, quantiles, exact fast argmins), `calibrate` (calibration
search + LayerNorm reparameterization), `aph` (Average Perturbation Hessian), `mlp_recon` (MLP
reconstruction), `method` (stages and caching); the detection pipeline (`task=detection`): `detection`
(driver and stages), `det_mlp`, `det_calib`, `det_recon`, `det_aph` (docs/detection.md, "APHQ-ViT").
"""
from . import method  # noqa: F401  (registers "aphq")
from .method import APHQ

__all__ = ["APHQ"]
