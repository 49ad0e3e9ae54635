"""APHQ-ViT on COCO detectors (`task=detection`; detection spec §3.2): the reference's detection driver.

Three cached stages, as the classification path (`aphq.method`), on the detector's per-image data:

1. ``aphq_det_mlp_recon`` (`mlp_recon.enabled`): GELU → ReLU in every Swin block MLP and MLP reconstruction with
   RPN-loss perturbation weights per image (`aphq.det_mlp`); the ReLU FP detector is evaluated (the paper's
   "MLP Recon." column) unless `mlp_recon.evaluate=false`;
2. ``aphq_det_calibrate``: APHQ's wrapping (`StagedMethod._scheme`: uniform asymmetric, per-head matmuls, FP
   image input, channel-wise LN outputs for the reparameterisation) and the detection calibration
   (`aphq.det_calib`, 1 image by default);
3. ``aphq_det_reconstruct`` (`recon.enabled`): block reconstruction over patch_embed, the Swin blocks, the
   PatchMergings and (when quantized) the FPN (`aphq.det_recon`), with a checkpoint after every unit.

The teacher is the FP GELU detector (a deepcopy taken before any change). Images: the first n of the data's
calibration order (`data.calibration_items`), each at its own size.
"""
from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from common.quant.wrap import wrap_model
from common.run.staged import cpu_state, plain
from common.tasks.detection.metrics import evaluate_detector

from .det_calib import calibrate_detector, det_calib_config
from .det_mlp import det_mlp_config, reconstruct_mlps_detection
from .det_recon import det_recon_config, reconstruct_detector
from .mlp_recon import relu_swap

if TYPE_CHECKING:
    from .method import APHQ

__all__ = ["quantize_detection", "stage_configs", "DET_STAGES"]

DET_STAGES = ("aphq_det_mlp_recon", "aphq_det_calibrate", "aphq_det_reconstruct")


def _images(method: "APHQ", data, section: str) -> list[torch.Tensor]:
    return [x for x, _ in data.calibration_items(method._n(data, section))]


def _ap(method: "APHQ", model: nn.Module, data, desc: str, prefix: str) -> dict[str, float]:
    ev = evaluate_detector(model, data, method.ctx.device, desc)
    return {f"{prefix}_box_ap": float(ev["box"]["AP"]), f"{prefix}_mask_ap": float(ev["mask"]["AP"])}


def stage_configs(cfg) -> tuple:
    """(DetMLPConfig, DetCalibConfig, DetReconConfig) of a `method` config node (UserError on a bad value)."""
    thresh = float(cfg.get("rpn_pos_thresh", 0.7))
    return (det_mlp_config(plain(cfg.mlp_recon), pos_thresh=thresh), det_calib_config(plain(cfg.calib)),
            det_recon_config(plain(cfg.recon), pos_thresh=thresh))


def quantize_detection(method: "APHQ", model: nn.Module, data) -> nn.Module:
    """APHQ's detection pipeline on `model` (in place); stages cached and resumed as in classification."""
    cfg, ctx = method.cfg, method.ctx
    device = ctx.device
    mr_cfg, cal_cfg, rec_cfg = stage_configs(cfg)
    fp_model = copy.deepcopy(model).eval()
    bits = plain(method.bits)
    mr, calib, recon = method._stripped(cfg.mlp_recon, cfg.calib, cfg.recon)
    thresh = float(cfg.get("rpn_pos_thresh", 0.7))
    keys = {"aphq_det_mlp_recon": {"mlp_recon": mr, "rpn_pos_thresh": thresh},
            "aphq_det_calibrate": {"calib": calib, "bits": bits},
            "aphq_det_reconstruct": {"recon": recon, "bits": bits, "rpn_pos_thresh": thresh}}
    mr_on, rec_on = bool(cfg.mlp_recon.enabled), bool(cfg.recon.enabled)
    chain = [n for n, on in zip(DET_STAGES, (mr_on, True, rec_on)) if on]
    sigs = method._chain(chain, keys)

    restore, load = method._stage_loaders(model, mr_on, "aphq_det_mlp_recon")
    def mlp_stage() -> dict:
        t0 = time.perf_counter()
        images = _images(method, data, "mlp_recon")
        relu_swap(model)
        model.to(device)
        stats = reconstruct_mlps_detection(model, fp_model, images, mr_cfg, device, ctx.tracker)
        summary: dict[str, Any] = {"mr_seconds": round(time.perf_counter() - t0, 3), "mr_images": len(images)}
        if bool(cfg.mlp_recon.get("evaluate", True)):
            summary.update(_ap(method, model, data, "MR'd FP eval", "mr_fp"))
        return {"state_dict": cpu_state(model), "stats": stats, "summary": summary}

    def calib_stage() -> dict:
        t0 = time.perf_counter()
        images = _images(method, data, "calib")
        if mr_on:
            relu_swap(model)  # idempotent: the MR stage already swapped, a loaded MR state needs the swap
        wrap_model(model, method._scheme())
        model.to(device)
        rec = calibrate_detector(model, images, cal_cfg, int(bits["w_bit"]), int(bits["a_bit"]), device)
        summary: dict[str, Any] = {"calib_seconds": round(time.perf_counter() - t0, 3), "calib_images": len(images),
                                   "calib_reparam": rec["reparam"], "calib_uncalled": len(rec["uncalled"])}
        if bool(cfg.calib.get("evaluate", True)):
            summary.update(_ap(method, model, data, "calibrated eval", "calib"))
        return {"state_dict": cpu_state(model), "records": rec, "summary": summary}

    def recon_stage() -> dict:
        t0 = time.perf_counter()
        images = _images(method, data, "recon")
        model.to(device)
        fp_model.to(device)
        partials = method._partial_paths("aphq_det_reconstruct", sigs["aphq_det_reconstruct"])
        start, done = (method._load_partial(model, "aphq_det_reconstruct", partials)
                       if bool(cfg.recon.get("resume", True)) else (0, {}))

        def on_unit_done(_name: str, stats: dict) -> None:
            method._save_partial(partials, {"state_dict": cpu_state(model), "next_unit": len(done) + len(stats),
                                            "units": {**done, **stats}})

        res = reconstruct_detector(model, fp_model, images, rec_cfg, device, int(ctx.cfg.seed), ctx.tracker,
                                   start_unit=start, on_unit_done=on_unit_done)
        for p in partials:
            p.unlink(missing_ok=True)
        summary = {"recon_seconds": round(time.perf_counter() - t0, 3), "recon_images": len(images),
                   "recon_resumed_at": start, "recon_half_up_layers": res["half_up_layers"],
                   "recon_sec_per_iter": method._sec_per_iter(res["units"])}
        return {"state_dict": cpu_state(model), "units": {**done, **res["units"]}, "summary": summary}

    last = method._resume(chain, keys, sigs, restore)
    if last < 0:
        model.to(device)
    computes = {"aphq_det_mlp_recon": mlp_stage, "aphq_det_calibrate": calib_stage,
                "aphq_det_reconstruct": recon_stage}
    method._run_rest(chain[last + 1:], keys, computes, load)
    model.eval()
    return model
