"""Swin Mask R-CNN / Cascade Mask R-CNN on torchvision detection parts + timm's Swin, with mmdet conventions.

What follows mmdet 2.11 (the Swin-Transformer-Object-Detection code the papers used; docs/detection.md):
  * backbone: timm `SwinTransformer` at dynamic input size (`strict_img_size=False`, `always_partition=True`:
    window 7 and shift 3 in every odd block of every stage, whatever the resolution), with the reference
    window order (zero-pad to a multiple of the window *then* roll; timm rolls first), per-stage output
    LayerNorms (`out_norms`), NCHW features '0'…'3' at strides 4…32; torchvision FPN with P6 = max-pool;
  * anchors: unrounded base anchors, fixed strides 4…64 (`MMDetAnchorGenerator`);
  * box coder: Δ·std decoding with the symmetric ±log(1000/16) clamp (`MMDetBoxCoder`, weights = 1/std);
  * RoI pooling: mmdet's level rule (finest scale 56, P2–P5) and aligned RoIAlign, adaptive sampling;
  * predictors keep mmdet's tensor layout (81 logits, background last; 4·80 class-specific deltas; 80
    mask channels) and reorder only their outputs to torchvision's (background first);
  * test: RPN top-1000 per level, NMS 0.7 per level, 1000 proposals, no size filter; boxes score > 0.05,
    class-wise NMS 0.5, top 100, no small-box removal; masks pasted with grid_sample (pixel centres),
    thresholded ≥ 0.5; Cascade: three stages, refinement with the argmax class, mean logits, final decode
    with stage-2 deltas on the stage-2 input boxes, mean of the three sigmoid masks.
Images enter already resized and normalised (`common.tasks.detection.data`); `forward(images, metas)`
maps boxes and masks back to each image's original size with its `scale_factor`.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, batched_nms, box_iou, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

__all__ = ["PadThenShiftSwinBlock", "SwinFPNBackbone", "MMDetAnchorGenerator", "MMDetBoxCoder", "MMDetRoIPool",
           "MMDetBoxPredictor", "MMDetMaskPredictor", "MMDetRoIHeads", "CascadeRoIHeads", "SwinMaskRCNN",
           "build_detector", "paste_masks", "CASCADE_STDS", "BBOX_CLIP"]

BBOX_CLIP = math.log(1000.0 / 16)
CASCADE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))


# --------------------------------------------------------------------------- backbone
class PadThenShiftSwinBlock(SwinTransformerBlock):
    """timm Swin block with the reference order: zero-pad (after norm1) to a multiple of the window,
    then cyclic shift, partition, attend (mask built on the padded grid), reverse, un-shift, crop."""

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        wh, ww = self.window_size
        pad_h, pad_w = (wh - H % wh) % wh, (ww - W % ww) % ww
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        shifted = any(self.shift_size)
        if shifted:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        windows = x.view(B, Hp // wh, wh, Wp // ww, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, C)
        mask = self.get_attn_mask(x) if shifted else None
        out = self.attn(windows, mask=mask)
        out = out.view(B, Hp // wh, Wp // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        if shifted:
            out = torch.roll(out, shifts=self.shift_size, dims=(1, 2))
        return out[:, :H, :W, :].contiguous()


class SwinBody(nn.Module):
    """timm SwinTransformer stages + per-stage output LayerNorms → OrderedDict '0'…'3' (NCHW)."""

    def __init__(self, swin: nn.Module):
        super().__init__()
        self.swin = swin
        swin.norm = nn.Identity()  # the classifier's final norm is unused in detection
        dims = [stage.blocks[-1].norm1.normalized_shape[0] for stage in swin.layers]
        self.out_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)
        self.out_channels_list = dims
        for stage in swin.layers:
            for blk in stage.blocks:
                if type(blk) is SwinTransformerBlock:
                    blk.__class__ = PadThenShiftSwinBlock

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        x = self.swin.patch_embed(x)
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, stage in enumerate(self.swin.layers):
            x = stage(x)
            out[str(i)] = self.out_norms[i](x).permute(0, 3, 1, 2).contiguous()
        return out


class SwinFPNBackbone(nn.Module):
    """`body` (SwinBody) + torchvision FPN with P6 = max-pool(k1, s2); `out_channels` for torchvision."""

    def __init__(self, body: SwinBody, out_channels: int = 256):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels_list, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(self.body(x))


def build_swin(timm_name: str | None = None, **kw) -> nn.Module:
    """A timm Swin at dynamic input size with window 7 / shift 3 everywhere (no classifier head)."""
    args = dict(pretrained=False, num_classes=0, strict_img_size=False, always_partition=True,
                drop_path_rate=0.0)
    args.update(kw)
    if timm_name:
        return timm.create_model(timm_name, **args)
    from timm.models.swin_transformer import SwinTransformer

    args.pop("pretrained")
    return SwinTransformer(**args)


# --------------------------------------------------------------------------- anchors, coder, pooling
class MMDetAnchorGenerator(AnchorGenerator):
    """mmdet anchors: base anchors w = S/√r, h = S·√r (ratio r = h/w) not rounded, centred at 0; the grid
    uses fixed strides (not padded size // feature size). Order: location-major, ratios inner."""

    def __init__(self, sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5,
                 strides: Sequence[int] = (4, 8, 16, 32, 64)):
        super().__init__(sizes, aspect_ratios)
        self.strides = tuple(int(s) for s in strides)

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")):
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        grid_sizes = [f.shape[-2:] for f in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.empty((), dtype=torch.int64, device=device).fill_(s)] * 2
                   for s in self.strides[:len(grid_sizes)]]
        self.set_cell_anchors(dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]


class MMDetBoxCoder(BoxCoder):
    """torchvision BoxCoder (weights = 1/std) with mmdet's decode: centre (x1+x2)/2, dw/dh clamped to ±log(1000/16)."""

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), bbox_xform_clip: float = BBOX_CLIP):
        super().__init__(tuple(float(w) for w in weights), bbox_xform_clip)

    @classmethod
    def from_stds(cls, stds: Sequence[float]) -> "MMDetBoxCoder":
        return cls(tuple(1.0 / float(s) for s in stds))

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        boxes = boxes.to(rel_codes.dtype)
        wx, wy, ww, wh = self.weights
        px, py = (boxes[:, 0] + boxes[:, 2]) * 0.5, (boxes[:, 1] + boxes[:, 3]) * 0.5
        pw, ph = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        dx, dy = rel_codes[:, 0::4] / wx, rel_codes[:, 1::4] / wy
        dw = (rel_codes[:, 2::4] / ww).clamp(-self.bbox_xform_clip, self.bbox_xform_clip)
        dh = (rel_codes[:, 3::4] / wh).clamp(-self.bbox_xform_clip, self.bbox_xform_clip)
        gx, gy = px[:, None] + pw[:, None] * dx, py[:, None] + ph[:, None] * dy
        gw, gh = pw[:, None] * torch.exp(dw), ph[:, None] * torch.exp(dh)
        out = torch.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], dim=2)
        return out.flatten(1)


def roi_levels(boxes: torch.Tensor, finest_scale: float = 56.0, num_levels: int = 4) -> torch.Tensor:
    """mmdet level of each RoI: floor(log2(sqrt(w·h)/finest_scale + 1e-6)) clamped to [0, L-1]."""
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, num_levels - 1).long()


class MMDetRoIPool(nn.Module):
    """mmdet `SingleRoIExtractor` + mmcv `RoIAlign` defaults: aligned=True, sampling_ratio=0 (adaptive),
    fixed spatial scales 1/stride on the first len(strides) FPN levels, mmdet's level rule."""

    def __init__(self, output_size: int, featmap_names: Sequence[str] = ("0", "1", "2", "3"),
                 strides: Sequence[int] = (4, 8, 16, 32), finest_scale: float = 56.0, sampling_ratio: int = 0,
                 aligned: bool = True):
        super().__init__()
        self.output_size, self.featmap_names = int(output_size), list(featmap_names)
        self.strides, self.finest_scale = tuple(strides), float(finest_scale)
        self.sampling_ratio, self.aligned = int(sampling_ratio), bool(aligned)

    def forward(self, features: dict, boxes: list[torch.Tensor], image_shapes=None) -> torch.Tensor:
        feats = [features[n] for n in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
        out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], self.output_size, self.output_size)
        if rois.shape[0] == 0:
            return out
        levels = roi_levels(rois[:, 1:], self.finest_scale, len(feats))
        for lvl, (f, s) in enumerate(zip(feats, self.strides)):
            idx = torch.where(levels == lvl)[0]
            if idx.numel():
                out[idx] = roi_align(f, rois[idx], self.output_size, 1.0 / s, self.sampling_ratio,
                                     self.aligned).to(out.dtype)
        return out


# --------------------------------------------------------------------------- predictors (mmdet layout)
class MMDetBoxPredictor(nn.Module):
    """mmdet `fc_cls` (K+1, background last) and class-specific `fc_reg` (4K); outputs in torchvision's
    layout: logits (N, K+1) with background first, deltas (N, 4(K+1)) with zero background deltas."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes  # foreground classes K
        self.fc_cls = nn.Linear(in_channels, num_classes + 1)
        self.fc_reg = nn.Linear(in_channels, 4 * num_classes)

    def forward(self, x: torch.Tensor):
        x = x.flatten(1)
        cls, reg = self.fc_cls(x), self.fc_reg(x)
        K = self.num_classes
        return torch.cat([cls[:, K:], cls[:, :K]], 1), torch.cat([reg.new_zeros(reg.shape[0], 4), reg], 1)


class MMDetMaskPredictor(nn.Module):
    """`upsample` ConvTranspose2d(k2, s2) + ReLU + `conv_logits` (K channels, mmdet); output (N, K+1, ·, ·)
    with a zero background channel 0 (torchvision's layout)."""

    def __init__(self, in_channels: int, dim: int, num_classes: int):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, dim, 2, 2)
        self.conv_logits = nn.Conv2d(dim, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_logits(F.relu(self.upsample(x)))
        return torch.cat([y.new_zeros(y.shape[0], 1, *y.shape[2:]), y], 1)


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int,
                threshold: float | None = 0.5) -> torch.Tensor:
    """mmdet `_do_paste_mask`: bilinear grid_sample of each (M×M) probability map at the pixel centres of the
    full (height × width) canvas, align_corners=False, zero padding; binarised with m ≥ threshold."""
    n = masks.shape[0]
    if n == 0:
        return masks.new_zeros(0, height, width, dtype=torch.bool if threshold is not None else masks.dtype)
    x1, y1, x2, y2 = (boxes[:, i:i + 1] for i in range(4))
    img_y = torch.arange(height, device=masks.device, dtype=torch.float32) + 0.5
    img_x = torch.arange(width, device=masks.device, dtype=torch.float32) + 0.5
    img_y = (img_y[None] - y1) / (y2 - y1) * 2 - 1
    img_x = (img_x[None] - x1) / (x2 - x1) * 2 - 1
    gx = img_x[:, None, :].expand(n, height, width)
    gy = img_y[:, :, None].expand(n, height, width)
    out = F.grid_sample(masks[:, None].float(), torch.stack([gx, gy], 3), align_corners=False)[:, 0]
    return out >= threshold if threshold is not None else out


# --------------------------------------------------------------------------- RoI heads
def _multiclass_nms(boxes, scores, score_thresh, nms_thresh, max_det):
    """boxes (N, C, 4), scores (N, C) foreground only → kept boxes, scores, labels (0-based fg), order by score."""
    n, c = scores.shape
    labels = torch.arange(c, device=scores.device).expand(n, c)
    boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
    keep = torch.where(scores > score_thresh)[0]
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:max_det]
    return boxes[keep], scores[keep], labels[keep]


def _clip(boxes: torch.Tensor, size) -> torch.Tensor:
    h, w = size
    b = boxes.reshape(-1, 4)
    b = torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1)
    return b.reshape(boxes.shape)


class MMDetRoIHeads(RoIHeads):
    """torchvision RoIHeads with mmdet test post-processing (no small-box removal)."""

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        boxes_per_image = [len(p) for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals)
        pred_scores = F.softmax(class_logits, -1)
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, shape in zip(pred_boxes.split(boxes_per_image), pred_scores.split(boxes_per_image),
                                        image_shapes):
            boxes = _clip(boxes, shape)
            b, s, l = _multiclass_nms(boxes[:, 1:], scores[:, 1:], self.score_thresh, self.nms_thresh,
                                      self.detections_per_img)
            all_boxes.append(b), all_scores.append(s), all_labels.append(l + 1)
        return all_boxes, all_scores, all_labels


class CascadeRoIHeads(nn.Module):
    """Cascade Mask R-CNN test path (mmdet `CascadeRoIHead.simple_test`) from torchvision ops; inference only."""

    def __init__(self, box_roi_pool, box_heads, box_predictors, stds=CASCADE_STDS, mask_roi_pool=None,
                 mask_heads=None, mask_predictors=None, score_thresh=0.05, nms_thresh=0.5, detections_per_img=100):
        super().__init__()
        self.box_roi_pool, self.mask_roi_pool = box_roi_pool, mask_roi_pool
        self.box_head, self.box_predictor = nn.ModuleList(box_heads), nn.ModuleList(box_predictors)
        self.mask_head = nn.ModuleList(mask_heads or [])
        self.mask_predictor = nn.ModuleList(mask_predictors or [])
        self.box_coders = [MMDetBoxCoder.from_stds(s) for s in stds]
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img

    def has_mask(self) -> bool:
        return len(self.mask_head) > 0

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            raise NotImplementedError("Cascade training is not implemented (inference of converted checkpoints)")
        counts = [len(p) for p in proposals]
        rois, logits = list(proposals), []
        stages = len(self.box_head)
        for s in range(stages):
            x = self.box_head[s](self.box_roi_pool(features, rois, image_shapes))
            cls, reg = self.box_predictor[s](x)
            logits.append(cls)
            if s < stages - 1:
                label = cls[:, 1:].argmax(1) + 1
                d = reg.view(reg.shape[0], -1, 4)[torch.arange(reg.shape[0], device=reg.device), label]
                boxes = self.box_coders[s].decode_single(d, torch.cat(rois)).split(counts)
                rois = [_clip(b, sh) for b, sh in zip(boxes, image_shapes)]
        scores = F.softmax(sum(logits) / stages, -1)
        pred = self.box_coders[stages - 1].decode(reg, rois)
        result = []
        for boxes, sc, shape in zip(pred.split(counts), scores.split(counts), image_shapes):
            b, s_, l = _multiclass_nms(_clip(boxes, shape)[:, 1:], sc[:, 1:], self.score_thresh, self.nms_thresh,
                                       self.detections_per_img)
            result.append({"boxes": b, "scores": s_, "labels": l + 1})
        if self.has_mask():
            det_boxes = [r["boxes"] for r in result]
            feats = self.mask_roi_pool(features, det_boxes, image_shapes)
            probs = sum(torch.sigmoid(p(h(feats))) for h, p in zip(self.mask_head, self.mask_predictor))
            probs = probs / len(self.mask_head)
            labels = torch.cat([r["labels"] for r in result])
            m = probs[torch.arange(labels.numel(), device=labels.device), labels][:, None]
            for r, mm in zip(result, m.split([len(b) for b in det_boxes])):
                r["masks"] = mm
        return result, {}


# --------------------------------------------------------------------------- detector
class _PreprocessedTransform(GeneralizedRCNNTransform):
    """Images come resized and normalised by the loader: only pad (bottom/right, 0) to a multiple of 32."""

    def __init__(self, size_divisible: int = 32):
        super().__init__(min_size=800, max_size=1333, image_mean=[0.0] * 3, image_std=[1.0] * 3,
                         size_divisible=size_divisible)

    def normalize(self, image):
        return image

    def resize(self, image, target=None):
        return image, target


class SwinMaskRCNN(MaskRCNN):
    """torchvision MaskRCNN (or its Cascade variant) over `SwinFPNBackbone` with mmdet conventions.

    `forward(images, metas=None, targets=None)`: images are pre-processed tensors (C, h, w); metas carry
    `ori_shape` (H, W) and `scale_factor` (w_scale, h_scale); detections come back in original-image
    pixels with binary masks (N, 1, H, W) (no meta: resized-image coordinates). With targets in training
    mode, returns torchvision's loss dict (Mask R-CNN only)."""

    def forward(self, images, metas: list[dict] | None = None, targets=None, paste: bool = True):
        images = list(images)
        image_list, targets = self.transform(images, targets)
        features = self.backbone(image_list.tensors)
        proposals, rpn_losses = self.rpn(image_list, features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return self.postprocess_mmdet(detections, image_list.image_sizes, metas, paste)

    def postprocess_mmdet(self, detections, image_sizes, metas, paste: bool = True):
        out = []
        for i, det in enumerate(detections):
            boxes = det["boxes"]
            meta = (metas or [None] * len(detections))[i] or {}
            sf = meta.get("scale_factor")
            ori = meta.get("ori_shape") or image_sizes[i]
            if sf is not None:
                boxes = boxes / boxes.new_tensor([sf[0], sf[1], sf[0], sf[1]])
            r = {"boxes": boxes, "scores": det["scores"], "labels": det["labels"]}
            if "masks" in det and paste:
                r["masks"] = paste_masks(det["masks"][:, 0], boxes, int(ori[0]), int(ori[1]))[:, None]
            elif "masks" in det:
                r["mask_probs"] = det["masks"]
            out.append(r)
        return out

    # ---------------------------------------------------------------- vitq hooks
    def quant_site(self, name: str, module: nn.Module) -> str | None:
        """Quantization sites: the Swin body's linears keep their ViT sites, its patch-embed conv is
        `patch_embed`; with `quantize_heads` off (default) FPN / RPN / RoI heads stay FP (None)."""
        from common.quant.scheme import site_of

        if name.startswith("backbone.body.swin."):
            return site_of(name[len("backbone.body.swin."):], module)
        if not getattr(self, "quantize_heads", False):
            return None
        return "conv" if isinstance(module, nn.Conv2d) else "linear"

    def vitq_units(self):
        """Reconstruction / streaming units of the quantized part: the Swin body (patch_embed, patch
        mergings, blocks), fed with the padded image tensor (batch of one, or images of one size)."""
        from common.models.units import Unit

        swin = self.backbone.body.swin
        units = [Unit("backbone.body.swin.patch_embed", swin.patch_embed, self._pad, kind="patch_embed")]
        for s, stage in enumerate(swin.layers):
            if not isinstance(stage.downsample, nn.Identity):
                units.append(Unit(f"backbone.body.swin.layers.{s}.downsample", stage.downsample, kind="merge"))
            for j, blk in enumerate(stage.blocks):
                units.append(Unit(f"backbone.body.swin.layers.{s}.blocks.{j}", blk))
        return units

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        d = self.transform.size_divisible
        h, w = x.shape[-2:]
        return F.pad(x, (0, (d - w % d) % d, 0, (d - h % d) % d))


def _mask_branch(dim: int, mask_dim: int, num_classes: int, n_convs: int = 4):
    return MaskRCNNHeads(dim, [mask_dim] * n_convs, 1), MMDetMaskPredictor(mask_dim, mask_dim, num_classes)


def build_detector(arch: str = "mask_rcnn", num_classes: int = 80, timm_name: str | None = None,
                   swin: dict[str, Any] | None = None, fpn_channels: int = 256, representation: int = 1024,
                   mask_dim: int = 256, rpn_pre_nms_top_n: int = 1000, rpn_post_nms_top_n: int = 1000,
                   rpn_nms_thresh: float = 0.7, score_thresh: float = 0.05, nms_thresh: float = 0.5,
                   detections_per_img: int = 100, anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
                   quantize_heads: bool = False, **_: Any) -> SwinMaskRCNN:
    """A Swin Mask R-CNN (`arch=mask_rcnn`) or Cascade Mask R-CNN (`arch=cascade_mask_rcnn`), mmdet settings.

    `timm_name` (e.g. swin_tiny_patch4_window7_224) or `swin` kwargs of timm's SwinTransformer (demo sizes).
    `num_classes` = foreground classes (80 for COCO); torchvision labels are 1…K (0 = background)."""
    body = SwinBody(build_swin(timm_name, **(swin or {})))
    backbone = SwinFPNBackbone(body, fpn_channels)
    anchors = MMDetAnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    box_pool, mask_pool = MMDetRoIPool(7), MMDetRoIPool(14)
    K = num_classes
    if arch == "mask_rcnn":
        mask_head, mask_pred = _mask_branch(fpn_channels, mask_dim, K)
        box_head = TwoMLPHead(fpn_channels * 49, representation)
        box_pred = MMDetBoxPredictor(representation, K)
    elif arch == "cascade_mask_rcnn":
        mask_head = mask_pred = box_head = box_pred = None
    else:
        raise ValueError(f"arch must be mask_rcnn or cascade_mask_rcnn, not {arch!r}")
    model = SwinMaskRCNN(backbone, num_classes=None, rpn_anchor_generator=anchors,
                         box_head=box_head if box_head is not None else TwoMLPHead(fpn_channels * 49, representation),
                         box_predictor=box_pred if box_pred is not None else MMDetBoxPredictor(representation, K),
                         mask_head=mask_head or _mask_branch(fpn_channels, mask_dim, K)[0],
                         mask_predictor=mask_pred or _mask_branch(fpn_channels, mask_dim, K)[1],
                         rpn_pre_nms_top_n_test=rpn_pre_nms_top_n, rpn_post_nms_top_n_test=rpn_post_nms_top_n,
                         rpn_nms_thresh=rpn_nms_thresh, box_score_thresh=score_thresh, box_nms_thresh=nms_thresh,
                         box_detections_per_img=detections_per_img)
    model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool = box_pool, mask_pool  # mmdet pooling
    model.transform = _PreprocessedTransform(32)
    model.rpn.box_coder = MMDetBoxCoder((1.0, 1.0, 1.0, 1.0))
    model.rpn.min_size = 0.0
    model.rpn.score_thresh = 0.0
    if arch == "mask_rcnn":
        old = model.roi_heads
        old.__class__ = MMDetRoIHeads
        old.box_coder = MMDetBoxCoder.from_stds(CASCADE_STDS[0])
    else:
        heads = [FastRCNNConvFCHead((fpn_channels, 7, 7), [fpn_channels] * 4, [representation],
                                    norm_layer=nn.BatchNorm2d) for _ in range(3)]
        preds = [MMDetBoxPredictor(representation, K) for _ in range(3)]
        branches = [_mask_branch(fpn_channels, mask_dim, K) for _ in range(3)]
        model.roi_heads = CascadeRoIHeads(box_pool, heads, preds, CASCADE_STDS, mask_pool,
                                          [b[0] for b in branches], [b[1] for b in branches], score_thresh,
                                          nms_thresh, detections_per_img)
    model.arch, model.num_fg_classes, model.quantize_heads = arch, K, bool(quantize_heads)
    return model.eval()
