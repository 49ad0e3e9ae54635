"""COCO AP^box / AP^mask through pycocotools' COCOeval, with mmdet 2.11's result format.

Detections per image → json entries: bbox (x1, y1, x2 − x1, y2 − y1) in original-image pixels, category id
= `cat_ids[label − 1]` (torchvision label 1…K, `cat_ids` the sorted category ids of the JSON = mmdet's
class order), score; segm entries carry the RLE of the binary mask (Fortran order, counts as str) *and*
the `bbox` field (mmdet does, which makes pycocotools use the box area for segm area ranges).
AP = stats[0] (AP@[.5:.95], all areas, maxDets 100) × 100; `maxDets` = [100, 300, 1000] as mmdet.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["detections_to_coco", "coco_eval", "STAT_NAMES"]

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def detections_to_coco(img_id: int, det: dict, cat_ids: Sequence[int], with_masks: bool = True) -> tuple[list, list]:
    """(bbox entries, segm entries) of one image's detections (boxes, scores, labels[, masks (N,1,H,W) bool])."""
    from pycocotools import mask as mask_utils

    boxes = det["boxes"].detach().cpu().double().numpy()
    scores = det["scores"].detach().cpu().double().numpy()
    labels = det["labels"].detach().cpu().numpy()
    bbox, segm = [], []
    masks = det.get("masks") if with_masks else None
    if masks is not None:
        masks = masks.detach().cpu().numpy()[:, 0].astype(np.uint8)
    for k in range(len(scores)):
        x1, y1, x2, y2 = boxes[k].tolist()
        entry = {"image_id": int(img_id), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(scores[k]),
                 "category_id": int(cat_ids[int(labels[k]) - 1])}
        bbox.append(entry)
        if masks is not None:
            rle = mask_utils.encode(np.asfortranarray(masks[k]))
            rle["counts"] = rle["counts"].decode()
            segm.append({**entry, "segmentation": rle})
    return bbox, segm


def coco_eval(coco_gt, results: list[dict], iou_type: str, img_ids: Sequence[int] | None = None,
              max_dets: Sequence[int] = (100, 300, 1000), quiet: bool = True) -> dict[str, Any]:
    """COCOeval on `results` (json entries); returns AP, AP50, AP75, APs, APm, APl (×100) and the raw stats.
    No detections at all → AP 0."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {**{k: 0.0 for k in STAT_NAMES}, "stats": [0.0] * 12}
    out = io.StringIO()
    with contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext():
        dt = coco_gt.loadRes([dict(r) for r in results])
        ev = COCOeval(coco_gt, dt, iou_type)
        ev.params.catIds = sorted(coco_gt.getCatIds())
        ev.params.imgIds = list(img_ids) if img_ids is not None else sorted(coco_gt.getImgIds())
        ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(s) for s in ev.stats]
    return {**{k: 100.0 * max(stats[i], 0.0) for i, k in enumerate(STAT_NAMES)}, "stats": stats}


@torch.no_grad()
def evaluate_detector(model, data, device, desc: str = "eval", with_masks: bool = True,
                      keep_detections: bool = False) -> dict[str, Any]:
    """Run `model` image by image (batch 1) over `data.eval_items()`; AP^box / AP^mask via COCOeval."""
    from tqdm.auto import tqdm

    model.eval()
    bbox, segm, per_image = [], [], []
    for x, meta in tqdm(data.eval_items(), total=len(data.eval_ids), desc=desc, mininterval=5.0, leave=False):
        det = model([x.to(device)], [meta])[0]
        b, s = detections_to_coco(meta["img_id"], det, data.cat_ids, with_masks and "masks" in det)
        bbox += b
        segm += s
        if keep_detections:
            per_image.append({k: v.cpu() for k, v in det.items() if k != "masks"})
    box = coco_eval(data.coco, bbox, "bbox", data.eval_ids)
    out = {"box": box, "n_detections": len(bbox)}
    if with_masks and segm:
        out["mask"] = coco_eval(data.coco, segm, "segm", data.eval_ids)
    elif with_masks:
        out["mask"] = coco_eval(data.coco, [], "segm", data.eval_ids)
    if keep_detections:
        out["detections"] = per_image
    return out
