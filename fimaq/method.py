"""FIMA-Q (Wang et al., CVPR 2025, arXiv 2506.11543; ShiheWang/FIMA-Q) and its BRECQ baseline config.

APHQ-ViT's code base without the MLP reconstruction (fimaq spec §0): two cached stages,

1. ``fimaq_calibrate``: APHQ's wrapping and calibration search (`common.calib.calibrate`) with
   token-wise activation scales at every bit-width (the reference's `token_channel_wise = True`).
2. ``fimaq_reconstruct`` (if `recon.enabled`): block reconstruction of every unit
   (`common.recon.block`: AdaRound, learned activation scales, QDrop) with the DPLR-FIM loss
   (`fimaq.loss`), whose weights are k Fisher snapshots taken *during* each unit's training by a step
   hook (`fimaq.fisher.unit_fisher_snapshot`: only the current unit quantized, in its training state;
   computed from the cached FP unit input through the FP tail). Per-unit checkpoints: a killed run
   resumes at the next unit.

The FP teacher is a deepcopy of the original model (the reference's `raw` mode, spec §1.1).
Data: two draws of the seeded calibration order (calibration 128, reconstruction 1024), each with its
own augmentation draw (spec §6).
"""
from __future__ import annotations

import copy
import logging
import time

import torch
from torch import nn

from common.calib.calibrate import load_quant_state
from common.models.units import model_units
from common.recon.block import block_recon_config, reconstruct_model
from common.run.registry import register_method
from common.run.staged import StagedMethod, cpu_state as _cpu_state, plain as _plain
from common.quant.wrap import wrap_model

from .fisher import FisherSnapshots, brecq_fisher_sq, teacher_probs
from .loss import FIMAQ_METRICS, check_metric, normalisation, snapshot_steps

__all__ = ["FIMAQ", "FIMAQBrecq", "STAGES", "FIMAQ_KEYS"]
log = logging.getLogger(__name__)

#: Stage names, in pipeline order.
STAGES = ("fimaq_calibrate", "fimaq_reconstruct")
#: Keys of `method.recon` read here, not by the engine.
FIMAQ_KEYS = ("enabled", "n_images", "augment", "draw", "metric", "k", "p1", "p2", "dis_mode", "exact_rank",
              "lr_rank1_only", "inverse", "temp", "fisher_batch_size", "head_norm", "resume", "evaluate")
#: Keys that cannot change a result (left out of the stage signatures).
_NO_EFFECT = ("log_every", "evaluate", "prune", "memo", "resume", "eval_stats")


def engine_config(recon: dict) -> dict:
    """The `common.recon.block` settings for a FIMA-Q `recon` node (plain dict)."""
    metric = str(recon.get("metric", "fisher_dplr"))
    out = {k: v for k, v in recon.items() if k not in FIMAQ_KEYS}
    out["metric"] = "custom" if metric in FIMAQ_METRICS else ("hessian_brecq" if metric == "fisher_brecq" else metric)
    out["use_mean_hessian"] = False
    norm = normalisation(metric, float(recon.get("p1", 1.0)), float(recon.get("p2", 1.0)))
    norm["head"] = recon.get("head_norm")
    out["loss_norm"] = norm
    return out


@register_method("fimaq")
class FIMAQ(StagedMethod):
    """FIMA-Q (see the module docstring and conf/method/fimaq.yaml)."""

    prefix = "fimaq"
    logger = log
    no_effect = _NO_EFFECT

    # ------------------------------------------------------------------ helpers

    def _keys(self) -> dict[str, dict]:
        bits = _plain(self.bits)
        calib, recon = self._stripped(self.cfg.calib, self.cfg.recon)
        return {"fimaq_calibrate": {"calib": calib, "bits": bits},
                "fimaq_reconstruct": {"recon": recon, "bits": bits}}

    def _check(self) -> None:
        """Config errors before any compute (one line each)."""
        recon = self.cfg.recon
        steps = snapshot_steps(int(recon.iters), int(recon.k), str(recon.dis_mode), bool(recon.exact_rank))
        check_metric(str(recon.metric), len(steps), bool(recon.lr_rank1_only))

    # ------------------------------------------------------------------ main entry

    def quantize(self, model: nn.Module, data) -> nn.Module:
        cfg, ctx = self.cfg, self.ctx
        if bool(cfg.recon.enabled):
            self._check()
        fp_model = copy.deepcopy(model).eval()
        keys = self._keys()
        chain = [n for n, on in zip(STAGES, (True, bool(cfg.recon.enabled))) if on]
        sigs = self._chain(chain, keys)

        def restore(_name: str, res: dict) -> None:
            wrap_model(model, self._scheme())
            model.to(ctx.device)
            load_quant_state(model, res["state_dict"])

        last = self._resume(chain, keys, sigs, restore)
        if last < 0:
            model.to(ctx.device)
        computes = {"fimaq_calibrate": lambda: self._calibrate(model, data),
                    "fimaq_reconstruct": lambda: self._reconstruct(model, fp_model, data, sigs["fimaq_reconstruct"])}
        self._run_rest(chain[last + 1:], keys, computes, lambda _name, res: load_quant_state(model, res["state_dict"]))
        model.eval()
        return model

    # ------------------------------------------------------------------ stage 1: calibration

    # `_calibrate`: APHQ's wrapping and calibration search, common.run.staged.StagedMethod._calibrate

    # ------------------------------------------------------------------ stage 2: reconstruction

    def _reconstruct(self, model: nn.Module, fp_model: nn.Module, data, sig: str) -> dict:
        cfg, device, tracker = self.cfg.recon, self.ctx.device, self.ctx.tracker
        recon = _plain(cfg)
        rcfg = block_recon_config(engine_config(recon))
        metric = str(cfg.metric)
        temp, fbs = float(cfg.temp), int(cfg.fisher_batch_size)
        t0 = time.perf_counter()
        images = self._images(data, "recon")
        model.to(device)
        fp_model.to(device)
        units = [u.name for u in model_units(model)]
        fp_units = model_units(fp_model)
        start, done = 0, {}
        partials = self._partial_paths("fimaq_reconstruct", sig)
        if bool(cfg.get("resume", True)):
            start, done = self._load_partial(model, "fimaq_reconstruct", partials)
        steps = snapshot_steps(rcfg.iters, int(cfg.k), str(cfg.dis_mode), bool(cfg.exact_rank))
        tracker.log({"event": "fimaq_schedule", "metric": metric, "k": int(cfg.k), "realised_rank": len(steps),
                     "snapshot_steps": list(steps), "dis_mode": str(cfg.dis_mode)})
        t_p = time.perf_counter()
        needs_teacher = metric in FIMAQ_METRICS or metric == "fisher_brecq"
        probs = teacher_probs(fp_model, images, temp, fbs, device) if needs_teacher else None
        teacher_seconds = time.perf_counter() - t_p
        snaps = (FisherSnapshots(fp_model, probs, metric, steps, temp, fbs, bool(cfg.lr_rank1_only), str(cfg.inverse),
                                 tracker) if metric in FIMAQ_METRICS else None)
        index_of = {u.name: i for i, u in enumerate(fp_units)}

        def brecq_weights(name: str, q_in: torch.Tensor, _fp_in: torch.Tensor) -> torch.Tensor | None:
            if fp_units[index_of[name]].kind == "head":
                return None
            return brecq_fisher_sq(fp_units, index_of[name], q_in, probs, temp, fbs, fp_model=fp_model)

        weights = brecq_weights if metric == "fisher_brecq" else None

        stats_acc = dict(done)

        def on_unit_done(name: str) -> None:
            index = units.index(name)
            if snaps is not None and name in snaps.ranks:
                tracker.log({"event": "fimaq_unit_rank", "unit": name, "realised_rank": snaps.ranks[name]})
                snaps.release(name)
            self._save_partial(partials, {"state_dict": _cpu_state(model), "next_unit": index + 1,
                                          "units": stats_acc})

        gen = torch.Generator().manual_seed(int(self.ctx.cfg.seed))
        res = reconstruct_model(model, fp_model, images, rcfg, weights=weights, tracker=tracker, device=device,
                                generator=gen, on_unit_done=on_unit_done, start_unit=start,
                                step_hook=snaps.step_hook if snaps else None,
                                unit_loss=snaps.unit_loss if snaps else None)
        stats_acc.update(res["units"])
        for p in partials:
            p.unlink(missing_ok=True)
        summary = {"recon_seconds": round(time.perf_counter() - t0, 3), "recon_images": images.shape[0],
                   "recon_teacher_seconds": round(teacher_seconds, 3),
                   "recon_snapshot_seconds": round(snaps.seconds if snaps else 0.0, 3), "recon_resumed_at": start,
                   "recon_realised_rank": len(steps) if metric in FIMAQ_METRICS else 0,
                   "recon_sec_per_iter": self._sec_per_iter(res["units"])}
        return {"state_dict": _cpu_state(model), "units": stats_acc, "summary": summary}


@register_method("fimaq_brecq")
class FIMAQBrecq(FIMAQ):
    """FIMA-Q's BRECQ baseline (configs/3bit/brecq.py): per-tensor activations, MSE on FP block inputs."""
