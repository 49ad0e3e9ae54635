"""APHQ-ViT's MLP reconstruction, detection variant (detection spec §3.3).

Every Swin block MLP of `model` has its GELU replaced by ReLU (`aphq.mlp_recon.relu_swap`) and its fc1 / fc2
refitted, block by block, against the FP GELU detector `fp_model` (no error propagation: every block's data come
from `fp_model`). Per block:

* data per image (each its own size, batch 1): the MLP input x, output y and fc2 input (GELU output);
* ub = the `pct` quantile (rank ⌈count·pct⌉ − 1) of the positive fc2 inputs of the first 128 images;
* perturbation weights G per image from the RPN loss at ε = 1e-3 (`aphq.det_aph`), mean 1, not averaged;
* t = 0 … iters−1 on image t mod N: h = relu(fc1 x), ŷ = fc2 h, ŷ_c = fc2 clamp(h, 0, ub),
  R(u) = mean_c Σ_tokens G (u − y)² / 10, L = R(ŷ) + 2 R(ŷ_c); Adam on fc1/fc2 weights and biases at lr 4e-5,
  cosine-annealed to 0 over `iters`.

`ref_mlp_perturb_bug` (off by default, as the spec recommends): after a block's gradient sweeps the reference
leaves the −ε shift on `fp_model`'s MLP for the rest of the run; on, it is reproduced with a forward hook.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from common.errors import UserError
from common.settings import dataclass_from
from common.tasks.detection.recon import capture_unit_io, detection_units

from .det_aph import perturbation_weights
from .mlp_recon import positive_quantile

__all__ = ["DetMLPConfig", "det_mlp_config", "reconstruct_mlps_detection", "mlp_objective"]
log = logging.getLogger(__name__)

_IGNORED = {"enabled", "n_images", "draw", "augment", "evaluate", "batch_size", "temp", "aph_mode",
            "aph_batch_size", "eval_batch_size", "sparse_clip", "tune_allocator", "resume", "seed"}


@dataclass
class DetMLPConfig:
    """Detection MR settings (defaults: the reference's, spec §3.3).

    Attributes:
        iters: Adam steps per block, one image each (20 000).
        lr: Adam lr, cosine to 0 (4e-5).
        pct: clamp percentile of the positive GELU outputs (0.999).
        ub_images: images whose GELU outputs give ub (the first 128).
        clamp_weight, loss_div: L = R(ŷ) + clamp_weight·R(ŷ_c), R divided by loss_div (2, 10).
        metric: "hessian_perturb" (G-weighted) or "mse" (G = 1).
        eps: perturbation of the MLP output (1e-3).
        pos_thresh: RPN objectness threshold of the regression mask (0.7).
        ref_mlp_perturb_bug: keep the −eps shift on the FP MLP after its sweeps (reference bug; off).
        log_every: loss-curve period (0: first and last step only).
    """

    iters: int = 20000
    lr: float = 4e-5
    pct: float = 0.999
    ub_images: int = 128
    clamp_weight: float = 2.0
    loss_div: float = 10.0
    metric: str = "hessian_perturb"
    eps: float = 1e-3
    pos_thresh: float = 0.7
    ref_mlp_perturb_bug: bool = False
    log_every: int = 100

    def __post_init__(self):
        if self.metric not in ("hessian_perturb", "mse"):
            raise UserError(f"detection MLP reconstruction metric must be hessian_perturb or mse, not {self.metric!r}")
        if not 0.0 < float(self.pct) <= 1.0:
            raise UserError(f"pct must be in (0, 1], got {self.pct}")


def det_mlp_config(cfg: Any = None, **overrides) -> DetMLPConfig:
    return dataclass_from(DetMLPConfig, cfg, _IGNORED, "mlp_recon (detection)", **overrides)


def mlp_objective(mlp: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor | None, ub: float,
                  cfg: DetMLPConfig) -> torch.Tensor:
    """R(ŷ) + clamp_weight·R(ŷ_c) for one image (x, y: (1, L, C); g: weights of y's shape or None)."""
    h = mlp.act(mlp.fc1(x))
    y_hat = mlp.fc2(mlp.norm(h))
    y_clip = mlp.fc2(mlp.norm(h.clamp(0, ub)))

    def r(u: torch.Tensor) -> torch.Tensor:
        e = (u - y).square()
        if g is not None:
            e = e * g
        return e.sum(1).mean() / cfg.loss_div

    return r(y_hat) + cfg.clamp_weight * r(y_clip)


def reconstruct_mlps_detection(model: nn.Module, fp_model: nn.Module, images: Sequence[torch.Tensor],
                               cfg: DetMLPConfig, device: torch.device, tracker=None) -> dict[str, Any]:
    """MR of every Swin block MLP of `model` (already ReLU) against `fp_model`; per-block statistics."""
    fp_mods = dict(fp_model.named_modules())
    blocks = [u for u in detection_units(model, with_fpn=False) if u.kind == "block"]
    fp_rpn = capture_unit_io(fp_model, {}, images, device, rpn=True)["rpn"]["outputs"]
    stats: dict[str, Any] = {}
    for unit in blocks:
        t0 = time.perf_counter()
        mlp, fp_mlp = unit.module.mlp, fp_mods[unit.name].mlp
        io = capture_unit_io(fp_model, {"mlp": fp_mlp, "fc2": fp_mlp.fc2}, images, device)
        xs, ys = io["mlp"]["inputs"], io["mlp"]["outputs"]
        ub = positive_quantile(torch.cat([t.reshape(-1) for t in io["fc2"]["inputs"][:cfg.ub_images]]), cfg.pct)
        weights = (perturbation_weights(fp_model, fp_mlp, images, fp_rpn, cfg.eps, device, cfg.pos_thresh,
                                        where=f"MR {unit.name}") if cfg.metric == "hessian_perturb" else None)
        if cfg.ref_mlp_perturb_bug:
            fp_mlp.register_forward_hook(lambda _m, _a, out, e=cfg.eps: out - e)
        params = [mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
        params = [p for p in params if p is not None]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=cfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.iters, 1), eta_min=0.0)
        first = last = float("nan")
        with torch.enable_grad():
            for t in range(cfg.iters):
                i = t % len(xs)
                g = weights[i].to(device) if weights is not None else None
                loss = mlp_objective(mlp, xs[i].to(device), ys[i].to(device), g, ub, cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if t == 0:
                    first = float(loss.detach())
                if t == cfg.iters - 1 or (cfg.log_every and t % cfg.log_every == 0):
                    last = float(loss.detach())
                    if tracker is not None:
                        tracker.log_curve(f"mr/{unit.name}", t + 1, loss=last)
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        stats[unit.name] = {"ub": ub, "loss_first": first, "loss_last": last,
                            "seconds": round(time.perf_counter() - t0, 3)}
        log.info("MR %s: ub %.4g, loss %.4g -> %.4g", unit.name, ub, first, last)
    return {"blocks": stats}
