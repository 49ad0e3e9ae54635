"""AdaLog (ECCV 2024) on the common fake-quant core: `method=adalog` and `method=adalog_retrain`.

Importing the package registers both methods. The quantizer itself (adaptive-base log quantizer, its
table / exact / integer forms, the post-GELU shift and bias fold) is shared: `common.quant.adalog`.
Modules here hold the method's maths only:
  fpcs       the Fast Progressive Combining Search (beam search over scale candidates)
  grids      the reference's initial candidate grids and the post-GELU scale bounds
  calibrate  the per-layer FPCS procedures and the model walk
  method     stages, caching, the bias fold, the "Retrain" reconstruction through common.recon.block
See docs/adalog.md and conf/method/{adalog,adalog_retrain}.yaml.
"""
from .method import AdaLog, AdaLogRetrain

__all__ = ["AdaLog", "AdaLogRetrain"]
