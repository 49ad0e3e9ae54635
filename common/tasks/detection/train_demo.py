"""Train the offline demo detector: a small Swin Mask R-CNN on the generated shapes-on-photos set.

    python -m common.tasks.detection.train_demo [--steps 400] [--out common/tasks/detection/assets/swin_maskrcnn_demo.safetensors]

Reproducible (seed 0, one thread, CPU; the training images come from `demo_dataset(seed=train_seed)`, disjoint
from the evaluation and calibration seeds); a few minutes on 2 CPU cores. torchvision's training path (RPN
and RoI sampling, losses) on the mmdet-convention detector of `model.py`; AdamW, linear warm-up, cosine decay.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import demo_dataset, mmdet_preprocess
from .model import build_detector

__all__ = ["DEMO_ARCH", "train", "main"]

ASSET = Path(__file__).parent / "assets" / "swin_maskrcnn_demo.safetensors"
#: the demo detector (conf/model/mask_rcnn_swin_demo.yaml mirrors it)
DEMO_ARCH = dict(arch="mask_rcnn", num_classes=3,
                 swin=dict(patch_size=4, embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 3, 6), window_size=7,
                           mlp_ratio=4.0),
                 fpn_channels=48, representation=128, mask_dim=32, anchor_sizes=(16, 32, 64, 128, 256))
IMG_SCALE = (160, 128)
SIZE_RANGE = (80, 128)


def _targets(ann: dict, meta: dict) -> dict:
    from pycocotools import mask as mask_utils

    sx, sy = meta["scale_factor"]
    h, w = meta["img_shape"]
    boxes, labels, masks = [], [], []
    for a in ann:
        x, y, bw, bh = a["bbox"]
        boxes.append([x * sx, y * sy, (x + bw) * sx, (y + bh) * sy])
        labels.append(a["category_id"])
        m = torch.from_numpy(mask_utils.decode(a["segmentation"])).float()[None, None]
        masks.append(F.interpolate(m, size=(h, w), mode="nearest")[0, 0].to(torch.uint8))
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels),
            "masks": torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.uint8)}


def train(steps: int = 400, n_images: int = 300, batch: int = 4, lr: float = 1e-3, seed: int = 0,
          train_seed: int = 3000, log_every: int = 50) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    np.random.seed(seed)
    ann, pixels = demo_dataset(n_images, train_seed, SIZE_RANGE)
    by_img: dict[int, list] = {im["id"]: [] for im in ann["images"]}
    for a in ann["annotations"]:
        by_img[a["image_id"]].append(a)
    samples = []
    for img_id, anns in by_img.items():
        if not anns:
            continue
        x, meta = mmdet_preprocess(pixels[img_id], IMG_SCALE)
        samples.append((x, _targets(anns, meta)))
    model = build_detector(**DEMO_ARCH)
    rh = model.roi_heads
    rh.fg_bg_sampler.batch_size_per_image = 64
    model.rpn._pre_nms_top_n["training"], model.rpn._post_nms_top_n["training"] = 600, 300
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, steps - warm))))
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    t0, hist = time.perf_counter(), []
    for step in range(steps):
        if len(order) < batch:
            order += torch.randperm(len(samples), generator=g).tolist()
        idx, order = order[:batch], order[batch:]
        imgs = [samples[i][0] for i in idx]
        flip = torch.rand(1, generator=g).item() < 0.5
        tg = [dict(samples[i][1]) for i in idx]
        if flip:  # horizontal flip augmentation (boxes and masks exact)
            imgs = [x.flip(-1) for x in imgs]
            for t, x in zip(tg, imgs):
                w = x.shape[-1]
                b = t["boxes"].clone()
                t["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)
                t["masks"] = t["masks"].flip(-1)
        losses = model(imgs, targets=tg)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
        hist.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d} loss {np.mean(hist[-log_every:]):.3f} "
                  + " ".join(f"{k[5:]}={float(v):.3f}" for k, v in losses.items())
                  + f" ({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    return model, {"steps": steps, "n_images": len(samples), "batch": batch, "lr": lr, "seed": seed,
                   "train_seed": train_seed, "final_loss": float(np.mean(hist[-50:])),
                   "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--out", type=Path, default=ASSET)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model, info = train(a.steps, a.images)
    from safetensors.torch import save_file

    a.out.parent.mkdir(parents=True, exist_ok=True)
    info["stored_as"] = "float16 (loaded as float32)"  # half the file; the demo's FP model is the fp16-rounded one
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()},
              str(a.out), metadata={"info": json.dumps(info), "arch": json.dumps(DEMO_ARCH)})
    print(json.dumps(info))


if __name__ == "__main__":
    main()
