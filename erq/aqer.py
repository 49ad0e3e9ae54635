"""Aqer: activation quantization error reduction by ridge regression (ERQ spec §4).

For a linear layer with FP weights W (d_out × d_in), bias b, FP inputs X (N rows) and X̃ = Q_a(X)
(the layer's own activation quantizer), keep the weights in FP and change them so that the output on
quantized inputs matches the FP output:

    min_{ΔW,Δb} ‖ Y − [X̃, 1][W+ΔW, b+Δb]ᵀ ‖²_F + λ₁ ‖[ΔW, Δb]‖²_F ,   Y = XWᵀ + 1bᵀ
    Θ = (ÃᵀÃ + λ₁ I)⁻¹ Ãᵀ R ,  Ã = [X̃, 1],  R = (X − X̃) Wᵀ   ⇒   ÃᵀR = C Wᵀ,  C = Ãᵀ(X − X̃)
    W ← W + Θ[:d_in]ᵀ ,  b ← b + Θ[d_in]
(The bias cancels in R; ÃᵀR is streamed by `erq.stats.LayerStats`.)

Sums are not normalised by N (λ₁ acts against the raw Gram), and the reference penalises the bias
column too (`penalize_bias`). A layer without bias (Swin `reduction` in ERQ) uses Ã = X̃ and updates W
only. The inputs are the FP model's, so Aqer cancels only the layer's own input-quantization error.
"""
from __future__ import annotations

import torch

from .linalg import SuffixCholesky, ridge_matrix
from .stats import LayerStats

__all__ = ["aqer_update"]


@torch.no_grad()
def aqer_update(weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats, lam: float,
                penalize_bias: bool = True, chol: SuffixCholesky | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Aqer-updated (W, b) of a linear layer (or a conv flattened to (d_out, C·kh·kw)).

    Args:
        weight: (d_out, d_in) FP weights.
        bias: (d_out,) or None (no-bias branch).
        stats: the layer's streamed G and ÃᵀR (collected with the layer's pre-Aqer `weight`).
        lam: λ₁.
        penalize_bias: put λ₁ on the bias column as the reference does (False: bias unpenalised).
        chol: a factorisation of the same ridge matrix to reuse (e.g. Wqer's, when λ₁ = λ₂).
    """
    d_in = weight.shape[1]
    w64 = weight.double()
    rhs = stats.aqer_rhs()  # Ãᵀ R for Ã = [X̃, 1]
    if bias is not None:
        gram = stats.gram
    else:
        gram, rhs = stats.gram[:d_in, :d_in], rhs[:d_in]
    if chol is None:
        chol = SuffixCholesky(ridge_matrix(gram, lam, penalize_last=penalize_bias or bias is None))
    theta = chol.solve(0, rhs)  # (n, d_out)
    new_w = (w64 + theta[:d_in].T).to(weight.dtype)
    new_b = None if bias is None else (bias.double() + theta[d_in]).to(bias.dtype)
    return new_w, new_b
