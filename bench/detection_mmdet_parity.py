"""Parity oracle (not in CI): one STOD checkpoint through mmdet 2.x and through this project's detector, image by image.

    python bench/detection_mmdet_parity.py --config STOD/configs/swin/mask_rcnn_swin_tiny_..._3x_coco.py \
        --checkpoint mask_rcnn_swin_tiny_patch4_window7.pth --model mask_rcnn_swin_t --coco /data/coco --n 50

Needs an environment with mmdet 2.11 / mmcv-full and the STOD code on the path (the STOD backbone registers
`SwinTransformer`). Both models get the *same* pre-processed tensor (mmdet's test pipeline output), so the
comparison isolates the model: per image it prints the max |Δ| of the four backbone features, the number of
detections, the matched-box IoU (greedy, same class) and the score difference, and at the end the COCOeval AP of
both on the N images.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--model", default="mask_rcnn_swin_t")
    ap.add_argument("--coco", required=True)
    ap.add_argument("--n", type=int, default=50)
    a = ap.parse_args()
    from mmcv import Config
    from mmcv.parallel import collate, scatter  # noqa: F401
    from mmdet.apis import inference_detector, init_detector  # noqa: F401
    from mmdet.datasets import build_dataset
    from mmdet.datasets.pipelines import Compose
    from omegaconf import OmegaConf
    from torchvision.ops import box_iou

    from common.tasks.detection.data import coco_from_dict
    from common.tasks.detection.metrics import coco_eval, detections_to_coco
    from common.tasks.detection.zoo import build_detection_model

    cfg = Config.fromfile(a.config)
    ref = init_detector(cfg, a.checkpoint, device="cpu").eval()
    mcfg = OmegaConf.load(REPO / "conf" / "model" / f"{a.model}.yaml")
    mcfg.checkpoint = a.checkpoint
    ours = build_detection_model(mcfg).eval()
    cfg.data.test.ann_file = str(Path(a.coco) / "annotations/instances_val2017.json")
    cfg.data.test.img_prefix = str(Path(a.coco) / "val2017") + "/"
    ds = build_dataset(cfg.data.test)
    cat_ids = ds.cat_ids
    res_ref, res_ours = [], []
    for i in range(min(a.n, len(ds))):
        item = ds[i]
        img = item["img"][0].data[None]
        meta = item["img_metas"][0].data
        with torch.no_grad():
            f_ref = ref.backbone(img)
            f_ours = list(ours.backbone.body(img).values())
            d_feat = max(float((x - y).abs().max()) for x, y in zip(f_ref, f_ours))
            out_ref = ref.simple_test(img, [meta], rescale=True)[0]
            h, w = meta["img_shape"][:2]
            det = ours([img[0, :, :h, :w]], [{"ori_shape": meta["ori_shape"][:2],
                                              "scale_factor": tuple(meta["scale_factor"][:2])}])[0]
        bb, segs = out_ref if isinstance(out_ref, tuple) else (out_ref, None)
        rb = np.concatenate([b for b in bb]) if len(bb) else np.zeros((0, 5))
        rl = np.concatenate([np.full(len(b), c + 1) for c, b in enumerate(bb)])
        ious = []
        if len(rb) and len(det["boxes"]):
            iou = box_iou(torch.as_tensor(rb[:, :4]).float(), det["boxes"].float()).numpy()
            same = rl[:, None] == det["labels"].numpy()[None]
            ious = (iou * same).max(1)
        print(json.dumps({"image": i, "feat_maxdiff": d_feat, "n_ref": int(len(rb)), "n_ours": int(len(det["boxes"])),
                          "mean_matched_iou": float(np.mean(ious)) if len(ious) else None}))
        img_id = ds.data_infos[i]["id"]
        res_ours += detections_to_coco(img_id, det, cat_ids, with_masks=False)[0]
        res_ref += [{"image_id": img_id, "category_id": cat_ids[c], "bbox": [float(b[0]), float(b[1]),
                     float(b[2] - b[0]), float(b[3] - b[1])], "score": float(b[4])}
                    for c, bs in enumerate(bb) for b in bs]
    coco = coco_from_dict(json.loads(Path(cfg.data.test.ann_file).read_text()))
    ids = [ds.data_infos[i]["id"] for i in range(min(a.n, len(ds)))]
    print("AP^box mmdet", coco_eval(coco, res_ref, "bbox", ids)["AP"], "ours", coco_eval(coco, res_ours, "bbox", ids)["AP"])


if __name__ == "__main__":
    main()
