"""`method=repq` and `method=erq` end to end on tiny random ViT / Swin models (no data set, no eval loop)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import DictConfig, open_dict

from common.run.registry import RunContext, get_method
from common.quant.modules import QuantConv2d, QuantLinear
from common.quant.quantizers import Quantizer, quant_state, quantizers_of
from common.quant.wrap import quant_layers
from common.run.stages import StageCache
from common.run.tracking import Tracker
from conftest import compose_cfg, read_jsonl
from erq.dual_uniform import DualUniformQuantizer

IMG = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


class _Images:
    """The PTQData calibration interface over a fixed tensor of images."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def calibration(self, n: int, augment: bool = False):
        return self.images[:n], torch.zeros(min(n, len(self.images)), dtype=torch.long)


def _tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "vit":
        model = timm.create_model("deit_tiny_patch16_224", depth=2, img_size=IMG, embed_dim=96, num_heads=3)
    else:
        model = timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1), embed_dim=32,
                                  num_heads=(1, 2, 2, 4), img_size=IMG, window_size=4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.mul_(1 + torch.rand_like(m.weight) * 3)
                m.bias.add_(0.3 * torch.randn_like(m.bias))
    return model.eval()


def _method(name: str, tmp: Path, overrides=(), reuse: bool = False, bits: str = "w4a4"):
    cfg = compose_cfg([f"method={name}", f"bits={bits}", "model=deit_t", *overrides])  # no conf/tuned file
    with open_dict(cfg):
        cfg.method.n_calib = 6
    ctx = RunContext(cfg, tmp, torch.device("cpu"), StageCache(tmp, None, reuse), Tracker(tmp), {"test": 1})
    return get_method(cfg.method.name, cfg.method.module)(cfg.method, ctx), ctx


def _images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _on_grid(layer: torch.nn.Module) -> bool:
    w = layer.weight.detach()
    wq = layer.weight_quantizer(w)
    if layer.bias is None and isinstance(layer, QuantLinear):  # no-bias branch leaves the last column to RTN
        w, wq = w[:, :-1], wq[:, :-1]
    return torch.allclose(wq, w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("name", ["repq", "erq"])
def test_method_quantizes_every_site(tmp_path, family, name):
    model = _tiny(family)
    method, ctx = _method(name, tmp_path)
    q = method.quantize(copy.deepcopy(model), _Images(_images()))
    for qname, quant in quantizers_of(q):
        if isinstance(quant, Quantizer) and quant.bits < 32:
            assert bool(quant.calibrated) and quant.enabled, qname
    with torch.no_grad():
        out = q(_images(2))
    assert torch.isfinite(out).all()
    layers = dict(quant_layers(q, (QuantLinear, QuantConv2d)))
    duals = [n for n, m in layers.items() if isinstance(m.weight_quantizer, DualUniformQuantizer)]
    if name == "erq":
        assert duals and all(n.endswith(("qkv", "fc1")) for n in duals)
        assert all(_on_grid(m) for m in layers.values()), "Wqer leaves every weight on its grid"
        assert {"erq_act_init", "erq_stats", "erq_aqer", "erq_weight_init", "erq_wqer"} <= set(ctx.timings)
        if family == "swin":  # ERQ keeps Swin's reduction bias-free (no downsample reparameterization)
            assert all(m.bias is None for n, m in layers.items() if n.endswith("reduction"))
    else:
        assert not duals
        assert q.patch_embed.proj.input_quantizer.bits == 8
        if family == "swin":
            assert all(m.bias is not None for n, m in layers.items() if n.endswith("reduction"))


def _calib_mse(model, q, images) -> float:
    with torch.no_grad():
        return float((q(images) - model(images)).pow(2).mean())


def test_erq_reduces_layer_and_output_error(tmp_path):
    """Wqer beats round-to-nearest on every layer's own objective, and ERQ beats its stages switched off."""
    model, images = _tiny("vit"), _images()
    full, _ = _method("erq", tmp_path / "full", ["method.diagnostics=true"], bits="w3a4")
    q_full = full.quantize(copy.deepcopy(model), _Images(images))
    records = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    layers = [r for r in records if r.get("event") == "erq_layer" and "wqer_err" in r]
    assert len(layers) == 1 + 2 * 4 + 1  # patch embed, 2 blocks x 4 linears, head
    assert all(r["wqer_err"] <= r["rtn_err"] for r in layers), layers
    off, _ = _method("erq", tmp_path / "off", ["method.aqer.enabled=false", "method.wqer.enabled=false"], bits="w3a4")
    q_off = off.quantize(copy.deepcopy(model), _Images(images))
    assert _calib_mse(model, q_full, images) < _calib_mse(model, q_off, images)


def test_switches_off_keep_reparameterized_weights(tmp_path):
    model = _tiny("vit")
    method, _ = _method("erq", tmp_path, ["method.aqer.enabled=false", "method.wqer.enabled=false"])
    q = method.quantize(copy.deepcopy(model), _Images(_images()))
    # fc2 / proj / head are untouched by reparameterization, so without Aqer/Wqer they keep FP weights
    assert torch.equal(q.blocks[0].mlp.fc2.weight, model.blocks[0].mlp.fc2.weight)
    assert torch.equal(q.head.weight, model.head.weight)
    with quant_state(q, weight=False, act=False), torch.no_grad():
        assert (q(_images(2)) - model(_images(2))).abs().max() < 1e-4


def test_head_lambda_switch(tmp_path):
    method, _ = _method("erq", tmp_path)
    head = type("L", (), {"site": "head"})()
    fc = type("L", (), {"site": "fc1"})()
    coe = float(method.cfg.coe)
    assert method.aqer_lambda(head) == pytest.approx(0.1) and method.aqer_lambda(fc) == pytest.approx(0.1 * coe)
    assert method.wqer_lambda(head) == pytest.approx(0.1 * coe)  # reference: overwritten
    fixed, _ = _method("erq", tmp_path / "b", ["method.wqer.head_lambda_overwritten=false"])
    assert fixed.wqer_lambda(head) == pytest.approx(0.1)


def test_erq_resumes_from_stage_cache(tmp_path):
    model, images = _tiny("swin"), _images()
    first, _ = _method("erq", tmp_path, reuse=True)
    q1 = first.quantize(copy.deepcopy(model), _Images(images))
    second, _ = _method("erq", tmp_path, reuse=True)
    q2 = second.quantize(copy.deepcopy(model), _Images(images))
    events = read_jsonl(tmp_path / "stages" / "events.jsonl")
    assert [e["event"] for e in events if e["stage"] == "erq_reduce"][-1] == "loaded"
    s1, s2 = q1.state_dict(), q2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
