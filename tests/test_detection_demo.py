"""The offline detection demo end to end (`python run.py task=detection`): the bundled demo detector, ERQ at W4A4
and W6A6 through the pipeline on the first 12 generated evaluation images. Quantized AP^box / AP^mask are reported;
W6A6 stays within MARGIN AP^box of FP (the demo's full 48-image runs over seeds 0-2 are in docs/detection.md)."""
from __future__ import annotations

import json

import pytest

from common.run.pipeline import run

MARGIN = 6.0  # AP^box points, W6A6 vs FP on 12 images (measured spread over seeds: docs/detection.md)


@pytest.mark.timeout(600)
def test_demo_runs_and_w6a6_stays_close_to_fp(run_cfg, tmp_path):
    res = {}
    for bits in ("w4a4", "w6a6"):
        cfg = run_cfg(["task=detection", f"bits={bits}", "dataset.n_eval=12", "num_threads=1"],
                      run_dir=tmp_path / bits)
        r = run(cfg)
        saved = json.loads((tmp_path / bits / "results.json").read_text())
        assert saved["task"] == "detection" and saved["model"] == "mask_rcnn_swin_demo" and saved["n_calib"] == 8
        for k in ("fp_box_ap", "fp_mask_ap", "quant_box_ap", "quant_mask_ap"):
            assert 0.0 <= saved[k] <= 100.0
        assert saved["fp_box"]["stats"] and saved["quant_mask"]["stats"]
        res[bits] = r
    assert res["w4a4"]["fp_box_ap"] == res["w6a6"]["fp_box_ap"] > 10.0  # the trained demo detects
    assert res["w6a6"]["quant_box_ap"] > 0.0 and res["w4a4"]["quant_box_ap"] > 0.0
    assert res["w6a6"]["fp_box_ap"] - res["w6a6"]["quant_box_ap"] < MARGIN


def test_demo_training_is_reproducible():
    import torch

    from common.tasks.detection.train_demo import train

    torch.set_num_threads(1)
    a, info = train(steps=2, n_images=6, batch=2, log_every=0)
    b, _ = train(steps=2, n_images=6, batch=2, log_every=0)
    assert info["steps"] == 2
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_bundled_demo_weights_load_strictly():
    from omegaconf import OmegaConf

    from common.run.config import register_resolvers
    from common.tasks.detection.zoo import build_detection_model, checkpoint_info
    from conftest import compose_cfg

    register_resolvers()
    cfg = compose_cfg(["task=detection"]).model
    m = build_detection_model(cfg)
    assert m.arch == "mask_rcnn" and m.num_fg_classes == 3
    info = checkpoint_info(OmegaConf.to_container(cfg, resolve=True)["checkpoint"])
    assert info["steps"] == 400 and info["train_seed"] == 3000
