"""Detection (common.tasks.detection): mmdet conventions against independent re-implementations on fixed inputs.

The references here are written from the mmdet 2.11 / STOD conventions (shared spec, docs/detection.md), not
from torchvision: a port of the STOD Swin backbone (zero-pad after norm1, *then* shift; -100 shift mask built
on the padded grid; patch merging pads before its norm; per-stage output norms), mmdet's anchors, delta
decoding, RoIAlign(aligned=True, sampling_ratio=0), level mapping, class-wise NMS and mask pasting.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from common.tasks.detection.convert import (convert_mmdet_state_dict, mmdet_to_ours, ours_to_mmdet,
                                            to_mmdet_state_dict)
from common.tasks.detection.model import (CASCADE_STDS, MMDetAnchorGenerator, MMDetBoxCoder, MMDetRoIPool,
                                          _multiclass_nms, build_detector, paste_masks, roi_levels)

TINY = dict(swin=dict(patch_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=7),
            fpn_channels=16, representation=32, mask_dim=16, num_classes=3)


def tiny(arch="mask_rcnn", **kw):
    torch.manual_seed(0)
    m = build_detector(arch, **{**TINY, **kw})
    with torch.no_grad():  # non-trivial norms / biases so that every parameter matters
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


# ----------------------------------------------------------------------------- STOD backbone port (float64)
def _ref_window_attention(x, sd, pre, heads, mask):
    Bn, N, C = x.shape
    d = C // heads
    qkv = F.linear(x, sd[pre + "qkv.weight"], sd[pre + "qkv.bias"]).reshape(Bn, N, 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * d ** -0.5, qkv[1], qkv[2]
    a = q @ k.transpose(-2, -1)
    ws = 7
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + ws - 1
    index = rel[..., 0] * (2 * ws - 1) + rel[..., 1]
    bias = sd[pre + "relative_position_bias_table"][index.reshape(-1)].reshape(N, N, heads).permute(2, 0, 1)
    a = a + bias[None]
    if mask is not None:
        nw = mask.shape[0]
        a = a.view(Bn // nw, nw, heads, N, N) + mask[None, :, None]
        a = a.view(Bn, heads, N, N)
    o = (a.softmax(-1) @ v).transpose(1, 2).reshape(Bn, N, C)
    return F.linear(o, sd[pre + "proj.weight"], sd[pre + "proj.bias"])


def _windows(x, ws):
    B, H, W, C = x.shape
    return x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)


def _unwindows(w, ws, B, H, W):
    C = w.shape[-1]
    return w.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


def _stod_mask(Hp, Wp, ws=7, shift=3):
    img = torch.zeros(1, Hp, Wp, 1, dtype=torch.float64)
    cnt = 0
    for hs in (slice(0, Hp - ws), slice(Hp - ws, Hp - shift), slice(Hp - shift, Hp)):
        for wsl in (slice(0, Wp - ws), slice(Wp - ws, Wp - shift), slice(Wp - shift, Wp)):
            img[:, hs, wsl] = cnt
            cnt += 1
    mw = _windows(img, ws)[..., 0]
    m = mw[:, None, :] - mw[:, :, None]
    return m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)


def _ln(x, sd, pre):
    return F.layer_norm(x, x.shape[-1:], sd[pre + "weight"], sd[pre + "bias"], 1e-5)


def stod_backbone(img, sd, depths, heads):
    """Port of the STOD SwinTransformer forward on mmdet-named weights (float64)."""
    x = F.conv2d(img, sd["backbone.patch_embed.proj.weight"], sd["backbone.patch_embed.proj.bias"], stride=4)
    B, C, H, W = x.shape
    x = _ln(x.flatten(2).transpose(1, 2), sd, "backbone.patch_embed.norm.")
    outs = []
    for i, depth in enumerate(depths):
        Hp, Wp = math.ceil(H / 7) * 7, math.ceil(W / 7) * 7
        mask = _stod_mask(Hp, Wp)
        for j in range(depth):
            pre = f"backbone.layers.{i}.blocks.{j}."
            shift = 0 if j % 2 == 0 else 3
            C = x.shape[-1]
            y = _ln(x, sd, pre + "norm1.").view(B, H, W, C)
            y = F.pad(y, (0, 0, 0, Wp - W, 0, Hp - H))  # pad first ...
            if shift:
                y = torch.roll(y, (-shift, -shift), (1, 2))  # ... then shift
            w = _ref_window_attention(_windows(y, 7), sd, pre + "attn.", heads[i], mask if shift else None)
            y = _unwindows(w, 7, B, Hp, Wp)
            if shift:
                y = torch.roll(y, (shift, shift), (1, 2))
            x = x + y[:, :H, :W].reshape(B, H * W, C)
            h = F.gelu(F.linear(_ln(x, sd, pre + "norm2."), sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"]))
            x = x + F.linear(h, sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])
        outs.append(_ln(x, sd, f"backbone.norm{i}.").view(B, H, W, -1).permute(0, 3, 1, 2))
        if i < len(depths) - 1:
            pre = f"backbone.layers.{i}.downsample."
            g = F.pad(x.view(B, H, W, -1), (0, 0, 0, W % 2, 0, H % 2))
            g = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], -1)
            x = F.linear(_ln(g, sd, pre + "norm."), sd[pre + "reduction.weight"])
            H, W = (H + 1) // 2, (W + 1) // 2
            x = x.reshape(B, H * W, -1)
    return outs


@pytest.mark.parametrize("size", [(100, 136), (64, 96)])
def test_backbone_equals_stod_reference_float64(size):
    m = tiny().double()
    sd = {k: v.double() for k, v in to_mmdet_state_dict(m).items()}
    img = torch.randn(1, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = stod_backbone(img, sd, TINY["swin"]["depths"], TINY["swin"]["num_heads"])
    with torch.no_grad():
        ours = list(m.backbone.body(img).values())
    for r, o in zip(ref, ours):
        assert r.shape == o.shape
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)


def test_timm_order_differs_from_reference_at_detection_sizes():
    """The reason for PadThenShiftSwinBlock: timm's roll-then-pad gives different features when H, W are not
    multiples of 7 (the usual case at detection sizes)."""
    from timm.models.swin_transformer import SwinTransformerBlock

    m = tiny().double()
    img = torch.randn(1, 3, 100, 136, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = m.backbone.body(img)["0"]
        blocks = [b for st in m.backbone.body.swin.layers for b in st.blocks]
        for b in blocks:
            b.__class__ = SwinTransformerBlock
        timm_order = m.backbone.body(img)["0"]
    assert (ours - timm_order).abs().max() > 1e-6


# ----------------------------------------------------------------------------- checkpoint key map
def stod_keys(arch, depths=(2, 2, 2, 2), convs=4):
    """The mmdet key names of an STOD checkpoint, from the STOD / mmdet module definitions."""
    keys = ["backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias",
            "backbone.patch_embed.norm.weight", "backbone.patch_embed.norm.bias"]
    for i, d in enumerate(depths):
        for j in range(d):
            p = f"backbone.layers.{i}.blocks.{j}."
            keys += [p + s for s in ("norm1.weight", "norm1.bias", "attn.relative_position_bias_table",
                                     "attn.relative_position_index", "attn.qkv.weight", "attn.qkv.bias",
                                     "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
                                     "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
        if i < len(depths) - 1:
            keys += [f"backbone.layers.{i}.downsample.norm.weight", f"backbone.layers.{i}.downsample.norm.bias",
                     f"backbone.layers.{i}.downsample.reduction.weight"]
    for i in range(4):
        keys += [f"backbone.norm{i}.weight", f"backbone.norm{i}.bias"]
        keys += [f"neck.lateral_convs.{i}.conv.{s}" for s in ("weight", "bias")]
        keys += [f"neck.fpn_convs.{i}.conv.{s}" for s in ("weight", "bias")]
    keys += [f"rpn_head.{n}.{s}" for n in ("rpn_conv", "rpn_cls", "rpn_reg") for s in ("weight", "bias")]
    wb = ("weight", "bias")
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def mask(p):
        return [f"{p}convs.{i}.conv.{s}" for i in range(convs) for s in wb] + \
            [f"{p}upsample.{s}" for s in wb] + [f"{p}conv_logits.{s}" for s in wb]
    if arch == "mask_rcnn":
        keys += [f"roi_head.bbox_head.{n}.{s}" for n in ("shared_fcs.0", "shared_fcs.1", "fc_cls", "fc_reg")
                 for s in wb]
        keys += mask("roi_head.mask_head.")
    else:
        for st in range(3):
            p = f"roi_head.bbox_head.{st}."
            keys += [f"{p}shared_convs.{i}.conv.weight" for i in range(4)]
            keys += [f"{p}shared_convs.{i}.bn.{s}" for i in range(4) for s in bn]
            keys += [f"{p}{n}.{s}" for n in ("shared_fcs.0", "fc_cls", "fc_reg") for s in wb]
            keys += mask(f"roi_head.mask_head.{st}.")
    return keys


@pytest.mark.parametrize("arch", ["mask_rcnn", "cascade_mask_rcnn"])
def test_key_map_covers_every_key_both_ways(arch):
    m = tiny(arch)
    ours = set(m.state_dict())
    mm = stod_keys(arch)
    mapped = {mmdet_to_ours(k) for k in mm} - {None}
    assert mapped == ours
    assert all(mmdet_to_ours(ours_to_mmdet(k)) == k for k in ours)
    assert {ours_to_mmdet(k) for k in ours} == {k for k in mm if not k.endswith("relative_position_index")}
    # a fake STOD checkpoint with these names loads strictly and reproduces the model
    sd = to_mmdet_state_dict(m)
    sd.update({k: torch.zeros(49, 49, dtype=torch.long) for k in mm if k.endswith("relative_position_index")})
    m2 = tiny(arch)
    m2.load_state_dict(convert_mmdet_state_dict(sd, m2))
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])


def test_unmapped_or_missing_key_is_a_clear_error():
    m = tiny()
    sd = to_mmdet_state_dict(m)
    with pytest.raises(UserError, match="unmapped mmdet keys: \\['roi_head.bbox_head.extra.weight'\\]"):
        convert_mmdet_state_dict({**sd, "roi_head.bbox_head.extra.weight": torch.zeros(1)}, m)
    del sd["neck.fpn_convs.0.conv.weight"]
    with pytest.raises(UserError, match="missing from the checkpoint: \\['backbone.fpn.layer_blocks.0.0.weight'\\]"):
        convert_mmdet_state_dict(sd, m)
    with pytest.raises(KeyError):
        mmdet_to_ours("backbone.foo.weight")


# ----------------------------------------------------------------------------- anchors, coder, RoIAlign, NMS
def mmdet_anchors(feat_sizes, strides=(4, 8, 16, 32, 64), ratios=(0.5, 1.0, 2.0), scale=8):
    out = []
    for (fh, fw), s in zip(feat_sizes, strides):
        base = []
        for r in ratios:
            hr = math.sqrt(r)
            w, h = s * scale / hr, s * scale * hr
            base.append([-0.5 * w, -0.5 * h, 0.5 * w, 0.5 * h])
        base = np.array(base)
        for y in range(fh):
            for x in range(fw):
                out.append(base + np.array([x * s, y * s, x * s, y * s]))
    return np.concatenate(out)


def test_anchors_match_mmdet_unrounded_fixed_strides():
    from torchvision.models.detection.image_list import ImageList

    # 800 px side: P5 = 25, P6 = 13 -> the inferred stride would be 61, mmdet uses 64
    sizes = [(200, 3), (100, 2), (50, 1), (25, 1), (13, 1)]
    feats = [torch.zeros(1, 1, h, w) for h, w in sizes]
    gen = MMDetAnchorGenerator()
    got = gen(ImageList(torch.zeros(1, 3, 800, 12), [(800, 12)]), feats)[0]
    ref = mmdet_anchors(sizes)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-4)
    assert abs(float(got[0, 0]) + 22.627417) < 1e-4  # not rounded to -23


def mmdet_delta2bbox(rois, deltas, stds, max_shape, clip=abs(math.log(16 / 1000))):
    rois, deltas = np.asarray(rois, np.float64), np.asarray(deltas, np.float64)
    d = deltas * np.array(stds)
    dw, dh = np.clip(d[:, 2], -clip, clip), np.clip(d[:, 3], -clip, clip)
    px, py = (rois[:, 0] + rois[:, 2]) / 2, (rois[:, 1] + rois[:, 3]) / 2
    pw, ph = rois[:, 2] - rois[:, 0], rois[:, 3] - rois[:, 1]
    gw, gh = pw * np.exp(dw), ph * np.exp(dh)
    gx, gy = px + pw * d[:, 0], py + ph * d[:, 1]
    b = np.stack([gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2], 1)
    b[:, 0::2] = b[:, 0::2].clip(0, max_shape[1])
    b[:, 1::2] = b[:, 1::2].clip(0, max_shape[0])
    return b


@pytest.mark.parametrize("stds", [(1, 1, 1, 1), *CASCADE_STDS])
def test_box_coder_matches_mmdet_delta2bbox(stds):
    from common.tasks.detection.model import _clip

    g = torch.Generator().manual_seed(0)
    rois = torch.rand(50, 2, generator=g, dtype=torch.float64) * 100
    rois = torch.cat([rois, rois + 1 + torch.rand(50, 2, generator=g, dtype=torch.float64) * 80], 1)
    deltas = torch.randn(50, 4, generator=g, dtype=torch.float64) * 3
    deltas[0, 2:] = torch.tensor([-60.0, 60.0])  # both clamps (torchvision clamps only from above)
    coder = MMDetBoxCoder.from_stds(stds)
    got = _clip(coder.decode_single(deltas, rois), (120, 150)).numpy()
    np.testing.assert_allclose(got, mmdet_delta2bbox(rois, deltas, stds, (120, 150)), rtol=1e-12, atol=1e-9)
    if stds == CASCADE_STDS[2]:
        assert coder.weights[0] == pytest.approx(1 / 0.033) and coder.weights[0] != 30


def naive_roi_align_aligned(feat, roi, out, scale):
    """mmcv RoIAlign(aligned=True, sampling_ratio=0, avg) for one RoI, plain Python."""
    C, H, W = feat.shape
    x1, y1, x2, y2 = [float(v) * scale - 0.5 for v in roi]
    rw, rh = x2 - x1, y2 - y1
    bw, bh = rw / out, rh / out
    gw, gh = math.ceil(rw / out), math.ceil(rh / out)
    res = torch.zeros(C, out, out, dtype=feat.dtype)

    def bil(y, x):
        if y < -1 or y > H or x < -1 or x > W:
            return torch.zeros(C, dtype=feat.dtype)
        y, x = max(y, 0.0), max(x, 0.0)
        y0, x0 = int(y), int(x)
        if y0 >= H - 1:
            y0 = y1_ = H - 1
            y = float(y0)
        else:
            y1_ = y0 + 1
        if x0 >= W - 1:
            x0 = x1_ = W - 1
            x = float(x0)
        else:
            x1_ = x0 + 1
        ly, lx = y - y0, x - x0
        return (feat[:, y0, x0] * (1 - ly) * (1 - lx) + feat[:, y0, x1_] * (1 - ly) * lx +
                feat[:, y1_, x0] * ly * (1 - lx) + feat[:, y1_, x1_] * ly * lx)

    for i in range(out):
        for j in range(out):
            acc = torch.zeros(C, dtype=feat.dtype)
            for iy in range(gh):
                for ix in range(gw):
                    acc += bil(y1 + i * bh + (iy + 0.5) * bh / gh, x1 + j * bw + (ix + 0.5) * bw / gw)
            res[:, i, j] = acc / (gh * gw)
    return res


def test_roi_pool_is_aligned_adaptive_with_mmdet_levels():
    g = torch.Generator().manual_seed(0)
    feats = {str(i): torch.randn(1, 2, 64 // 2 ** i, 64 // 2 ** i, generator=g, dtype=torch.float64)
             for i in range(4)}
    boxes = torch.tensor([[3.3, 4.1, 30.2, 20.7], [10.0, 5.0, 130.0, 130.0], [0.0, 0.0, 255.0, 250.0], [-100.0, -90.0, 400.0, 410.0],
                          [40.2, 50.9, 41.0, 52.0]], dtype=torch.float64)
    levels = roi_levels(boxes)
    ref_lv = [min(3, max(0, math.floor(math.log2(math.sqrt((b[2] - b[0]) * (b[3] - b[1])) / 56 + 1e-6))))
              for b in boxes.tolist()]
    assert levels.tolist() == ref_lv == [0, 1, 2, 3, 0]
    got = MMDetRoIPool(7)(feats, [boxes])
    for k, b in enumerate(boxes):
        lv = ref_lv[k]
        ref = naive_roi_align_aligned(feats[str(lv)][0], b, 7, 1 / (4 * 2 ** lv))
        torch.testing.assert_close(got[k], ref, rtol=1e-9, atol=1e-9)


def greedy_nms(boxes, scores, thr):
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    while order:
        i = order.pop(0)
        keep.append(i)
        rest = []
        for j in order:
            xx1, yy1 = max(boxes[i, 0], boxes[j, 0]), max(boxes[i, 1], boxes[j, 1])
            xx2, yy2 = min(boxes[i, 2], boxes[j, 2]), min(boxes[i, 3], boxes[j, 3])
            inter = max(0.0, xx2 - xx1) * max(0.0, yy2 - yy1)
            a = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
            b = (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1])
            if inter / (a + b - inter) <= thr:  # no "+1" in widths (mmdet 2.x)
                rest.append(j)
        order = rest
    return keep


def test_multiclass_nms_matches_mmdet_rule_and_test_settings():
    g = torch.Generator().manual_seed(3)
    n, c = 60, 3
    xy = torch.rand(n, 1, 2, generator=g, dtype=torch.float64) * 50
    boxes = torch.cat([xy.expand(n, c, 2), xy + 5 + torch.rand(n, c, 2, generator=g, dtype=torch.float64) * 30], 2)
    scores = torch.rand(n, c, generator=g, dtype=torch.float64)
    scores[0, 0] = 0.05  # not kept: the rule is score > 0.05
    b, s, l = _multiclass_nms(boxes, scores, 0.05, 0.5, 100)
    ref = []
    for k in range(c):
        idx = np.where(scores[:, k].numpy() > 0.05)[0]
        kept = greedy_nms(boxes[idx, k].numpy(), scores[idx, k].numpy(), 0.5)
        ref += [(float(scores[idx[i], k]), k) for i in kept]
    ref = sorted(ref, key=lambda t: -t[0])[:100]
    assert [(float(x), int(y)) for x, y in zip(s, l)] == ref
    m = tiny()
    assert (m.rpn._pre_nms_top_n["testing"], m.rpn._post_nms_top_n["testing"], m.rpn.nms_thresh) == (1000, 1000, 0.7)
    assert m.rpn.min_size == 0 and m.rpn.score_thresh == 0
    rh = m.roi_heads
    assert (rh.score_thresh, rh.nms_thresh, rh.detections_per_img) == (0.05, 0.5, 100)
    assert rh.box_coder.weights == (10.0, 10.0, 5.0, 5.0) and m.rpn.box_coder.weights == (1.0, 1.0, 1.0, 1.0)


def test_no_small_box_removal_in_box_postprocessing():
    m = tiny()
    logits = torch.tensor([[-5.0, 5.0, -5.0, -5.0]])
    reg = torch.zeros(1, 16)
    props = [torch.tensor([[10.0, 10.0, 10.005, 30.0]])]  # width 0.005 < torchvision's 1e-2
    b, s, l = m.roi_heads.postprocess_detections(logits, reg, props, [(64, 64)])
    assert len(b[0]) == 1 and int(l[0][0]) == 1


def test_mask_paste_matches_mmdet_grid_sample_rule():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 28, 28, generator=g)
    boxes = torch.tensor([[3.4, 5.2, 20.9, 17.1], [0.0, 0.0, 31.0, 23.0]])
    got = paste_masks(probs, boxes, 24, 32, threshold=None)
    for k in range(2):
        x1, y1, x2, y2 = boxes[k].tolist()
        for yy in (0, 7, 12, 23):
            for xx in (0, 5, 19, 31):
                u = ((xx + 0.5) - x1) / (x2 - x1) * 28 - 0.5  # grid_sample, align_corners=False, zero pad
                v = ((yy + 0.5) - y1) / (y2 - y1) * 28 - 0.5
                x0, y0 = math.floor(u), math.floor(v)
                val = 0.0
                for dy in (0, 1):
                    for dx in (0, 1):
                        xi, yi = x0 + dx, y0 + dy
                        if 0 <= xi < 28 and 0 <= yi < 28:
                            val += float(probs[k, yi, xi]) * (1 - abs(u - xi)) * (1 - abs(v - yi))
                assert abs(float(got[k, yy, xx]) - val) < 1e-5
    binary = paste_masks(probs, boxes, 24, 32)
    assert torch.equal(binary, got >= 0.5)


def test_predictor_layout_background_last_in_mmdet_first_in_torchvision():
    m = tiny()
    pred = m.roi_heads.box_predictor
    x = torch.randn(5, 32)
    cls, reg = pred(x)
    mm_cls, mm_reg = pred.fc_cls(x), pred.fc_reg(x)
    assert torch.equal(cls[:, 0], mm_cls[:, 3]) and torch.equal(cls[:, 1:], mm_cls[:, :3])
    assert torch.equal(reg[:, 4:], mm_reg) and not reg[:, :4].any()
    assert torch.allclose(cls.softmax(-1)[:, 1:], mm_cls.softmax(-1)[:, :3])


def test_cascade_forward_runs_and_uses_three_stage_stds():
    m = tiny("cascade_mask_rcnn")
    assert [c.weights for c in m.roi_heads.box_coders][1] == (20.0, 20.0, 10.0, 10.0)
    with torch.no_grad():
        out = m([torch.randn(3, 64, 96)], [{"ori_shape": (60, 90), "scale_factor": (96 / 90, 64 / 60)}])
    assert out[0]["masks"].shape[-2:] == (60, 90) and out[0]["boxes"].shape[1] == 4


# ----------------------------------------------------------------------------- COCOeval
def _demo_gt(n=6):
    from common.tasks.detection.data import coco_from_dict, demo_dataset

    ann, _ = demo_dataset(n, seed=5, size_range=(64, 96))
    return coco_from_dict(ann), ann


def test_cocoeval_ground_truth_fed_back_gives_ap_1():
    from common.tasks.detection.metrics import coco_eval

    coco, ann = _demo_gt()
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9,
             "segmentation": a["segmentation"]} for a in ann["annotations"]]
    assert coco_eval(coco, dets, "bbox")["AP"] == pytest.approx(100.0)
    assert coco_eval(coco, dets, "segm")["AP"] == pytest.approx(100.0)


def test_cocoeval_known_perturbation_gives_known_ap():
    """Every box shrunk to IoU 0.72 with its ground truth: a hit at IoU 0.50…0.70, a miss at 0.75…0.95 → AP 0.5.
    Half shrunk (lower scores), half exact: 0.5 + 0.5·51/101 (101-point recall grid, recall stops at 0.5)."""
    from common.tasks.detection.metrics import coco_eval

    coco, ann = _demo_gt()

    def shrink(b):
        return [b[0], b[1], b[2] * 0.72, b[3]]
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": shrink(a["bbox"]), "score": 0.5}
            for a in ann["annotations"]]
    assert coco_eval(coco, dets, "bbox")["AP"] == pytest.approx(50.0, abs=1e-6)
    by_cat: dict = {}
    for a in ann["annotations"]:
        by_cat.setdefault(a["category_id"], []).append(a)
    dets = []
    for cat, anns in by_cat.items():
        assert len(anns) % 2 == 0 or True
        half = len(anns) // 2
        for k, a in enumerate(anns):
            exact = k < len(anns) - half
            dets.append({"image_id": a["image_id"], "category_id": cat, "score": 0.9 if exact else 0.5,
                         "bbox": a["bbox"] if exact else shrink(a["bbox"])})
    expected = []
    for cat, anns in by_cat.items():
        n, half = len(anns), len(anns) // 2
        r = (n - half) / n  # recall reached at the high IoU thresholds
        pts = sum(1 for t in np.linspace(0, 1, 101) if t <= r + 1e-12) / 101
        expected.append(0.5 + 0.5 * pts)
    assert coco_eval(coco, dets, "bbox")["AP"] == pytest.approx(100 * float(np.mean(expected)), abs=1e-6)


def test_detections_to_coco_maps_labels_boxes_and_masks():
    from common.tasks.detection.metrics import detections_to_coco

    det = {"boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0]]), "scores": torch.tensor([0.7]),
           "labels": torch.tensor([2]), "masks": torch.zeros(1, 1, 30, 40, dtype=torch.bool)}
    det["masks"][0, 0, 2:22, 1:11] = True
    b, s = detections_to_coco(7, det, [1, 5, 9])
    assert b[0]["category_id"] == 5 and b[0]["bbox"] == [1.0, 2.0, 10.0, 20.0]
    assert s[0]["bbox"] == b[0]["bbox"] and isinstance(s[0]["segmentation"]["counts"], str)


# ----------------------------------------------------------------------------- data
def test_mmdet_preprocess_sizes_and_normalisation():
    from common.tasks.detection.data import MEAN, STD, mmdet_preprocess

    rgb = np.full((427, 640, 3), 200, np.uint8)
    x, meta = mmdet_preprocess(rgb)
    assert meta["img_shape"] == (800, 1199) and x.shape == (3, 800, 1199)  # the spec's example: s = 1.87354
    assert meta["scale_factor"] == (1199 / 640, 800 / 427)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([(200 - m) / s for m, s in zip(MEAN, STD)]))


def test_coco_calibration_order_is_annotated_images_in_json_order():
    from common.tasks.detection.data import _coco_calib_order, coco_from_dict

    coco = coco_from_dict({"images": [{"id": 5, "width": 50, "height": 40}, {"id": 2, "width": 640, "height": 480},
                                      {"id": 9, "width": 31, "height": 400}, {"id": 1, "width": 64, "height": 64}],
                           "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1,
                                            "iscrowd": 0},
                                           {"id": 2, "image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1,
                                            "iscrowd": 0},
                                           {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1,
                                            "iscrowd": 0}],
                           "categories": [{"id": 1, "name": "a"}]})
    assert _coco_calib_order(coco) == [2, 1]  # 5: no annotation; 9: a side < 32


def test_demo_masks_and_boxes_are_exact():
    from pycocotools import mask as mask_utils

    from common.tasks.detection.data import demo_dataset

    ann, pix = demo_dataset(4, seed=7, size_range=(64, 96))
    assert ann["annotations"]
    for a in ann["annotations"]:
        m = mask_utils.decode(a["segmentation"]).astype(bool)
        ys, xs = np.where(m)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        assert a["area"] == m.sum()
        img = pix[a["image_id"]]
        assert len(np.unique(img[m].reshape(-1, 3), axis=0)) == 1  # one pasted colour inside the mask
    ann2, pix2 = demo_dataset(4, seed=7, size_range=(64, 96))
    assert ann2 == ann and all(np.array_equal(pix[k], pix2[k]) for k in pix)


def test_coco_folder_and_stod_checkpoint_load_and_evaluate(tmp_path):
    """dataset=coco reads val2017/ + the instances JSON; an mmdet-keyed .pth ({'state_dict': …}) loads strictly
    through the converter and evaluates with COCOeval (tiny detector, 2 generated images)."""
    import json

    from omegaconf import OmegaConf
    from PIL import Image

    from common.tasks.detection.data import build_detection_data, demo_dataset
    from common.tasks.detection.metrics import evaluate_detector
    from common.tasks.detection.zoo import build_detection_model

    ann, pix = demo_dataset(2, seed=3, size_range=(50, 70))
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    for im in ann["images"]:
        im["file_name"] = f"{im['id']:012d}.png"
        Image.fromarray(pix[im["id"]]).save(tmp_path / "val2017" / im["file_name"])
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(ann))
    m = tiny()
    sd = to_mmdet_state_dict(m)
    torch.save({"state_dict": sd, "meta": {}}, tmp_path / "ckpt.pth")
    cfg = OmegaConf.create({"name": "t", "arch": "mask_rcnn", **TINY, "checkpoint": str(tmp_path / "ckpt.pth")})
    loaded = build_detection_model(cfg)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in m.state_dict().items())
    data = build_detection_data({"name": "coco", "root": str(tmp_path), "img_scale": [96, 64]})
    assert data.eval_ids == [1, 2] and data.calibration_ids(1) == [1]
    out = evaluate_detector(loaded, data, "cpu")
    assert set(out) >= {"box", "mask"} and 0.0 <= out["box"]["AP"] <= 100.0
    del sd["rpn_head.rpn_cls.bias"]
    torch.save({"state_dict": sd}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="rpn.head.cls_logits.bias"):
        build_detection_model(OmegaConf.merge(cfg, {"checkpoint": str(tmp_path / "bad.pth")}))
