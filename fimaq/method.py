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
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from common.calib.calibrate import LN_SITES, CalibConfig, calibrate_model, load_quant_state, reparam_active
from common.models.units import model_units
from common.recon.block import block_recon_config, reconstruct_model
from common.run.evaluate import predict, topk_accuracy
from common.run.registry import PTQMethod, register_method, scheme_from_bits
from common.run.stages import signature
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


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else copy.deepcopy(node)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class _Missing(RuntimeError):
    pass


def _missing() -> dict:
    raise _Missing()


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
class FIMAQ(PTQMethod):
    """FIMA-Q (see the module docstring and conf/method/fimaq.yaml)."""

    def n_calib(self) -> int:
        return int(self.cfg.calib.n_images)

    # ------------------------------------------------------------------ helpers

    def _images(self, data, section: str) -> torch.Tensor:
        node = self.cfg[section]
        want = int(node.n_images)
        have = int(getattr(data, "n_calib_available", want))
        if want > have:
            log.warning("fimaq: %s.n_images=%d but the dataset's calibration source has %d images; using %d",
                        section, want, have, have)
            self.ctx.tracker.log({"event": "fimaq_n_images_capped", "section": section, "requested": want,
                                  "used": have})
            want = have
        images, _ = data.calibration(want, augment=bool(node.get("augment", True)), draw=int(node.get("draw", 0)))
        return images

    def _scheme(self):
        calib = CalibConfig.from_node(_plain(self.cfg.calib))
        bits = self.bits
        reparam = reparam_active(calib, int(bits.w_bit), int(bits.a_bit))
        return scheme_from_bits(bits, matmul_granularity="head", act_granularity="tensor",
                                ln_act_granularity="channel" if reparam else "tensor", ln_sites=LN_SITES,
                                round_zero_point=True, symmetric_weights=False, softmax_quantizer="uniform")

    def _keys(self) -> dict[str, dict]:
        bits = _plain(self.bits)
        calib, recon = _plain(self.cfg.calib), _plain(self.cfg.recon)
        for node in (calib, recon):
            for k in _NO_EFFECT:
                node.pop(k, None)
        return {"fimaq_calibrate": {"calib": calib, "bits": bits},
                "fimaq_reconstruct": {"recon": recon, "bits": bits}}

    def _sig(self, name: str, key: dict) -> str:
        stages = self.ctx.stages
        if name in stages.explicit:
            path = Path(stages.explicit[name]).expanduser()
            if path.is_file():
                res = torch.load(path, map_location="cpu", weights_only=False)
                if "_sig" in res:
                    return res["_sig"]
        return signature({"stage": name, "key": {"base": self.ctx.base_key, "key": key}})

    def _available(self, name: str, sig: str) -> bool:
        stages = self.ctx.stages
        if name in stages.explicit:
            return True
        if not stages.reuse:
            return False
        return any(folder is not None and (Path(folder) / f"{name}-{sig}.pt").is_file()
                   for folder in (stages.dir, stages.shared))

    def _evaluate(self, model: nn.Module, data, desc: str) -> dict[str, float]:
        if not hasattr(data, "eval_loader"):
            return {}
        logits, labels = predict(model, data.eval_loader(), self.ctx.device, desc)
        return {"top1": topk_accuracy(logits, labels, 1), "top5": topk_accuracy(logits, labels, 5)}

    def _report(self, name: str, res: dict) -> None:
        summary = {k: v for k, v in (res.get("summary") or {}).items() if isinstance(v, (int, float))}
        if summary:
            self.ctx.tracker.log({"event": f"{name}_summary", **summary})

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
        sigs, upstream = {}, None
        for name in chain:
            keys[name] = dict(keys[name], upstream=upstream)
            sigs[name] = upstream = self._sig(name, keys[name])
        last = max((i for i, n in enumerate(chain) if self._available(n, sigs[n])), default=-1)
        while last >= 0:  # resume from the latest available stage; earlier stages are not touched
            name = chain[last]
            try:
                res, _ = ctx.stage(name, keys[name], _missing)
            except _Missing:
                last -= 1
                continue
            wrap_model(model, self._scheme())
            model.to(ctx.device)
            load_quant_state(model, res["state_dict"])
            self._report(name, res)
            break
        if last < 0:
            model.to(ctx.device)
        for name in chain[last + 1:]:
            if name == "fimaq_calibrate":
                res, _ = ctx.stage(name, keys[name], lambda: self._calibrate(model, data))
            else:
                res, _ = ctx.stage(name, keys[name],
                                   lambda: self._reconstruct(model, fp_model, data, sigs["fimaq_reconstruct"]))
            load_quant_state(model, res["state_dict"])
            self._report(name, res)
        model.eval()
        return model

    # ------------------------------------------------------------------ stage 1: calibration

    def _calibrate(self, model: nn.Module, data) -> dict:
        ccfg = CalibConfig.from_node(_plain(self.cfg.calib))
        t0 = time.perf_counter()
        images = self._images(data, "calib")
        wrap_model(model, self._scheme())
        model.to(self.ctx.device)
        rec = calibrate_model(model, images, ccfg, int(self.bits.w_bit), int(self.bits.a_bit), self.ctx.device)
        summary: dict[str, Any] = {"calib_seconds": round(time.perf_counter() - t0, 3),
                                   "calib_images": images.shape[0], "calib_reparam": rec["reparam"]}
        if bool(self.cfg.calib.get("evaluate", True)):
            summary.update({f"calib_{k}": v for k, v in self._evaluate(model, data, "calibrated eval").items()})
        return {"state_dict": _cpu_state(model), "records": rec, "summary": summary}

    # ------------------------------------------------------------------ stage 2: reconstruction

    def _partials(self, sig: str) -> list[Path]:
        stages = self.ctx.stages
        return [Path(folder) / f"fimaq_reconstruct-{sig}.partial.pt" for folder in (stages.dir, stages.shared)
                if folder is not None]

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
        partials = self._partials(sig)
        if bool(cfg.get("resume", True)):
            for p in partials:
                if p.is_file():
                    part = torch.load(p, map_location="cpu", weights_only=False)
                    load_quant_state(model, part["state_dict"])
                    start, done = int(part["next_unit"]), dict(part.get("units", {}))
                    tracker.log({"event": "fimaq_reconstruct_resumed", "next_unit": start, "path": str(p)})
                    break
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
            part = {"state_dict": _cpu_state(model), "next_unit": index + 1, "units": stats_acc}
            for p in partials:
                p.parent.mkdir(parents=True, exist_ok=True)
                tmp = p.with_suffix(".tmp")
                torch.save(part, tmp)
                os.replace(tmp, p)

        gen = torch.Generator().manual_seed(int(self.ctx.cfg.seed))
        res = reconstruct_model(model, fp_model, images, rcfg, weights=weights, tracker=tracker, device=device,
                                generator=gen, on_unit_done=on_unit_done, start_unit=start,
                                step_hook=snaps.step_hook if snaps else None,
                                unit_loss=snaps.unit_loss if snaps else None)
        stats_acc.update(res["units"])
        for p in partials:
            p.unlink(missing_ok=True)
        per_iter = [u["sec_per_iter"] for u in res["units"].values() if u.get("iters")]
        summary = {"recon_seconds": round(time.perf_counter() - t0, 3), "recon_images": images.shape[0],
                   "recon_teacher_seconds": round(teacher_seconds, 3),
                   "recon_snapshot_seconds": round(snaps.seconds if snaps else 0.0, 3), "recon_resumed_at": start,
                   "recon_realised_rank": len(steps) if metric in FIMAQ_METRICS else 0,
                   "recon_sec_per_iter": (sum(per_iter) / len(per_iter)) if per_iter else 0.0}
        return {"state_dict": _cpu_state(model), "units": stats_acc, "summary": summary}


@register_method("fimaq_brecq")
class FIMAQBrecq(FIMAQ):
    """FIMA-Q's BRECQ baseline (configs/3bit/brecq.py): per-tensor activations, MSE on FP block inputs."""
