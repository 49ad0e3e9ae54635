"""SwinIR through spandrel as a quantizable model (common.tasks.sr.model) and the task=sr pipeline, on small crops."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf

from common.errors import UserError
from common.models.units import model_units, run_units
from common.quant import QuantConv2d, QuantMatMul, quant_state
from common.quant.wrap import wrap_model
from common.run.config import asset_path, register_resolvers
from common.run.registry import scheme_from_bits
from common.tasks.sr.data import build_sr_data
from common.tasks.sr.evaluate import pad_like_swinir
from common.tasks.sr.model import QuantSwinIRAttention, build_sr_model


@pytest.fixture(scope="module")
def demo():
    register_resolvers()
    torch.manual_seed(0)
    return build_sr_model({"name": "swinir_demo", "checkpoint": asset_path("swinir_demo_x2.safetensors"), "scale": 2})


def test_loader_gives_eval_mode_without_drop_path(demo):
    assert demo.scale == 2 and demo.window == 8 and not demo.training
    assert all(not m.training for m in demo.modules())
    assert all(getattr(m, "drop_prob", 0.0) == 0.0 for m in demo.modules())


def test_wrapped_swinir_with_quantization_off_is_the_fp_model(demo):
    x = torch.rand(1, 3, 37, 29, generator=torch.Generator().manual_seed(0))  # not a multiple of the window
    with torch.no_grad():
        ref = demo(pad_like_swinir(x, 8))
        q = wrap_model(copy.deepcopy(demo), scheme_from_bits(OmegaConf.create({"w_bit": 4, "a_bit": 4,
                                                                               "patch_embed_a_bit": 8})))
        with quant_state(q, weight=False, act=False):
            out = q(pad_like_swinir(x, 8))
            units = model_units(q)
            chained = run_units(units, pad_like_swinir(x, 8))
    assert (out - ref).abs().max().item() < 1e-5
    assert (chained - ref).abs().max().item() < 1e-5
    attn = [m for m in q.modules() if isinstance(m, QuantSwinIRAttention)]
    assert len(attn) == 4 and all(isinstance(a.matmul1, QuantMatMul) for a in attn)
    sites = {m.qname: m.site for m in q.modules() if isinstance(m, QuantConv2d)}
    assert sites.pop("net.conv_first") == "patch_embed" and set(sites.values()) == {"conv"}
    assert [u.name for u in units] == ["conv_first", "layers.0", "layers.1", "tail"]
    assert q.net.conv_first.input_quantizer.bits == 8 and q.net.layers[0].conv.input_quantizer.bits == 4


def test_calibration_patches_are_a_seeded_prefix():
    data = build_sr_data({"name": "set5", "n_eval": 1, "eval_crop": 32, "patch_size": 16}, 2, seed=3)
    lr4, hr4 = data.calibration(4)
    lr2, _ = data.calibration(2)
    assert lr4.shape == (4, 3, 16, 16) and hr4.shape == (4, 3, 32, 32)
    assert torch.equal(lr4[:2], lr2) and 0.0 <= float(lr4.min()) and float(lr4.max()) <= 1.0
    other = build_sr_data({"name": "set5", "n_eval": 1, "eval_crop": 32, "patch_size": 16}, 2, seed=4)
    assert not torch.equal(other.calibration(2)[0], lr2)


def test_test_set_layout_errors():
    with pytest.raises(UserError, match="only Set5 ships"):
        build_sr_data({"name": "urban100"}, 2, 0)
    with pytest.raises(UserError, match="not found under"):
        build_sr_data({"name": "set14", "root": "/nonexistent"}, 2, 0)


def test_sr_pipeline_runs_and_refuses_methods_without_sr(run_cfg, tmp_path):
    from common.run.pipeline import run

    quick = ["task=sr", "dataset.n_eval=2", "dataset.eval_crop=48", "dataset.patch_size=16", "logger=none"]
    cfg = run_cfg(quick + ["method=ptq", "method.weight_clip_ratios=[1.0,0.8]", "method.act_clip_ratios=[1.0,0.8]"])
    assert cfg.model.name == "swinir_demo" and cfg.method.n_calib == 8 and cfg.task.name == "sr"
    r = run(cfg)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["task"] == "sr" and saved["n_eval"] == 2 and len(saved["per_image"]) == 2
    for key in ("fp_psnr", "quant_psnr", "bicubic_psnr"):
        assert 20 < r[key] < 60
    assert r["fp_psnr"] > r["bicubic_psnr"]            # the demo model beats bicubic
    assert r["quant_psnr"] < r["fp_psnr"] + 0.5
    with pytest.raises(UserError, match="no super-resolution path"):
        run(run_cfg(quick + ["method=aphq"], run_dir=tmp_path / "refused"))
    with pytest.raises(UserError, match="is a sr model but task=classification"):
        run(run_cfg(["model=swinir_demo", "logger=none"], run_dir=tmp_path / "mismatch"))


def test_erq_sr_settings_come_from_method_task(run_cfg):
    cfg = run_cfg(["task=sr", "method=erq"])
    assert cfg.method.coe == 100 and cfg.method.n_calib == 8 and cfg.method.patch_embed_a_bit == 8
    assert list(cfg.method.wqer.refine.sites) == ["qkv", "fc1"] and 1.0 in list(cfg.method.act_init.grid)
    assert run_cfg(["task=sr", "method=erq", "method.coe=50"]).method.coe == 50   # the command line wins
    classification = run_cfg(["method=erq", "model=deit_s"])
    assert classification.task.name == "classification" and classification.method.coe == 10000


def test_classical_pixelshuffle_swinir_from_an_official_style_pth(tmp_path):
    """The classical-SR tail (conv_before_upsample, Upsample, conv_last) of SwinIR-M, saved like the release files
    ({'params': state_dict}), loads through spandrel and, wrapped with quantization off, equals the FP model."""
    from spandrel.architectures.SwinIR.__arch.SwinIR import SwinIR

    torch.manual_seed(0)
    net = SwinIR(img_size=16, embed_dim=24, depths=[1, 1], num_heads=[3, 3], window_size=8, mlp_ratio=2.0, upscale=2,
                 upsampler="pixelshuffle", img_range=1.0, resi_connection="1conv")
    torch.save({"params": net.state_dict()}, tmp_path / "swinir_x2.pth")
    model = build_sr_model({"name": "swinir_x2", "checkpoint": str(tmp_path / "swinir_x2.pth"), "scale": 2})
    with pytest.raises(UserError, match="expects scale x4"):
        build_sr_model({"name": "swinir_x4", "checkpoint": str(tmp_path / "swinir_x2.pth"), "scale": 4})
    x = pad_like_swinir(torch.rand(1, 3, 20, 12, generator=torch.Generator().manual_seed(1)), 8)
    with torch.no_grad():
        ref = model(x)
        q = wrap_model(copy.deepcopy(model), scheme_from_bits(OmegaConf.create({"w_bit": 4, "a_bit": 4})))
        with quant_state(q, weight=False, act=False):
            assert (q(x) - ref).abs().max().item() < 1e-5
            assert (run_units(model_units(q), x) - ref).abs().max().item() < 1e-5
    assert {m.qname for m in q.modules() if isinstance(m, QuantConv2d)} >= {
        "net.conv_before_upsample.0", "net.upsample.0", "net.conv_last"}
