"""FIMA-Q's DPLR-FIM reconstruction loss (fimaq spec §4.3–§4.5) and its snapshot schedule.

State per unit, after j snapshots (§4.3): G (j, D) the stacked sample-mean absolute gradients Ĝ, Δ (j, D)
the stacked sample-mean absolute output errors Δ̂, B⁻¹ = (ΔΔᵀ)⁻¹ (j, j, plain fp32 inverse) and
ḡ = mean over the snapshots of G. For a batch, e = |ŷ − y| flattened per sample (B, D):

    low-rank   ℓ₁ = mean_b a_b B⁻¹ a_bᵀ,   a_b = e_b Gᵀ          (= eᵀ Gᵀ(ΔΔᵀ)⁻¹G e, never formed)
    diagonal   ℓ₂ = mean_{b,d} e_bd² ḡ_d
    fisher_lr  ℓ  = mean_b (mean_d e_bd G_d)²   (the reference's elementwise product: rank 1 only)

The terms go to the engine by name ("lowrank", "diag", "lr"); `normalisation` gives their per-term
scales (`BlockReconConfig.loss_norm`): fisher_dplr p₁ / p₂ (each re-normalised to 1 at every snapshot),
fisher_diag and fisher_lr 2, mse / mae / fisher_brecq 1 (first step only), the head KL unnormalised.
"""
from __future__ import annotations

import math
import warnings

import torch

from common.errors import UserError

__all__ = ["METRICS", "FIMAQ_METRICS", "FisherState", "snapshot_steps", "realised_rank", "normalisation",
           "check_metric"]

#: every `optim_metric` of the reference; the first three use snapshots (custom loss terms).
FIMAQ_METRICS = ("fisher_dplr", "fisher_diag", "fisher_lr")
METRICS = FIMAQ_METRICS + ("fisher_brecq", "mse", "mae")


def snapshot_steps(iters: int, k: int, dis_mode: str = "q", exact_rank: bool = False) -> tuple[int, ...]:
    """0-based training steps before which a snapshot is taken (spec §4.4).

    `q`: every multiple of ⌊iters/k⌋ below `iters` (the reference; that is k or more snapshots: k = 3 gives
    4, k = 15 gives 16); with `exact_rank` only the first k of them. `qf`: steps 0 … k−1.
    ⌊iters/k⌋ is taken as at least 1 (the reference divides by zero when iters < k).
    """
    if k < 1:
        raise UserError(f"fimaq: k (the number of Fisher snapshots) must be >= 1, got {k}")
    if dis_mode == "qf":
        return tuple(range(min(k, iters)))
    if dis_mode != "q":
        raise UserError(f"fimaq: dis_mode must be 'q' or 'qf', got {dis_mode!r}")
    every = max(1, iters // k)
    steps = tuple(range(0, iters, every))
    return steps[:k] if exact_rank else steps


def realised_rank(iters: int, k: int, dis_mode: str = "q", exact_rank: bool = False) -> int:
    return len(snapshot_steps(iters, k, dis_mode, exact_rank))


def check_metric(metric: str, rank: int, lr_rank1_only: bool) -> None:
    """The reference's `fisher_lr` broadcasts e (B, D) against G (j, D): it works at rank 1 only."""
    if metric not in METRICS:
        raise UserError(f"fimaq: optim metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if metric == "fisher_lr" and lr_rank1_only and rank > 1:
        raise UserError(f"fimaq: metric fisher_lr works only at rank 1 (the reference crashes at its second "
                        f"snapshot), but the snapshot schedule gives rank {rank}; set method.recon.k=1, or "
                        "method.recon.lr_rank1_only=false for the low-rank term with (ΔΔᵀ)⁻¹ at any rank")


def normalisation(metric: str, p1: float = 1.0, p2: float = 1.0) -> dict[str, float | None]:
    """`loss_norm` of the engine for a reference metric: term -> scale (None: unnormalised)."""
    table: dict[str, float | None] = {"head": None, "mse": 1.0, "mae": 1.0, "hessian_brecq": 1.0}
    if metric == "fisher_dplr":
        table.update(lowrank=float(p1), diag=float(p2))
    elif metric == "fisher_diag":
        table.update(diag=2.0)
    elif metric == "fisher_lr":
        table.update(lr=2.0, lowrank=2.0)
    return table


class FisherState:
    """G, Δ, B⁻¹ and ḡ of one unit, grown one snapshot at a time, and the loss terms they define.

    Args:
        metric: fisher_dplr | fisher_diag | fisher_lr.
        lr_rank1_only: fisher_lr is the reference's rank-1 elementwise form (True) or the low-rank term
            ℓ₁ alone (False, any rank).
        inverse: "inv" (torch.linalg.inv in fp32, no damping: the reference) or "pinv"
            (pseudo-inverse). A singular ΔΔᵀ with "inv" (where the reference would crash) falls back to
            pinv with a warning.
    """

    def __init__(self, metric: str = "fisher_dplr", lr_rank1_only: bool = True, inverse: str = "inv"):
        if metric not in FIMAQ_METRICS:
            raise ValueError(f"FisherState metric must be one of {FIMAQ_METRICS}, got {metric!r}")
        if inverse not in ("inv", "pinv"):
            raise UserError(f"fimaq: inverse must be 'inv' or 'pinv', got {inverse!r}")
        self.metric, self.lr_rank1_only, self.inverse = metric, bool(lr_rank1_only), inverse
        self.G: torch.Tensor | None = None
        self.delta: torch.Tensor | None = None
        self.binv: torch.Tensor | None = None
        self.gbar: torch.Tensor | None = None
        self.pinv_fallback = False

    @property
    def rank(self) -> int:
        return 0 if self.G is None else int(self.G.shape[0])

    def add(self, g: torch.Tensor, delta: torch.Tensor) -> None:
        """Append one snapshot (Ĝ_j, Δ̂_j), each (D,) or (1, D), and recompute B⁻¹ and ḡ (in fp32, or fp64
        for fp64 inputs)."""
        dtype = torch.float64 if g.dtype == torch.float64 else torch.float32  # fp32 as the reference; fp64 in tests
        g = g.detach().reshape(1, -1).to(dtype)
        delta = delta.detach().reshape(1, -1).to(dtype)
        self.G = g if self.G is None else torch.cat([self.G, g])
        self.delta = delta if self.delta is None else torch.cat([self.delta, delta])
        if self.metric == "fisher_lr" and self.lr_rank1_only and self.rank > 1:
            raise UserError("fimaq: metric fisher_lr works only at rank 1 (the reference broadcasts e (B, D) "
                            f"against G ({self.rank}, D)); set method.recon.k=1 or method.recon.lr_rank1_only=false")
        b = self.delta @ self.delta.T
        if self.inverse == "pinv":
            self.binv = torch.linalg.pinv(b)
        else:
            binv, info = torch.linalg.inv_ex(b)
            if int(info) != 0 or not bool(torch.isfinite(binv).all()):
                warnings.warn(f"fimaq: ΔΔᵀ is singular at rank {self.rank} (the reference would crash); "
                              "using its pseudo-inverse")
                self.pinv_fallback = True
                binv = torch.linalg.pinv(b)
            self.binv = binv
        self.gbar = self.G.mean(0)

    def summary(self) -> dict[str, float]:
        """Numbers describing the current loss weights (logged at every snapshot)."""
        g, d = self.G[-1], self.delta[-1]
        b = self.delta @ self.delta.T
        ev = torch.linalg.eigvalsh(b.double())
        cond = float(ev[-1] / ev[0]) if float(ev[0]) > 0 else math.inf
        return {"rank": self.rank, "g_mean": float(g.mean()), "g_max": float(g.max()),
                "g_nonzero": float((g > 0).float().mean()), "delta_mean": float(d.mean()),
                "delta_max": float(d.max()), "gbar_mean": float(self.gbar.mean()), "cond_ddt": cond,
                "binv_max": float(self.binv.abs().max()), "pinv_fallback": float(self.pinv_fallback)}

    def terms(self, out: torch.Tensor, target: torch.Tensor, idx: torch.Tensor | None = None
              ) -> dict[str, torch.Tensor]:
        """Raw loss terms of one batch (a `common.recon.block.UnitLossFn`)."""
        if self.G is None:
            raise RuntimeError("FisherState.terms before the first snapshot")
        e = (out - target).abs().flatten(1)
        if self.metric == "fisher_diag":
            return {"diag": (e.square() * self.gbar).mean()}
        if self.metric == "fisher_lr" and self.lr_rank1_only:
            return {"lr": (e * self.G[0]).mean(1).square().mean()}
        a = e @ self.G.T
        low = ((a @ self.binv) * a).sum(1).mean()
        if self.metric == "fisher_lr":
            return {"lowrank": low}
        return {"lowrank": low, "diag": (e.square() * self.gbar).mean()}
