"""Shared machinery of the ViT PTQ framework, one subpackage per part (map: docs/architecture.md).

quant (fake-quant core) · calib (calibration) · recon (reconstruction engine) · models · data ·
run (experiment runner) · report; `errors` and `settings` are leaf helpers every part may use.
Method packages (`aphq`, `erq`, ...) build on these parts; nothing here imports a method.
"""
