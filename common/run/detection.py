"""The `task=detection` experiment: Swin Mask R-CNN / Cascade Mask R-CNN, AP^box / AP^mask via COCOeval.

`run_detection(cfg)` is what `common.run.pipeline.run` calls for `task.name == detection`. Same method
registry, stage cache, tracker and run dir as classification; a method must declare `"detection"` in its
`tasks`. The method sees the detector (its `quant_site` / `vitq_units` name what is quantized: the Swin
backbone; `model.quantize_heads=true` adds FPN / RPN / RoI heads) and a data object whose `calibration(n)`
returns the first n calibration images (the references' order). FP and quantized models are evaluated
image by image (batch 1, mmdet test pipeline) and scored with pycocotools' COCOeval.
"""
from __future__ import annotations

import time
from typing import Any

from omegaconf import DictConfig, OmegaConf

from common.run.experiment import checkpoint_id, start

__all__ = ["run_detection", "format_detection_table", "published_detection"]


def published_detection(model: str, method: str, bits: str) -> dict[str, Any] | None:
    """Published AP^box / AP^mask for (model, method, bits) (`detection_entries` of
    common/report/assets/published.yaml; FP rows have bits `fp`)."""
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[1] / "report" / "assets" / "published.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    for e in data.get("detection_entries") or []:
        if e["model"] == model and e["method"] == method and (e["bits"] == bits or method == "fp"):
            return {"box": float(e["box"]), "mask": float(e["mask"]), "source": e["source"]}
    return None


def format_detection_table(r: dict[str, Any]) -> str:
    lines = [f"{r['model']} | {r['method']} | {r['bits']} | {r['dataset']} "
             f"(calib {r['n_calib']}, eval {r['n_eval']} images)",
             f"{'':10s} {'AP^box':>7s} {'AP^mask':>8s}"]
    for label, key in (("FP", "fp"), ("quantized", "quant")):
        lines.append(f"{label:10s} {r[f'{key}_box_ap']:7.1f} {r[f'{key}_mask_ap']:8.1f}")
    pub = r.get("published") or {}
    if pub:
        lines.append(f"{'published':10s} {pub.get('box', float('nan')):7.1f} {pub.get('mask', float('nan')):8.1f}"
                     f"  ({pub.get('source', '')})")
    lines.append(f"drop {r['fp_box_ap'] - r['quant_box_ap']:+.1f} AP^box, {r['fp_mask_ap'] - r['quant_mask_ap']:+.1f} AP^mask")
    return "\n".join(lines)


def _ap(ev: dict, kind: str) -> float:
    return float(ev[kind]["AP"])


def run_detection(cfg: DictConfig) -> dict[str, Any]:
    from common.tasks.detection.data import build_detection_data
    from common.tasks.detection.metrics import evaluate_detector
    from common.tasks.detection.zoo import build_detection_model

    with start(cfg, task="detection") as ex:  # dataset=auto (the task default): the model's default_dataset
        device, t0 = ex.device, time.perf_counter()
        check = getattr(ex.method_cls, "check_task_config", None)
        if check is not None:  # a method's detection settings, checked before any loading (one-line UserError)
            check(cfg)
        data = build_detection_data(cfg.dataset, int(cfg.seed))  # before the model: a bad root fails fast
        model = build_detection_model(cfg.model)
        ex.timings["load"] = round(time.perf_counter() - t0, 3)
        ctx = ex.context({"task": "detection", "model": OmegaConf.to_container(cfg.model, resolve=True),
                          "checkpoint": checkpoint_id(cfg.model.get("checkpoint")),
                          "dataset": OmegaConf.to_container(cfg.dataset, resolve=True), "seed": int(cfg.seed)})
        fp_eval, _ = ctx.stage("det_fp_eval", {"eval": data.eval_ids},
                               lambda: evaluate_detector(model.to(device), data, device, "FP eval"))
        filled: list = []

        def fill_heads(method, qmodel) -> None:  # head layers the method's units miss (model.quantize_heads)
            if cfg.model.get("quantize_heads") and cfg.method.name != "fp":
                from common.tasks.detection.quant import calibrate_uncovered

                images, _ = data.calibration(max(1, method.n_calib()))
                filled.extend(calibrate_uncovered(qmodel, images.to(device)))

        method, qmodel = ex.quantize(ctx, model, data, after=fill_heads)
        with ctx.timed("quant_eval"):
            q_eval = evaluate_detector(qmodel, data, device, "quantized eval")
        images = {**method.images(data), "eval": len(data.eval_ids)}
        drawn = max((n for stage, n in images.items() if stage != "eval"), default=0)
        data.info["calib_ids"] = data.calibration_ids(drawn) if drawn > 0 else []
        results: dict[str, Any] = {
            "task": "detection", "model": cfg.model.name, "arch": cfg.model.get("arch"), "method": cfg.method.name,
            "bits": cfg.bits.name, "w_bit": int(cfg.bits.w_bit), "a_bit": int(cfg.bits.a_bit),
            "dataset": cfg.dataset.name, "n_calib": images.get("calibration", 0), "n_eval": images["eval"],
            "images": images,
            "fp_box_ap": _ap(fp_eval, "box"), "fp_mask_ap": _ap(fp_eval, "mask"),
            "quant_box_ap": _ap(q_eval, "box"), "quant_mask_ap": _ap(q_eval, "mask"),
            "fp_box": fp_eval["box"], "fp_mask": fp_eval["mask"], "quant_box": q_eval["box"], "quant_mask": q_eval["mask"],
            "box_ap_drop": _ap(fp_eval, "box") - _ap(q_eval, "box"),
            "quantized_part": "backbone + heads" if cfg.model.get("quantize_heads") else "backbone (Swin body)",
            "heads_filled_in": len(filled),  # head quantizers fitted by the percentile fill-in (not by the method)
            "published": published_detection(cfg.model.name, cfg.method.name, cfg.bits.name),
            "metric": "COCOeval stats[0] x100 (AP@[.5:.95], maxDets 100), bbox and segm", "data": data.info,
        }
        return ex.finish(results, format_detection_table)
