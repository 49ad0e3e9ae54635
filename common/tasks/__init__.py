"""Tasks other than ImageNet classification: their data, model adapters and metrics.

One subpackage per task (`sr/`: super-resolution with SwinIR). May import `common.quant`, `calib`,
`recon`, `models`, `data` and the leaf helpers; `common.run` reaches a task through its runner.
"""
