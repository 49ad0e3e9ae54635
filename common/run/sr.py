"""The `task=sr` experiment: SwinIR, calibration patches, PSNR/SSIM on a test set (FP, quantized, bicubic).

`run_sr(cfg)` is what `common.run.pipeline.run` calls for `task.name == sr`. It uses the same method
registry, stage cache, tracker and run dir as classification; a method must declare `"sr"` in its
`tasks` to be run here (the others refuse with a one-line error). Stage signatures key on the model,
its checkpoint, the calibration part of the dataset config (`calib_root`, `n_calib`, `patch_size`) and
the seed — not on the test set — so the four test sets of a sweep reuse one quantization.
"""
from __future__ import annotations

import time
from typing import Any

from omegaconf import DictConfig, OmegaConf

from common.run.experiment import checkpoint_id, start

__all__ = ["run_sr", "format_sr_table", "CALIB_KEYS"]

#: dataset keys that change the calibration patches (and so the quantized model)
CALIB_KEYS = ("calib_root", "n_calib", "patch_size")


def format_sr_table(r: dict[str, Any]) -> str:
    lines = [f"{r['model']} x{r['scale']} | {r['method']} | {r['bits']} | {r['dataset']} "
             f"(calib {r['n_calib']} patches, eval {r['n_eval']} images)",
             f"{'':10s} {'PSNR-Y':>7s} {'SSIM-Y':>7s}"]
    for label, key in (("FP", "fp"), ("quantized", "quant"), ("bicubic", "bicubic")):
        lines.append(f"{label:10s} {r[f'{key}_psnr']:7.2f} {r[f'{key}_ssim']:7.4f}")
    lines.append(f"drop {r['fp_psnr'] - r['quant_psnr']:+.2f} dB vs FP, {r['quant_psnr'] - r['bicubic_psnr']:+.2f} dB "
                 "vs bicubic")
    return "\n".join(lines)


def run_sr(cfg: DictConfig) -> dict[str, Any]:
    from common.tasks.sr.data import build_sr_data
    from common.tasks.sr.evaluate import evaluate_bicubic, evaluate_sr, summarize
    from common.tasks.sr.model import build_sr_model

    with start(cfg, task="sr", resolve=False) as ex:
        device, t0 = ex.device, time.perf_counter()
        model = build_sr_model(cfg.model)
        data = build_sr_data(cfg.dataset, model.scale, int(cfg.seed))
        ex.timings["load"] = round(time.perf_counter() - t0, 3)
        dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
        ctx = ex.context({"task": "sr", "model": OmegaConf.to_container(cfg.model, resolve=True),
                          "checkpoint": checkpoint_id(cfg.model.get("checkpoint")),
                          "calibration": {k: dataset.get(k) for k in CALIB_KEYS}, "seed": int(cfg.seed)})
        eval_key = {"eval": data.info["eval_ids"], "dataset": {k: v for k, v in dataset.items() if k not in CALIB_KEYS}}
        window = model.window
        fp_eval, _ = ctx.stage("sr_fp_eval", eval_key, lambda: {
            "fp": evaluate_sr(model.to(device), data.images, model.scale, window, device, "FP eval"),
            "bicubic": evaluate_bicubic(data.images, model.scale)})
        method, qmodel = ex.quantize(ctx, model, data)
        with ctx.timed("quant_eval"):
            q_scores = evaluate_sr(qmodel, data.images, model.scale, window, device, "quantized eval")
        fp, bic, q = summarize(fp_eval["fp"]), summarize(fp_eval["bicubic"]), summarize(q_scores)
        per_image = [{"name": f["name"], **{f"fp_{k}": v for k, v in f.items() if k != "name"},
                      **{f"quant_{k}": v for k, v in qi.items() if k != "name"},
                      **{f"bicubic_{k}": v for k, v in b.items() if k != "name"}}
                     for f, qi, b in zip(fp_eval["fp"], q_scores, fp_eval["bicubic"])]
        results: dict[str, Any] = {
            "task": "sr", "model": cfg.model.name, "method": cfg.method.name, "bits": cfg.bits.name,
            "w_bit": int(cfg.bits.w_bit), "a_bit": int(cfg.bits.a_bit), "dataset": cfg.dataset.name,
            "scale": model.scale, "n_calib": method.n_calib(), "n_eval": len(data.images),
            "fp_psnr": fp["psnr_y"], "fp_ssim": fp["ssim_y"], "quant_psnr": q["psnr_y"], "quant_ssim": q["ssim_y"],
            "bicubic_psnr": bic["psnr_y"], "bicubic_ssim": bic["ssim_y"],
            "fp_psnr_rgb": fp["psnr_rgb"], "quant_psnr_rgb": q["psnr_rgb"], "bicubic_psnr_rgb": bic["psnr_rgb"],
            "psnr_drop": fp["psnr_y"] - q["psnr_y"], "per_image": per_image,
            "metric": "Y channel (BT.601), border = scale, 8-bit output, float64", "data": data.info,
        }
        return ex.finish(results, format_sr_table)
