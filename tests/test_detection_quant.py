"""Detection quantization: the wrapped detector with quantization off is the FP detector (bit for bit), the
quantized part follows `model.quantize_heads`, and ptq / repq / erq calibrate on 1 image at its own size (the
token grid, hence the number of windows in every search, follows the image)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from omegaconf import open_dict

from common.quant.modules import QuantConv2d, QuantLinear, QuantMatMul
from common.quant.quantizers import Quantizer, quant_state, quantizers_of
from common.quant.wrap import wrap_model
from common.run.registry import RunContext, get_method, scheme_from_bits
from common.run.stages import StageCache
from common.run.tracking import Tracker
from common.tasks.detection.data import DetectionData, coco_from_dict, demo_dataset
from conftest import compose_cfg
from test_detection import tiny


def _dets(model, imgs, metas):
    with torch.no_grad():
        return model(imgs, metas)


@pytest.mark.parametrize("arch", ["mask_rcnn", "cascade_mask_rcnn"])
@pytest.mark.parametrize("heads", [False, True])
def test_wrapped_detector_with_quantization_off_reproduces_fp_exactly(arch, heads):
    from erq.repq import build_scheme

    fp = tiny(arch, quantize_heads=heads)
    cfg = compose_cfg(["task=detection", "method=repq", "bits=w4a4"])
    q = wrap_model(copy.deepcopy(fp), build_scheme(cfg.bits, cfg.method))
    n_wrapped = sum(isinstance(m, (QuantLinear, QuantConv2d)) for m in q.modules())
    g = torch.Generator().manual_seed(4)
    imgs = [torch.randn(3, 70, 100, generator=g), torch.randn(3, 96, 64, generator=g)]
    metas = [{"ori_shape": (60, 90), "scale_factor": (100 / 90, 70 / 60)}, None]
    with quant_state(q, weight=False, act=False):
        got = _dets(q, imgs, metas)
    ref = _dets(fp, imgs, metas)
    for a, b in zip(got, ref):
        assert a.keys() == b.keys() and len(a["boxes"]) > 0
        for k in a:
            assert torch.equal(a[k], b[k]), k
    heads_wrapped = [n for n, m in q.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))
                     and not n.startswith("backbone.body.")]
    assert bool(heads_wrapped) == heads
    assert not any(isinstance(m, QuantConv2d) and n.endswith("upsample") for n, m in q.named_modules())
    assert n_wrapped > 0


def _data(sizes):
    """DetectionData whose calibration images have the given original sizes (no resize: img_scale = size)."""
    ann, pix = demo_dataset(len(sizes), seed=11, size_range=(40, 40))
    import numpy as np

    for im, (h, w) in zip(ann["images"], sizes):
        rng = np.random.default_rng(im["id"])
        pix[im["id"]] = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        im["height"], im["width"] = h, w
    ids = [im["id"] for im in ann["images"]]
    return DetectionData("t", coco_from_dict(ann), ids, ids, (max(max(s) for s in sizes),) * 2, pix.__getitem__)


@pytest.mark.parametrize("name", ["ptq", "repq", "erq"])
def test_methods_calibrate_on_one_image_at_its_own_size(tmp_path, name):
    cfg = compose_cfg(["task=detection", f"method={name}", "bits=w4a4", "model=mask_rcnn_swin_t"])
    assert int(cfg.method.n_calib) == 1  # the references' setting (the demo's tuned files use 8)
    assert int(compose_cfg(["task=detection", f"method={name}", "bits=w4a4"]).method.n_calib) == 8
    rows = {}
    for sizes in ([(70, 100)], [(120, 120)]):
        ctx = RunContext(cfg, tmp_path, torch.device("cpu"), StageCache(tmp_path / str(sizes), None, False),
                         Tracker(tmp_path), {"test": sizes})
        method = get_method(cfg.method.name, cfg.method.module)(cfg.method, ctx)
        data = _data(sizes)
        seen = []
        model = tiny()
        orig = model.backbone.body.swin.layers[0].blocks[1].attn

        def hook(_m, args):
            seen.append(args[0].shape[0] * args[0].shape[1])
        h = orig.register_forward_pre_hook(hook)
        q = method.quantize(model, data)
        h.remove()
        for qname, quant in quantizers_of(q):
            if isinstance(quant, Quantizer) and quant.bits < 32:
                assert bool(quant.calibrated), qname
        x, _ = data.calibration(1)
        H, W = x.shape[-2] // 4, x.shape[-1] // 4
        rows[sizes[0]] = math.ceil(H / 7) * math.ceil(W / 7) * 49
        assert seen and all(s == rows[sizes[0]] for s in seen)  # padded windows of this image's own grid
        with torch.no_grad():
            out = q([data.item(data.eval_ids[0])[0]])
        assert torch.isfinite(out[0]["scores"]).all()
    assert len(set(rows.values())) == 2


@pytest.mark.parametrize("name", ["ptq", "erq"])
def test_heads_left_by_unit_methods_are_filled_in(tmp_path, name):
    """quantize_heads=true: ptq / erq reach only the backbone units; the fill-in calibrates every head quantizer."""
    from common.tasks.detection.quant import calibrate_uncovered

    cfg = compose_cfg(["task=detection", f"method={name}", "bits=w4a4", "model=mask_rcnn_swin_t"])
    ctx = RunContext(cfg, tmp_path, torch.device("cpu"), StageCache(tmp_path, None, False), Tracker(tmp_path), {"t": 1})
    data = _data([(70, 100)])
    q = get_method(name, cfg.method.module)(cfg.method, ctx).quantize(tiny(quantize_heads=True), data)

    def missing():
        return [n for n, qq in quantizers_of(q) if isinstance(qq, Quantizer) and qq.bits < 32 and not bool(qq.calibrated)]
    before = missing()
    assert before and all(not n.startswith("backbone.body.") for n in before)
    filled = calibrate_uncovered(q, data.calibration(1)[0])
    assert set(before) <= set(filled) and not missing()
