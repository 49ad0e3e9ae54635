"""Fast Progressive Combining Search (FPCS, adalog spec §3.2): a beam search over scale candidates.

Per group g (a weight row, an input channel, an attention head or a whole tensor), with an objective
err(candidate) to minimise (the reference ranks −MSE with `torch.topk`):

    C₀   = initial candidates (scale, aux) — aux is the zero-point, or the log-base exponent q (§3.5)
    δ    = C₀.scale[1] − C₀.scale[0]                  spacing of the first two candidates, per group
    top  = the `width` best of C₀
    repeat steps − 1 times:
        offsets = (linspace(0, 1, n_new) − 0.5) · δ      n_new evenly spaced values in [−δ/2, δ/2]
        δ      ← δ / (n_new − 0.5)
        C_t    = {(s + o, a) : (s, a) ∈ top, o ∈ offsets}  (width · n_new candidates; aux kept)
        (activations: scales clamped to ≥ `min_scale`)
        top    = the `width` best of C_t, or the single best at the last step

With width 16 and eq_n 128 (n_new = 8) every call evaluates 6 · 128 = 768 candidates; the post-GELU
joint (q, s) variant uses width 32 and n_new 4 on 8 bases × 16 scales. Only the final pick is written
into a quantizer. `steps = 1` returns the best initial candidate (the reference's fixed-grid search).

Ranking: per group, ascending error, ties broken by the lower candidate index (a stable sort; the
reference's `torch.topk` leaves tie order to the implementation), NaN never wins.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["FPCSResult", "fpcs", "best_k", "refine_offsets"]

#: score(scales (C, G), aux (C, G)) -> errors (C, G), smaller is better.
Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FPCSResult:
    """Chosen candidate per group and how many candidates were evaluated (per group)."""

    scale: torch.Tensor
    aux: torch.Tensor
    error: torch.Tensor
    evaluated: int


def best_k(err: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (k, G) of the k smallest errors per column of `err` (C, G), best first, stable on ties."""
    e = err.double()
    e = torch.where(torch.isnan(e), torch.full_like(e, float("inf")), e)
    return torch.sort(e, dim=0, stable=True).indices[: min(k, e.shape[0])]


def refine_offsets(delta: torch.Tensor, n_new: int) -> torch.Tensor:
    """(n_new, G) offsets (linspace(0, 1, n_new) − 0.5)·δ, formed in float32 as the reference does."""
    lin = torch.linspace(0, 1, steps=n_new, device=delta.device, dtype=delta.dtype)
    return (lin[:, None] - 0.5) * delta[None, :]


def fpcs(score: Score, scales: torch.Tensor, aux: torch.Tensor, width: int = 16, steps: int = 6,
         n_new: int | None = None, min_scale: float | None = None, delta: torch.Tensor | None = None
         ) -> FPCSResult:
    """Run FPCS independently for every group.

    Args:
        score: objective of candidates, see `Score`.
        scales, aux: initial candidates (C₀, G) (aux: zero-points or base exponents).
        width: beam width (16; 32 for the post-GELU joint search).
        steps: total rounds including the initial one (6).
        n_new: offsets per kept candidate (default C₀ // width: 8, or 4 for the joint search).
        min_scale: clamp of refined scales (1e-4 for linear inputs; None elsewhere).
        delta: initial spacing (G,) (default scales[1] − scales[0], the reference's rule).
    """
    if scales.shape != aux.shape or scales.dim() != 2:
        raise ValueError(f"scales {tuple(scales.shape)} and aux {tuple(aux.shape)} must both be (C, G)")
    if steps < 1:
        raise ValueError(f"FPCS needs steps >= 1, got {steps}")
    n_new = int(n_new) if n_new is not None else max(1, scales.shape[0] // width)
    d = (scales[1] - scales[0] if scales.shape[0] > 1 else torch.zeros_like(scales[0])) if delta is None else delta
    err = score(scales, aux)
    evaluated = scales.shape[0]
    idx = best_k(err, 1 if steps == 1 else width).to(scales.device)
    top_s, top_a, top_e = scales.gather(0, idx), aux.gather(0, idx), err.gather(0, idx.to(err.device))
    for t in range(1, steps):
        off = refine_offsets(d, n_new)
        d = d / (n_new - 0.5)
        cand_s = (top_s[:, None, :] + off[None]).reshape(-1, scales.shape[1])
        if min_scale is not None:
            cand_s = cand_s.clamp(min=min_scale)
        cand_a = top_a.repeat_interleave(n_new, dim=0)
        err = score(cand_s, cand_a)
        evaluated += cand_s.shape[0]
        idx = best_k(err, 1 if t == steps - 1 else width).to(scales.device)
        top_s, top_a, top_e = cand_s.gather(0, idx), cand_a.gather(0, idx), err.gather(0, idx.to(err.device))
    return FPCSResult(top_s[0], top_a[0], top_e[0], evaluated)
