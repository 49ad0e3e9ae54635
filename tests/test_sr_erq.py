"""ERQ vs RepQ-ViT on the demo SwinIR x2 at W4A4 (task=sr, Set5 centre crops of 64 px, 8 calibration patches).

Measured (2026-12-01, this config, the committed demo weights) over seeds 0, 1, 2 (each seed draws other
calibration patches): PSNR-Y ERQ / RepQ = 33.41 / 33.02 (+0.40), 33.34 / 32.88 (+0.46), 33.56 / 32.90 (+0.67) dB;
SSIM-Y ERQ 0.920-0.923 vs RepQ 0.913. FP 35.05, bicubic 34.54 on these crops. The smallest margin is 0.40 dB;
the test asserts half of it for seed 0.
"""
from __future__ import annotations

import pytest

from common.run.pipeline import run

QUICK = ["task=sr", "bits=w4a4", "dataset.eval_crop=64", "logger=none"]
MARGIN = 0.2  # dB, half the smallest margin measured over seeds 0-2


@pytest.mark.timeout(900)
def test_erq_is_not_below_repq_on_the_demo(run_cfg, tmp_path):
    repq = run(run_cfg(QUICK + ["method=repq"], run_dir=tmp_path / "repq"))
    erq = run(run_cfg(QUICK + ["method=erq"], run_dir=tmp_path / "erq"))
    assert erq["fp_psnr"] == repq["fp_psnr"]             # one FP evaluation stage, shared
    assert erq["quant_psnr"] >= repq["quant_psnr"] + MARGIN, (erq["quant_psnr"], repq["quant_psnr"])
    assert erq["quant_psnr"] <= erq["fp_psnr"] + 0.1
