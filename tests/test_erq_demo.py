"""ERQ vs its RepQ-ViT baseline on the embedded demo model (`model=demo`), through the real pipeline.

The demo ViT is small and robust: the spread between calibration draws is as large as the gap between the
methods on the 400-image test split (docs/erq.md), so the KL ordering is checked on seed-averaged held-out
KL (the calibration-pool images a run does not calibrate on, `erq.tune.heldout_kl`: how conf/tuned was
chosen), and test top-1 only up to its binomial standard error.
"""
from __future__ import annotations

import json
import statistics

import pytest

from common.run.pipeline import run
from conftest import DEMO_WEIGHTS, top1_tolerance

# Held-out KL(fp‖q), calibration seeds 0–5, this code (RepQ-ViT / ERQ with conf/tuned):
#   W4A4  repq 0.0260 0.0264 0.0396 0.0462 0.0679 0.0309 (mean 0.0395)
#         erq  0.0111 0.0147 0.0155 0.0273 0.0343 0.0266 (mean 0.0216)
#   W3A4  repq 0.0616 0.0415 0.0631 0.0775 0.0661 0.0882 (mean 0.0663)
#         erq  0.0347 0.0209 0.0235 0.0500 0.0688 0.0563 (mean 0.0424)
# The mean over seeds 0–2 (what the test computes) gives erq/repq = 0.45 (W4A4) and 0.48 (W3A4); the worst
# 3-seed window of the six is 0.61 / 0.76 (seeds 3–5). Asserted: erq < 0.9 × repq. On the test split a single
# seed is no evidence: erq's KL is above repq's at seeds 1 and 3 (W3A4) and 3 (W4A4) and the 6-seed means
# at W3A4 are within 2 % (0.0504 vs 0.0512), so the seed-0 test-split KL is not compared.
HELDOUT_SEEDS = range(3)
HELDOUT_KL_RATIO = 0.9


@pytest.mark.skipif(not DEMO_WEIGHTS.is_file(), reason="demo weights not built (python -m common.models.train_demo)")
@pytest.mark.parametrize("bits", ["w4a4", "w3a4"])
def test_erq_beats_repq_on_demo(run_cfg, tmp_path, bits):
    results = {}
    for method in ("repq", "erq"):
        cfg = run_cfg([f"method={method}", "model=demo", f"bits={bits}", "logger=jsonl"],
                      run_dir=tmp_path / method)
        results[method] = run(cfg)
        saved = json.loads((tmp_path / method / "results.json").read_text())
        assert saved["kl_to_fp"] == pytest.approx(results[method]["kl_to_fp"])
        assert saved["timings"]["quantize"] > 0
    erq, repq = results["erq"], results["repq"]
    assert {"erq_act_init", "erq_stats", "erq_aqer", "erq_weight_init", "erq_wqer"} <= set(erq["timings"])
    assert {"repq_calibrate", "repq_reparam", "repq_weight_init"} <= set(repq["timings"])
    # test top-1 (seed 0) not lower beyond 2 SE of the difference (conftest.top1_tolerance: 2.2 points at 97.5 %
    # on 400 images); over seeds 0–5 erq's top-1 was at most 1.0 point below repq's (W3A4 seed 1, W4A4 seed 3)
    tol = top1_tolerance(erq["quant_top1"], repq["quant_top1"], erq["n_eval"])
    assert erq["quant_top1"] >= repq["quant_top1"] - tol, (erq["quant_top1"], repq["quant_top1"], tol)

    from erq.tune import heldout_kl

    kl = {m: statistics.mean(heldout_kl(["model=demo", f"bits={bits}", f"method={m}", "logger=none"], HELDOUT_SEEDS))
          for m in ("repq", "erq")}
    assert kl["erq"] < HELDOUT_KL_RATIO * kl["repq"], kl
