"""ERQ and its RepQ-ViT baseline for timm ViT / DeiT / Swin (`method=erq`, `method=repq`).

Importing the package registers both methods. Modules:
  repq          RepQ-ViT: percentile-MSE quantizer init, lazy calibration, LayerNorm reparameterization
  method        ERQ: RepQ init, then per-layer Aqer, weight re-calibration and Wqer
  aqer / wqer   the two error-reduction steps (closed-form ridge; refinement + ridge compensation)
  dual_uniform  the two-grid weight quantizer for qkv / fc1
  stats         streaming Gram statistics of a layer's input (no activation dump)
  linalg        one Cholesky per layer serving every ridge solve
  tune          held-out selection of per-(model, bits) settings for conf/tuned/ (python -m erq.tune)
See docs/erq.md and /conf/method/{erq,repq}.yaml.
"""
from .method import ERQ
from .repq import RepQViT

__all__ = ["ERQ", "RepQViT"]
