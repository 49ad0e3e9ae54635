"""APHQ-ViT (Wu et al., CVPR 2025, arXiv 2504.02508; GoatWu/APHQ-ViT) and its BRECQ / QDrop baselines.

One class, three cached stages (the reference's three checkpoints, aphq spec §1.2):

1. ``aphq_mlp_recon`` (if `mlp_recon.enabled`): GELU → ReLU in every block MLP and MLP
   reconstruction against the FP GELU model with the APH-weighted, `pct`-clamped loss
   (`aphq.mlp_recon`); the ReLU model's FP accuracy is recorded (the paper's "MLP Recon." column).
2. ``aphq_calibrate``: wrapping (uniform asymmetric quantizers everywhere, per-head matmuls, FP image
   input) and APHQ's calibration search with LayerNorm reparameterization (`common.calib.calibrate`).
3. ``aphq_reconstruct`` (if `recon.enabled`): block reconstruction of every unit with AdaRound,
   learned activation scales, QDrop and the Average Perturbation Hessian loss
   (`common.recon.block`, `aphq.aph`); a checkpoint is written after every unit so a killed run
   resumes mid-way.

Each stage is keyed on exactly the config it depends on plus the upstream stage's signature, so a
run whose stages match saved results loads them (`stages/events.jsonl` says "loaded"), and
`stages.load.<stage>=PATH` points a run at a file explicitly (the reference's
`--load-{reconstruct,calibrate,optimize}-checkpoint`). When a later stage is available, the earlier
ones are not even loaded.

The teacher of stages 1 and 3 is the original FP GELU model (a deepcopy taken before any change).
Data: three draws of the calibration order (MR, calibration, reconstruction), each with timm's
training transform and its own augmentation draw (spec §6); the 128-image calibration set is the
prefix of the 1024-image sets.

Baselines are configs of the same class (conf/method/): `brecq` (FP block inputs, MSE), `brecq_qinp`
(quantized inputs), `qdrop` (QDrop, MSE), `aphq_no_avg` (per-sample PH), `aphq_brecq_hessian`
(BRECQ's Fisher), `aphq_no_mr` (APH without MR).
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Any, Callable

import torch
from torch import nn

from common.recon.block import block_recon_config, reconstruct_model
from common.run.registry import register_method
from common.run.staged import StagedMethod, cpu_state as _cpu_state, plain as _plain
from common.quant.wrap import wrap_model
from common.models.units import model_units
from common.calib.calibrate import load_quant_state

from .aph import average_perturbation_hessian, brecq_fisher_weights, fp_logits
from .mlp_recon import mlp_recon_config, reconstruct_mlps, relu_swap

__all__ = ["APHQ", "QDrop", "BRECQ", "BRECQQuantInput", "APHQNoAverage", "APHQBrecqHessian", "APHQNoMR", "STAGES"]
log = logging.getLogger(__name__)

#: Stage names, in pipeline order.
STAGES = ("aphq_mlp_recon", "aphq_calibrate", "aphq_reconstruct")


def _engine_cfg(node: Any, drop: tuple[str, ...] = ("evaluate", "resume")) -> dict:
    """A stage config node as a plain dict without this module's own keys (the engines warn on them)."""
    d = _plain(node)
    for k in drop:
        d.pop(k, None)
    return d


@register_method("aphq")
class APHQ(StagedMethod):
    """APHQ-ViT and the BRECQ / QDrop family (see module docstring and conf/method/aphq.yaml)."""

    prefix = "aphq"
    logger = log
    #: APHQ has a detection path (`aphq.detection`, conf/method_task/aphq_detection.yaml); its baselines and
    #: ablations (the subclasses below) are classification only
    tasks = ("classification", "detection")

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.tasks = ("classification",)

    @classmethod
    def check_task_config(cls, cfg) -> None:
        """The detection runner's early check: build the detection stage settings (UserError on a bad value)."""
        if cfg.get("task", {}).get("name") == "detection":
            from .detection import stage_configs

            stage_configs(cfg.method)

    # ------------------------------------------------------------------ config helpers

    def images(self, data) -> dict[str, int]:
        """Images of each enabled stage (MR, calibration, reconstruction), as capped by `_n`."""
        sections = (("mr", "mlp_recon"), ("calibration", "calib"), ("reconstruction", "recon"))
        return {stage: self._n(data, section, quiet=True) for stage, section in sections
                if section == "calib" or bool(self.cfg[section].enabled)}

    def _keys(self) -> dict[str, dict]:
        """What each stage depends on (besides the run's model / data / seed and the upstream stage).

        Switches that cannot change a result (logging, evaluation, exact speed-ups, resume) are left
        out, so flipping them reuses saved stages."""
        bits = _plain(self.bits)
        mr, calib, recon = self._stripped(self.cfg.mlp_recon, self.cfg.calib, self.cfg.recon)
        return {"aphq_mlp_recon": {"mlp_recon": mr},
                "aphq_calibrate": {"calib": calib, "bits": bits},
                "aphq_reconstruct": {"recon": recon, "bits": bits}}

    def _stage_loaders(self, model: nn.Module, mr_on: bool, mr_stage: str
                       ) -> tuple[Callable[[str, dict], None], Callable[[str, dict], None]]:
        """(restore, load) for `_resume` / `_run_rest`: `load` puts a stage's state dict into `model` (plain
        after the MR stage `mr_stage`, quantizer state after the others); `restore` first brings a fresh
        `model` into the stage's form (ReLU MLPs when MR is on, wrapped quantizers after MR)."""

        def load(name: str, res: dict) -> None:
            if name == mr_stage:
                model.load_state_dict(res["state_dict"])
            else:
                load_quant_state(model, res["state_dict"])

        def restore(name: str, res: dict) -> None:
            if mr_on:
                relu_swap(model)
            if name != mr_stage:
                wrap_model(model, self._scheme())
            model.to(self.ctx.device)
            load(name, res)

        return restore, load

    # ------------------------------------------------------------------ main entry

    def quantize(self, model: nn.Module, data) -> nn.Module:
        if self.ctx.cfg.get("task", {}).get("name") == "detection":
            from .detection import quantize_detection

            return quantize_detection(self, model, data)
        cfg, ctx = self.cfg, self.ctx
        device = ctx.device
        fp_model = copy.deepcopy(model).eval()  # the GELU teacher, before any change
        keys = self._keys()
        mr_on = bool(cfg.mlp_recon.enabled)
        rec_on = bool(cfg.recon.enabled)
        chain = [n for n, on in zip(STAGES, (mr_on, True, rec_on)) if on]
        sigs = self._chain(chain, keys)

        restore, load = self._stage_loaders(model, mr_on, "aphq_mlp_recon")
        last = self._resume(chain, keys, sigs, restore)
        if last < 0:
            model.to(device)
        computes = {"aphq_mlp_recon": lambda: self._mlp_recon(model, fp_model, data),
                    "aphq_calibrate": lambda: self._calibrate(model, data),
                    "aphq_reconstruct": lambda: self._reconstruct(model, fp_model, data, sigs["aphq_reconstruct"])}
        self._run_rest(chain[last + 1:], keys, computes, load)
        model.eval()
        return model

    # ------------------------------------------------------------------ stage 1: MLP reconstruction

    def _mlp_recon(self, model: nn.Module, fp_model: nn.Module, data) -> dict:
        cfg = self.cfg.mlp_recon
        t0 = time.perf_counter()
        images = self._images(data, "mlp_recon")
        model.to(self.ctx.device)
        gen = torch.Generator().manual_seed(int(self.ctx.cfg.seed))
        stats = reconstruct_mlps(model, fp_model, images, mlp_recon_config(_engine_cfg(cfg)), tracker=self.ctx.tracker,
                                 device=self.ctx.device, generator=gen)
        summary: dict[str, Any] = {"mr_seconds": round(time.perf_counter() - t0, 3), "mr_images": images.shape[0],
                                   "mr_aph_seconds": stats.get("aph_seconds", 0.0)}
        if bool(cfg.get("evaluate", True)):
            acc = self._evaluate(model, data, "MR'd FP eval")
            summary.update({f"mr_fp_{k}": v for k, v in acc.items()})
        return {"state_dict": _cpu_state(model), "stats": stats, "summary": summary}

    # ------------------------------------------------------------------ stage 2: calibration

    # `_calibrate`: APHQ's wrapping and calibration search, common.run.staged.StagedMethod._calibrate

    # ------------------------------------------------------------------ stage 3: block reconstruction

    def _reconstruct(self, model: nn.Module, fp_model: nn.Module, data, sig: str) -> dict:
        cfg = self.cfg.recon
        device = self.ctx.device
        rcfg = block_recon_config(_engine_cfg(cfg))
        t0 = time.perf_counter()
        images = self._images(data, "recon")
        model.to(device)
        fp_model.to(device)
        units = [u.name for u in model_units(model)]
        start, done_stats = 0, {}
        partials = self._partial_paths("aphq_reconstruct", sig)
        if bool(cfg.get("resume", True)):
            start, done_stats = self._load_partial(model, "aphq_reconstruct", partials)
        t_w = time.perf_counter()
        aph_kw = dict(eps=float(cfg.eps), temp=float(cfg.temp), batch_size=int(cfg.get("aph_batch_size", 32)),
                      mode=str(cfg.get("aph_mode", "faithful")), device=device, progress=False)
        if rcfg.metric == "hessian_perturb" and rcfg.use_mean_hessian:
            # averaged APH of every remaining unit up front, from the FP model alone (spec §7 item 2)
            weights: Any = average_perturbation_hessian(fp_model, images, units[start:], mean=True, **aph_kw)
        elif rcfg.metric == "hessian_perturb":
            # per-sample PH (ablation_avg): (N, *out) per unit, computed just before the unit trains so only
            # one unit's tensor is in memory (all units up front would be ~units x N x out floats)
            def weights(name: str, _q_in: torch.Tensor, _fp_in: torch.Tensor) -> torch.Tensor | None:
                return average_perturbation_hessian(fp_model, images, [name], mean=False, **aph_kw).get(name)
        elif rcfg.metric == "hessian_brecq":
            teacher = fp_logits(fp_model, images, int(cfg.get("aph_batch_size", 32)), device)
            weights = brecq_fisher_weights(model, teacher, temp=float(cfg.temp),
                                           batch_size=int(cfg.get("aph_batch_size", 32)))
        else:
            weights = None
        aph_seconds = time.perf_counter() - t_w
        stats_acc = dict(done_stats)

        def on_unit_done(name: str) -> None:
            index = units.index(name)
            self._save_partial(partials, {"state_dict": _cpu_state(model), "next_unit": index + 1,
                                          "units": stats_acc})

        gen = torch.Generator().manual_seed(int(self.ctx.cfg.seed))
        res = reconstruct_model(model, fp_model, images, rcfg, weights=weights, tracker=self.ctx.tracker,
                                device=device, generator=gen, on_unit_done=on_unit_done, start_unit=start)
        stats_acc.update(res["units"])
        for p in partials:
            p.unlink(missing_ok=True)
        summary = {"recon_seconds": round(time.perf_counter() - t0, 3), "recon_images": images.shape[0],
                   "recon_weights_seconds": round(aph_seconds, 3), "recon_resumed_at": start,
                   "recon_sec_per_iter": self._sec_per_iter(res["units"])}
        return {"state_dict": _cpu_state(model), "units": stats_acc, "summary": summary}


# Baselines and ablations: the same pipeline, different configs (conf/method/<name>.yaml).
@register_method("qdrop")
class QDrop(APHQ):
    """QDrop baseline (no MR, MSE loss, QDrop p = 0.5)."""


@register_method("brecq")
class BRECQ(APHQ):
    """BRECQ baseline (no MR, FP block inputs, MSE loss)."""


@register_method("brecq_qinp")
class BRECQQuantInput(APHQ):
    """BRECQ with quantized block inputs."""


@register_method("aphq_no_avg")
class APHQNoAverage(APHQ):
    """Ablation: per-sample perturbation Hessian (no averaging), no MR."""


@register_method("aphq_brecq_hessian")
class APHQBrecqHessian(APHQ):
    """Ablation: BRECQ's Fisher instead of the APH, no MR."""


@register_method("aphq_no_mr")
class APHQNoMR(APHQ):
    """APHQ without MLP reconstruction."""
