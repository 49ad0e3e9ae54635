"""Detection data: COCO val2017 (instances JSON + images) and the generated offline demo set, mmdet pre-processing.

* `mmdet_preprocess(rgb, img_scale)`: mmdet 2.11's test pipeline — keep-ratio resize to `img_scale`
  (s = min(long/max(h, w), short/min(h, w)), new size ⌊·s + 0.5⌋, bilinear on the uint8 image and re-quantized:
  cv2 INTER_LINEAR when OpenCV is installed, else torch's half-pixel bilinear rounded to uint8), RGB mean/std
  normalisation; padding to 32 happens in the model. Returns the CHW tensor and the meta (`ori_shape`,
  `img_shape`, `scale_factor` = (new_w/w, new_h/h)).
* `CocoDetectionData` (dataset=coco): evaluation over all images of the JSON (test mode, JSON order); the
  calibration order is the references': annotated images with both sides ≥ 32, JSON order (first = image 397133).
* `demo_dataset(...)`: real-photo backgrounds (scikit-image samples) with pasted circles, squares and triangles,
  exact masks (pixel centres inside the shape) and boxes (tight around the mask), as an in-memory COCO.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import UserError

__all__ = ["MEAN", "STD", "mmdet_preprocess", "DetectionData", "build_detection_data", "demo_dataset",
           "DEMO_CLASSES", "coco_from_dict"]

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
DEMO_CLASSES = ("circle", "square", "triangle")
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "immunohistochemistry",
                  "hubble_deep_field", "motorcycle_left", "page")


def _rescale_size(w: int, h: int, img_scale: Sequence[int]) -> tuple[int, int, float]:
    long_edge, short_edge = max(img_scale), min(img_scale)
    s = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(w * s + 0.5), int(h * s + 0.5), s


def _resize_uint8(rgb: np.ndarray, new_w: int, new_h: int) -> np.ndarray:
    try:
        import cv2  # mmcv's resize

        return cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    except ImportError:
        t = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float()
        out = F.interpolate(t, size=(new_h, new_w), mode="bilinear", align_corners=False)
        return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def mmdet_preprocess(rgb: np.ndarray, img_scale: Sequence[int] = (1333, 800)) -> tuple[torch.Tensor, dict]:
    """mmdet test pipeline on an RGB uint8 HWC image → normalised CHW float32 tensor (unpadded) and meta."""
    h, w = rgb.shape[:2]
    new_w, new_h, _ = _rescale_size(w, h, img_scale)
    img = rgb if (new_w, new_h) == (w, h) else _resize_uint8(rgb, new_w, new_h)
    x = torch.from_numpy(np.array(img)).float()
    x = (x - torch.tensor(MEAN)) * torch.tensor([1.0 / s for s in STD], dtype=torch.float64).float()
    meta = {"ori_shape": (h, w), "img_shape": (new_h, new_w), "scale_factor": (new_w / w, new_h / h)}
    return x.permute(2, 0, 1).contiguous(), meta


def coco_from_dict(d: dict):
    """A pycocotools COCO object from an in-memory annotation dict."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = d
    coco.createIndex()
    return coco


@dataclass
class DetectionData:
    """Evaluation images, the ground truth as a pycocotools COCO, and the calibration order."""

    name: str
    coco: Any                                   # pycocotools COCO (ground truth)
    eval_ids: list[int]                         # image ids evaluated, in order
    calib_order: list[int]                      # calibration image ids, in order (prefixes are drawn)
    img_scale: tuple[int, int]
    loader: Any = field(repr=False)             # image id -> RGB uint8 HWC
    info: dict = field(default_factory=dict)

    @property
    def cat_ids(self) -> list[int]:
        return sorted(self.coco.getCatIds())

    def item(self, img_id: int) -> tuple[torch.Tensor, dict]:
        x, meta = mmdet_preprocess(self.loader(img_id), self.img_scale)
        meta["img_id"] = int(img_id)
        return x, meta

    def eval_items(self) -> Iterator[tuple[torch.Tensor, dict]]:
        for i in self.eval_ids:
            yield self.item(i)

    @property
    def n_calib_available(self) -> int:
        """How many calibration images the source holds (a property, as the classification data's)."""
        return len(self.calib_order)

    def calibration_ids(self, n: int | None = None) -> list[int]:
        return list(self.calib_order[:self._check_n(n)])

    def calibration_items(self, n: int | None = None) -> list[tuple[torch.Tensor, dict]]:
        """The first n calibration images, each at its own size (batch 1, as the references)."""
        return [self.item(i) for i in self.calibration_ids(n)]

    def calibration(self, n: int | None = None, augment: bool = False, draw: int = 0):
        """(images, None) for the generic methods: one image → (1, 3, H, W) at its own size; several images of
        different sizes are zero-padded bottom/right to a common size (multiple of 32; an approximation of
        the references' batch-1 calibration, which only APHQ uses with more than 1 image)."""
        items = self.calibration_items(n)
        h = max(x.shape[1] for x, _ in items)
        w = max(x.shape[2] for x, _ in items)
        h, w = math.ceil(h / 32) * 32, math.ceil(w / 32) * 32
        batch = torch.zeros(len(items), 3, h, w)
        for k, (x, _) in enumerate(items):
            batch[k, :, :x.shape[1], :x.shape[2]] = x
        return batch, None

    def _check_n(self, n: int | None) -> int:
        n = len(self.calib_order) if n is None else int(n)
        if n < 1 or n > len(self.calib_order):
            raise UserError(f"n_calib={n}: the {self.name} calibration order has {len(self.calib_order)} images")
        return n


# ----------------------------------------------------------------------------- COCO
def _coco_calib_order(coco) -> list[int]:
    """mmdet's train-mode filter on the JSON's image order: images with annotations and both sides ≥ 32."""
    with_ann = {a["image_id"] for a in coco.dataset.get("annotations", [])}
    return [im["id"] for im in coco.dataset["images"]
            if im["id"] in with_ann and min(im["width"], im["height"]) >= 32]


def build_coco_data(cfg: Mapping[str, Any]) -> DetectionData:
    root = cfg.get("root")
    if not root:
        raise UserError("dataset.root is not set: set `dataset.root=/path/to/coco` (holding val2017/ and "
                        "annotations/instances_val2017.json)")
    root = Path(str(root)).expanduser()
    ann = root / str(cfg.get("ann_file") or "annotations/instances_val2017.json")
    img_dir = root / str(cfg.get("img_dir") or "val2017")
    if not ann.is_file() or not img_dir.is_dir():
        raise UserError(f"COCO not found under {root}: expected {ann.relative_to(root)} and {img_dir.relative_to(root)}/")
    from PIL import Image

    coco = coco_from_dict(json.loads(ann.read_text()))
    files = {im["id"]: im["file_name"] for im in coco.dataset["images"]}

    def load(img_id: int) -> np.ndarray:
        with Image.open(img_dir / files[img_id]) as im:
            return np.asarray(im.convert("RGB"))

    eval_ids = [im["id"] for im in coco.dataset["images"]]
    if cfg.get("n_eval"):
        eval_ids = eval_ids[:int(cfg["n_eval"])]
    order = _coco_calib_order(coco)
    info = {"root": str(root), "ann_file": str(ann), "n_images": len(eval_ids), "calib_rule": "annotated, sides >= 32, JSON order"}
    return DetectionData("coco", coco, eval_ids, order, tuple(cfg.get("img_scale") or (1333, 800)), load, info)


# ----------------------------------------------------------------------------- demo
def _backgrounds() -> list[np.ndarray]:
    import skimage.data as sd

    out = []
    for name in SKIMAGE_PHOTOS:
        try:
            img = np.asarray(getattr(sd, name)())
        except Exception:  # a sample missing from this scikit-image version
            continue
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, 2)
        out.append(img[..., :3].astype(np.uint8))
    if not out:
        raise UserError("no scikit-image sample photos found (pip install -c constraints.txt scikit-image)")
    return out


def _shape_mask(kind: str, h: int, w: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Pixels whose centre lies inside the shape (exact by construction)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    dx, dy = xx - cx, yy - cy
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if kind == "square":
        return (np.abs(u) <= r * 0.8) & (np.abs(v) <= r * 0.8)
    pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    inside = np.ones((h, w), bool)
    for (x1, y1), (x2, y2) in zip(pts, pts[1:] + pts[:1]):
        inside &= (x2 - x1) * (v - y1) - (y2 - y1) * (u - x1) >= 0
    return inside


def demo_dataset(n_images: int, seed: int, size_range: Sequence[int] = (96, 160), max_objects: int = 4,
                 first_id: int = 1) -> tuple[dict, dict[int, np.ndarray]]:
    """A generated COCO-style instance set: (annotation dict with RLE masks, {image id: RGB uint8 HWC})."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    bgs = _backgrounds()
    images, anns, pixels = [], [], {}
    ann_id = 1
    for k in range(n_images):
        img_id = first_id + k
        h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
        bg = bgs[int(rng.integers(len(bgs)))]
        sh, sw = min(bg.shape[0], h * 3), min(bg.shape[1], w * 3)
        y0, x0 = int(rng.integers(0, bg.shape[0] - sh + 1)), int(rng.integers(0, bg.shape[1] - sw + 1))
        crop = torch.from_numpy(np.ascontiguousarray(bg[y0:y0 + sh, x0:x0 + sw])).permute(2, 0, 1)[None].float()
        img = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        img = img[0].permute(1, 2, 0).round().clamp(0, 255).numpy().astype(np.uint8)
        occupied = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(1, max_objects + 1))):
            kind = int(rng.integers(len(DEMO_CLASSES)))
            r = float(rng.uniform(8, min(h, w) / 4))
            cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
            m = _shape_mask(DEMO_CLASSES[kind], h, w, cx, cy, r, float(rng.uniform(0, math.pi)))
            if m.sum() < 16 or (m & occupied).sum() > 0.1 * m.sum():
                continue
            occupied |= m
            colour = rng.integers(0, 256, 3)
            img[m] = colour
            visible_before = [a for a in anns if a["image_id"] == img_id]
            for a in visible_before:  # later shapes occlude earlier ones: keep masks exact
                a["_mask"] &= ~m
            anns.append({"id": ann_id, "image_id": img_id, "category_id": kind + 1, "iscrowd": 0, "_mask": m})
            ann_id += 1
        pixels[img_id] = img
        images.append({"id": img_id, "width": w, "height": h, "file_name": f"demo_{img_id:05d}.png"})
    out_anns = []
    for a in anns:
        m = a.pop("_mask")
        if m.sum() < 8:
            continue
        ys, xs = np.where(m)
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        box = [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]
        out_anns.append({**a, "bbox": box, "area": float(m.sum()), "segmentation": rle})
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(DEMO_CLASSES)]
    return {"images": images, "annotations": out_anns, "categories": cats}, pixels


def build_demo_data(cfg: Mapping[str, Any], seed: int = 0) -> DetectionData:
    """dataset=detection_demo: the evaluation split (generated with `eval_seed`) and a disjoint calibration
    split (`calib_seed`; null: 2000 + the run seed, so seeds draw different calibration images), both
    reproducible; nothing is read from disk."""
    size = tuple(cfg.get("size_range") or (80, 128))
    calib_seed = int(cfg["calib_seed"]) if cfg.get("calib_seed") is not None else 2000 + int(seed)
    ann, pixels = demo_dataset(int(cfg.get("n_eval") or 48), int(cfg.get("eval_seed", 1000)), size)
    cal, cal_pixels = demo_dataset(int(cfg.get("calib_pool") or 16), calib_seed, size, first_id=100000)
    pixels.update(cal_pixels)
    coco = coco_from_dict(ann)
    info = {"generator": "skimage backgrounds + pasted shapes", "eval_seed": int(cfg.get("eval_seed", 1000)),
            "calib_seed": calib_seed, "n_images": len(ann["images"]),
            "n_objects": len(ann["annotations"])}
    return DetectionData("detection_demo", coco, [im["id"] for im in ann["images"]],
                         [im["id"] for im in cal["images"]], tuple(cfg.get("img_scale") or (224, 160)),
                         pixels.__getitem__, info)


def build_detection_data(cfg: Mapping[str, Any], seed: int = 0) -> DetectionData:
    name = cfg.get("name")
    if name == "coco":
        return build_coco_data(cfg)
    if name == "detection_demo":
        return build_demo_data(cfg, seed)
    raise UserError(f"dataset={name} has no detection path: use dataset=coco (with dataset.root=) or detection_demo")
