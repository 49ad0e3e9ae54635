"""ERQ vs its RepQ-ViT baseline on the embedded demo model (`model=demo`), through the real pipeline.

The demo ViT is robust at W4A4, so the comparison is judged first by KL(p_fp ‖ p_q) on the test split
and checked at W3A4 too: ERQ's KL must be lower than RepQ-ViT's and its top-1 not lower.
"""
from __future__ import annotations

import json

import pytest

from common.run.pipeline import run
from conftest import DEMO_WEIGHTS


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
    assert erq["kl_to_fp"] < repq["kl_to_fp"], (erq["kl_to_fp"], repq["kl_to_fp"])
    assert erq["quant_top1"] >= repq["quant_top1"], (erq["quant_top1"], repq["quant_top1"])
