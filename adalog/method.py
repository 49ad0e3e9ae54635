"""AdaLog (Wu et al., ECCV 2024; GoatWu/AdaLog at 75a57d2): `method=adalog` and `method=adalog_retrain`.

Two cached stages (the reference's two checkpoints, adalog spec §1.2):

1. ``adalog_calibrate``: wrapping (uniform asymmetric quantizers with per-head matmuls and FP image
   input, AdaLog on the post-softmax probabilities and the post-GELU fc2 input) and the FPCS
   calibration of every quantizer on `calib.n_images` (32) images (`adalog.calibrate`).
2. ``adalog_reconstruct`` (`recon.enabled`, the "Retrain" columns): BRECQ-style block reconstruction
   with the shared engine (`common.recon.block`): FP block inputs, output MSE / 10 without first-step
   normalisation, KL on the head, AdaRound weights and learned activation scales of every quantizer
   family (AdaLog's included, through `Quantizer.scale_parameters`), no QDrop.

After the last stage the post-GELU shift is folded into fc2's bias with the final fake-quantized
weights (`fold_gelu_shift`, the reference's `finish_training`). Saved stage results are unfolded, so a
retrain from a saved calibration never sees a stale fold (a reference oddity, spec §8).

Data: `calib` and `recon` are two augmentation draws (timm's training transform) of the seeded
calibration order, so the 32 calibration images are the first of the 1024. The reference's seed is
5: `experiment=adalog_w4a4` etc. set it (plain `method=adalog` uses the run's `seed`).
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
from torch import nn

from common.calib.calibrate import load_quant_state
from common.models.units import model_units
from common.quant.adalog import fold_gelu_shift
from common.quant.wrap import wrap_model
from common.recon.block import block_recon_config, reconstruct_model
from common.run.registry import register_method, scheme_from_bits
from common.run.staged import StagedMethod, cpu_state as _cpu_state, plain as _plain

from .calibrate import LN_SITES, calib_config, calibrate_model, reparam_active

__all__ = ["AdaLog", "AdaLogRetrain", "STAGES"]
log = logging.getLogger(__name__)

STAGES = ("adalog_calibrate", "adalog_reconstruct")
#: Keys of `method.recon` read here, not by the engine.
_OWN_RECON_KEYS = ("enabled", "n_images", "augment", "draw", "evaluate")
#: Keys that cannot change a stage's result (left out of its signature).
_NO_EFFECT = ("log_every", "evaluate", "batch_size_capture")


@register_method("adalog")
class AdaLog(StagedMethod):
    """AdaLog "Calibrate" (FPCS only); `adalog_retrain` adds the block reconstruction."""

    prefix = "adalog"
    calib_source = "the calibration source"
    no_effect = _NO_EFFECT
    logger = log

    def _scheme(self):
        place = self.cfg.placement
        reparam = reparam_active(calib_config(_plain(self.cfg.calib)), int(self.bits.w_bit), int(self.bits.a_bit))
        s_bit = place.get("s_bit")
        return scheme_from_bits(self.bits, matmul_granularity="head", act_granularity="tensor",
                                ln_act_granularity="channel" if reparam else "tensor", ln_sites=LN_SITES,
                                round_zero_point=True, symmetric_weights=False,
                                softmax_quantizer=str(place.softmax_quantizer),
                                post_gelu_quantizer=str(place.post_gelu_quantizer),
                                softmax_a_bit=None if s_bit is None else int(s_bit))

    def _keys(self) -> dict[str, dict]:
        bits, place = _plain(self.bits), _plain(self.cfg.placement)
        calib, recon = self._stripped(self.cfg.calib, self.cfg.recon)
        return {"adalog_calibrate": {"calib": calib, "placement": place, "bits": bits},
                "adalog_reconstruct": {"recon": recon, "bits": bits}}

    # ------------------------------------------------------------------ main entry

    def quantize(self, model: nn.Module, data) -> nn.Module:
        cfg, ctx = self.cfg, self.ctx
        rec_on = bool(cfg.recon.enabled)
        fp_model = copy.deepcopy(model).eval() if rec_on else None  # the FP teacher (before wrapping)
        keys = self._keys()
        wrap_model(model, self._scheme())
        model.to(ctx.device)
        res, sig = ctx.stage("adalog_calibrate", keys["adalog_calibrate"], lambda: self._calibrate(model, data))
        load_quant_state(model, res["state_dict"])
        self._report("adalog_calibrate", res)
        if rec_on and bool(cfg.calib.get("evaluate", True)) and "calib_top1" not in (res.get("summary") or {}):
            # the "Calibrate" column of a retrain run whose calibration stage was saved by `method=adalog`
            acc = self._evaluate(model, data, "calibrated eval")
            ctx.tracker.log({"event": "adalog_calibrate_eval", **{f"calib_{k}": v for k, v in acc.items()}})
        if rec_on:
            key = dict(keys["adalog_reconstruct"], upstream=sig)
            res, _ = ctx.stage("adalog_reconstruct", key, lambda: self._reconstruct(model, fp_model, data))
            load_quant_state(model, res["state_dict"])
            self._report("adalog_reconstruct", res)
        if bool(cfg.get("fold_gelu_shift", True)):
            folded = fold_gelu_shift(model)
            ctx.tracker.log({"event": "adalog_bias_fold", "layers": folded})
        model.eval()
        return model

    # ------------------------------------------------------------------ stages

    def _calibrate(self, model: nn.Module, data) -> dict:
        ccfg = calib_config(_plain(self.cfg.calib))
        t0 = time.perf_counter()
        images = self._images(data, "calib")
        rec = calibrate_model(model, images, ccfg, int(self.bits.w_bit), int(self.bits.a_bit), self.ctx.device)
        summary: dict[str, Any] = {"calib_seconds": round(time.perf_counter() - t0, 3),
                                   "calib_images": images.shape[0], "calib_reparam": rec["reparam"]}
        if bool(self.cfg.calib.get("evaluate", True)) and bool(self.cfg.recon.enabled):
            acc = self._evaluate(model, data, "calibrated eval")  # the "Calibrate" column (fold: same function)
            summary.update({f"calib_{k}": v for k, v in acc.items()})
        return {"state_dict": _cpu_state(model), "records": rec, "summary": summary}

    def _reconstruct(self, model: nn.Module, fp_model: nn.Module, data) -> dict:
        node = _plain(self.cfg.recon)
        for k in _OWN_RECON_KEYS:
            node.pop(k, None)
        rcfg = block_recon_config(node)
        t0 = time.perf_counter()
        images = self._images(data, "recon")
        device = self.ctx.device
        model.to(device)
        fp_model.to(device)
        gen = torch.Generator().manual_seed(int(self.ctx.cfg.seed))
        res = reconstruct_model(model, fp_model, images, rcfg, weights=None, tracker=self.ctx.tracker,
                                device=device, generator=gen)
        summary = {"recon_seconds": round(time.perf_counter() - t0, 3), "recon_images": images.shape[0],
                   "recon_units": len(model_units(model)),
                   "recon_sec_per_iter": self._sec_per_iter(res["units"])}
        return {"state_dict": _cpu_state(model), "units": res["units"], "summary": summary}


@register_method("adalog_retrain")
class AdaLogRetrain(AdaLog):
    """AdaLog with the "Retrain" block reconstruction (conf/method/adalog_retrain.yaml)."""
