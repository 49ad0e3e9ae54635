"""APHQ-ViT's block reconstruction on detectors (detection spec §3.5, §3.6).

Units (`common.tasks.detection.recon.detection_units`): patch_embed, every PatchMerging and Swin block in model
order, and the whole FPN as one unit when it is quantized (`model.quantize_heads=true`). Images keep their own
sizes: every stored tensor is a per-image list and each step trains on one image (t mod N, batch 1). Per unit:

1. FP data: the unit's input and output in the FP GELU detector `fp_model`, per image (and, once, the FP RPN
   outputs per image and level);
2. quantized input: the unit's input in `model` with the already reconstructed units quantized and everything
   else FP;
3. backbone units: per-image perturbation weights G (RPN loss, ±ε = 1e-3, mean 1 per image; `aphq.det_aph`);
4. training, `iters` steps: x = where(U < quant_ratio, x_q, x_fp) elementwise (per FPN level); AdaRound-soft
   weights (`common.recon.adaround`), activation quantizers with straight-through rounding; QDrop (keep the
   quantized value with probability `drop_prob`) on Linear inputs only — not on matmul operands
   (`qdrop_on_matmul`, reference: off) nor conv inputs; loss: backbone rec = Σ G ⊙ (ŷ − y)² (a sum), FPN rec =
   mean over the concatenated levels, rec ← 2·rec/rec₁ (rec₁ the first step's), plus after `warmup` the rounding
   loss λ·Σ(1 − |2h(α) − 1|^β) with β 20 → 2; Adam on α (lr 1e-3) and on the activation scales (lr 4e-5, cosine
   to 0); zero-points are not trained;
5. hard rounding (`finalize_adaround`).

At the end (`untrained_half_up`, reference): the quantized layers outside every unit (RPN / RoI heads with
`quantize_heads`) get the reference's AdaRound hard value at α₀, 1[frac(W/s) ≥ 0.5], i.e. round half up.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from common.models.units import Unit
from common.quant import QuantConv2d, QuantLinear, QuantMatMul
from common.quant.quantizers import quantized_only, quantizers_of
from common.recon.adaround import attach_adaround, beta_schedule, finalize_adaround
from common.recon.block import learned_scales
from common.errors import UserError
from common.settings import dataclass_from
from common.tasks.detection.recon import capture_unit_io, detection_units, unit_call

from .det_aph import perturbation_weights

__all__ = ["DetReconConfig", "det_recon_config", "reconstruct_detector", "train_unit", "mix_inputs"]
log = logging.getLogger(__name__)

_IGNORED = {"enabled", "n_images", "augment", "draw", "batch_size", "mode", "use_mean_hessian", "temp", "aph_mode",
            "aph_batch_size", "compile", "eval_batch_size", "resume", "evaluate"}


@dataclass
class DetReconConfig:
    """Detection block-reconstruction settings (defaults: the reference's, spec §3.5).

    Attributes:
        iters: steps per unit, one image each (20 000).
        w_lr, a_lr: Adam lr of the AdaRound α (1e-3) and of the activation scales (4e-5, cosine to 0).
        round_lambda, beta_start, beta_end, warmup: rounding loss λ = 0.01, β 20 → 2 after 20 % of the steps.
        drop_prob: QDrop probability of keeping the quantized value in Linear input quantizers (0.5).
        quant_ratio: probability of the quantized unit input in the input mix (0.5).
        qdrop_on_matmul: QDrop on the attention-matmul operands too (reference: False).
        metric: "hessian_perturb" (G-weighted sum) or "mse" (unweighted sum) for backbone units.
        eps, pos_thresh: perturbation (1e-3) and RPN objectness threshold (0.7) of G.
        init_loss_norm: rec ← 2·rec/rec₁ (reference).
        learn_act_scale: train the activation scales (reference).
        untrained_half_up: hard-round layers outside every unit half up (reference's α₀ hard value).
        log_every: loss-curve period (0: first and last step).
    """

    iters: int = 20000
    w_lr: float = 1e-3
    a_lr: float = 4e-5
    round_lambda: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    drop_prob: float = 0.5
    quant_ratio: float = 0.5
    qdrop_on_matmul: bool = False
    metric: str = "hessian_perturb"
    eps: float = 1e-3
    pos_thresh: float = 0.7
    init_loss_norm: bool = True
    learn_act_scale: bool = True
    untrained_half_up: bool = True
    log_every: int = 100

    def __post_init__(self):
        if self.metric not in ("hessian_perturb", "mse"):
            raise UserError(f"detection recon metric must be hessian_perturb or mse, not {self.metric!r}")
        for k in ("drop_prob", "quant_ratio", "warmup"):
            if not 0.0 <= float(getattr(self, k)) <= 1.0:
                raise UserError(f"recon.{k} must be in [0, 1], got {getattr(self, k)}")


def det_recon_config(cfg: Any = None, **overrides) -> DetReconConfig:
    return dataclass_from(DetReconConfig, cfg, _IGNORED, "recon (detection)", **overrides)


def mix_inputs(x_fp, x_q, ratio: float):
    """where(U < ratio, x_q, x_fp) elementwise, fresh U (per level for lists)."""
    if isinstance(x_fp, list):
        return [mix_inputs(a, b, ratio) for a, b in zip(x_fp, x_q)]
    return torch.where(torch.rand_like(x_fp) < ratio, x_q, x_fp)


def _to(x, device: torch.device):
    return [t.to(device) for t in x] if isinstance(x, list) else x.to(device)


def _rec(unit: Unit, out, y, g: torch.Tensor | None) -> torch.Tensor:
    if unit.kind == "fpn":  # mean over all levels' elements together (P2 dominates)
        return torch.cat([(o - t).square().reshape(-1) for o, t in zip(out, y)]).mean()
    e = (out - y).square()
    return (e * g).sum() if g is not None else e.sum()


def train_unit(unit: Unit, fp_in: list, fp_out: list, q_in: list, weights: list[torch.Tensor] | None,
               cfg: DetReconConfig, device: torch.device, seed: int, tracker=None) -> dict[str, Any]:
    """Reconstruct one unit on per-image lists (batch 1, image t mod N) and hard-round it."""
    module = unit.module
    adas = attach_adaround(module)
    act_qs = [q for _, q in quantizers_of(module, role="act") if q.active]
    scales = learned_scales(act_qs) if cfg.learn_act_scale else []
    linear_in = {id(m.input_quantizer) for m in module.modules() if isinstance(m, QuantLinear)}
    matmul_in = {id(q) for m in module.modules() if isinstance(m, QuantMatMul) for q in (m.a_quantizer, m.b_quantizer)}
    alphas = [a.alpha for a in adas]
    for p in alphas + scales:
        p.requires_grad_(True)
    for q in act_qs:
        q.ste = True
        qdrop = id(q) in linear_in or (cfg.qdrop_on_matmul and id(q) in matmul_in)
        q.drop_prob = float(cfg.drop_prob) if qdrop else 1.0
        q.train()
    w_opt = torch.optim.Adam(alphas, lr=cfg.w_lr) if alphas else None
    a_opt = torch.optim.Adam(scales, lr=cfg.a_lr) if scales else None
    a_sched = torch.optim.lr_scheduler.CosineAnnealingLR(a_opt, T_max=max(cfg.iters, 1), eta_min=0.0) if a_opt else None
    n, warm = len(fp_in), cfg.warmup * cfg.iters
    rec1, first, last, round_last = None, float("nan"), float("nan"), 0.0
    t0 = time.perf_counter()
    fork = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork), torch.enable_grad():
            torch.manual_seed(seed)
            for t in range(cfg.iters):
                i = t % n
                x = mix_inputs(_to(fp_in[i], device), _to(q_in[i], device), cfg.quant_ratio)
                g = weights[i].to(device) if weights is not None else None
                rec = _rec(unit, unit_call(unit, x), _to(fp_out[i], device), g)
                if rec1 is None:
                    rec1 = float(rec.detach())
                    first = rec1
                    if not (rec1 > 0 and math.isfinite(rec1)):
                        warnings.warn(f"{unit.name}: first reconstruction loss is {rec1}; not normalising it "
                                      "(the reference would divide by it)")
                loss = 2 * rec / rec1 if (cfg.init_loss_norm and rec1 > 0 and math.isfinite(rec1)) else rec
                round_loss = None
                if adas and t >= warm:
                    beta = beta_schedule(t, cfg.iters, cfg.warmup, cfg.beta_start, cfg.beta_end)
                    round_loss = cfg.round_lambda * sum(a.round_loss(beta) for a in adas)
                    loss = loss + round_loss
                for opt in (w_opt, a_opt):
                    if opt is not None:
                        opt.zero_grad(set_to_none=True)
                if loss.requires_grad:
                    loss.backward()
                for opt in (w_opt, a_opt):
                    if opt is not None:
                        opt.step()
                if a_sched is not None:
                    a_sched.step()
                if t == cfg.iters - 1 or (cfg.log_every and t % cfg.log_every == 0):
                    last = float(rec.detach())
                    round_last = 0.0 if round_loss is None else float(round_loss.detach())
                    if tracker is not None:
                        tracker.log_curve(f"recon/{unit.name}", t + 1, loss=float(loss.detach()), rec_raw=last,
                                          round=round_last)
    finally:
        seconds = time.perf_counter() - t0
        finalize_adaround(module)
        for q in act_qs:
            q.ste, q.drop_prob = False, 1.0
            q.eval()
        for p in alphas + scales:
            p.requires_grad_(False)
            p.grad = None
    return {"rec_first": first, "rec_last": last, "round_last": round_last, "iters": cfg.iters,
            "seconds": round(seconds, 3), "sec_per_iter": seconds / max(cfg.iters, 1)}


def _has_quant(module: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantConv2d, QuantMatMul)) for m in module.modules())


def reconstruct_detector(model: nn.Module, fp_model: nn.Module, images: Sequence[torch.Tensor], cfg: DetReconConfig,
                         device: torch.device, seed: int = 0, tracker=None, start_unit: int = 0,
                         on_unit_done: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
    """Reconstruct every unit of a calibrated detector `model` (in place) against the FP detector `fp_model`."""
    units = [u for u in detection_units(model) if _has_quant(u.module)]
    fp_mods = dict(fp_model.named_modules())
    fp_rpn = None
    stats: dict[str, Any] = {}
    model.eval()
    fp_model.eval()
    for k, unit in enumerate(units):
        if k < start_unit:
            continue
        t0 = time.perf_counter()
        fp_mod = fp_mods[unit.name]
        backbone = unit.kind != "fpn"
        fp = capture_unit_io(fp_model, {"u": fp_mod}, images, device, rpn=fp_rpn is None and backbone)
        if fp_rpn is None and backbone:
            fp_rpn = fp["rpn"]["outputs"]
        with quantized_only(model, [u.module for u in units[:k]]):
            q_in = capture_unit_io(model, {"u": unit.module}, images, device, outputs=False)["u"]["inputs"]
        weights = None
        if backbone and cfg.metric == "hessian_perturb":
            weights = perturbation_weights(fp_model, fp_mod, images, fp_rpn, cfg.eps, device, cfg.pos_thresh,
                                           where=f"recon {unit.name}")
        t_data = time.perf_counter() - t0
        st = train_unit(unit, fp["u"]["inputs"], fp["u"]["outputs"], q_in, weights, cfg, device,
                        seed * 1_000_003 + 7919 * (k + 1), tracker)
        st["data_seconds"] = round(t_data, 3)
        stats[unit.name] = st
        log.info("recon %s: rec %.4g -> %.4g (%.1f s)", unit.name, st["rec_first"], st["rec_last"], st["seconds"])
        if on_unit_done is not None:
            on_unit_done(unit.name, stats)
    half_up = 0
    if cfg.untrained_half_up:
        inside = {id(m) for u in units for m in u.module.modules()}
        for name, layer in model.named_modules():
            if isinstance(layer, (QuantLinear, QuantConv2d)) and id(layer) not in inside:
                if attach_adaround(layer):  # hard value at α₀: 1[frac ≥ 0.5]
                    half_up += finalize_adaround(layer)
    return {"units": stats, "units_order": [u.name for u in units], "half_up_layers": half_up}
