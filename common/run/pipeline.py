"""The experiment: build model and data, evaluate FP, quantize with the chosen method, evaluate, report.

`run(cfg)` is the testable work function behind `run.py` (a thin `@hydra.main`); it writes
`results.json` and `metrics.jsonl` to the run dir and returns the results dict. The set-up and write-out
every task shares are in `common.run.experiment`; `task=sr` / `task=detection` have their own runners.
"""
from __future__ import annotations

import time
from typing import Any

from omegaconf import DictConfig, OmegaConf

from common.run.evaluate import compare_to_fp, predict
from common.run.experiment import checkpoint_id, run_dir_of, start

__all__ = ["run", "run_dir_of", "format_table"]


def format_table(r: dict[str, Any]) -> str:
    """Short FP-vs-quantized table for the console."""
    lines = [
        f"{r['model']} | {r['method']} | {r['bits']} | {r['dataset']} ({_images_line(r)})",
        f"{'':10s} {'top-1':>7s} {'top-5':>7s}",
        f"{'FP':10s} {r['fp_top1']:7.2f} {r['fp_top5']:7.2f}",
        f"{'quantized':10s} {r['quant_top1']:7.2f} {r['quant_top5']:7.2f}",
        f"top-1 agreement {r['top1_agreement']:.2f}%  KL(fp||q) {r['kl_to_fp']:.4f}  "
        f"drop {r['fp_top1'] - r['quant_top1']:+.2f} pts",
    ]
    return "\n".join(lines)


def _images_line(r: dict[str, Any]) -> str:
    """`calib 32, eval 400` / `mr 1024, calib 128, reconstruction 1024, eval 50000` from `images`."""
    images = r.get("images") or {"calibration": r["n_calib"], "eval": r["n_eval"]}
    return ", ".join(f"{'calib' if k == 'calibration' else k} {v}" for k, v in images.items())


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one PTQ experiment described by the composed config (`task=sr`: `common.run.sr.run_sr`)."""
    task = (cfg.get("task") or {}).get("name", "classification")
    if task == "sr":
        from common.run.sr import run_sr

        return run_sr(cfg)
    if task == "detection":
        from common.run.detection import run_detection

        return run_detection(cfg)
    from common.data import build_data
    from common.models.zoo import build_model, weights_source

    with start(cfg) as ex:
        device, t0 = ex.device, time.perf_counter()
        model = build_model(cfg.model)
        data = build_data(cfg.dataset, model, int(cfg.seed))
        ex.timings["load"] = round(time.perf_counter() - t0, 3)
        ctx = ex.context({"model": OmegaConf.to_container(cfg.model, resolve=True),
                          "checkpoint": checkpoint_id(cfg.model.get("checkpoint")),
                          "dataset": OmegaConf.to_container(cfg.dataset, resolve=True), "seed": int(cfg.seed)})

        loader = data.eval_loader()
        fp_eval, _ = ctx.stage("fp_eval", {}, lambda: dict(zip(("logits", "labels"),
                                                                  predict(model.to(device), loader, device, "FP eval"))))
        method, qmodel = ex.quantize(ctx, model, data)
        with ctx.timed("quant_eval"):
            q_logits, labels = predict(qmodel, loader, device, "quantized eval")
        metrics = compare_to_fp(fp_eval["logits"], q_logits, labels)
        # images per stage, each a prefix of the one calibration order; calib_ids = the longest prefix drawn
        images = {**method.images(data), "eval": int(labels.numel())}
        drawn = max((n for stage, n in images.items() if stage != "eval"), default=0)
        data.info["calib_ids"] = data.calibration_ids(drawn) if drawn > 0 else []
        results: dict[str, Any] = {
            "model": cfg.model.name, "method": cfg.method.name, "bits": cfg.bits.name,
            "w_bit": int(cfg.bits.w_bit), "a_bit": int(cfg.bits.a_bit), "dataset": cfg.dataset.name,
            "n_calib": images.get("calibration", 0), "n_eval": images["eval"], "images": images, **metrics,
            "weights": weights_source(cfg.model), "data": data.info,
        }
        return ex.finish(results, format_table)
