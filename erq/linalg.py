"""Ridge solves for Aqer and Wqer: one Cholesky factorisation per layer.

Both steps solve (G + λ P) X = B with G = ÃᵀÃ and P = diag(penalty) (1 everywhere, or 0 on the bias
column). Wqer's compensation uses only the trailing blocks [k, n) of that matrix ("the columns not
quantized yet", always a suffix). Reversing the index order turns every suffix into a *leading*
block, and the Cholesky factor of a leading block is the leading block of the full factor, so one
factorisation of the reversed matrix serves Aqer (k = 0) and every Wqer round.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

__all__ = ["SuffixCholesky", "ridge_matrix", "single_threaded"]
log = logging.getLogger(__name__)


def ridge_matrix(gram: torch.Tensor, lam: float, penalize_last: bool = True) -> torch.Tensor:
    """G + λ I, optionally without the penalty on the last (bias) column."""
    pen = torch.ones(gram.shape[0], dtype=gram.dtype, device=gram.device)
    if not penalize_last:
        pen[-1] = 0.0
    return gram + torch.diag(lam * pen)


class SuffixCholesky:
    """Factorises an SPD matrix M once; solves M[k:, k:] X = B for any k.

    If M is numerically singular (λ = 0 on rank-deficient data) a growing diagonal jitter is added,
    with a warning.
    """

    def __init__(self, matrix: torch.Tensor):
        m = matrix.double().flip(0, 1)
        n = m.shape[0]
        jitter = 0.0
        scale = float(m.diagonal().abs().mean()) or 1.0
        for attempt in range(8):
            L, info = torch.linalg.cholesky_ex(m + jitter * torch.eye(n, dtype=m.dtype, device=m.device))
            if int(info) == 0:
                break
            jitter = scale * 10.0 ** (attempt - 12)
        else:
            raise RuntimeError("ridge matrix is not positive definite even with jitter; increase the ridge λ")
        if jitter:
            log.warning("ridge matrix not positive definite: added jitter %.3g to its diagonal", jitter)
        self.L = L
        self.n = n

    def solve(self, start: int, rhs: torch.Tensor) -> torch.Tensor:
        """X with M[start:, start:] X = rhs (rhs has n − start rows)."""
        m = self.n - start
        if rhs.shape[0] != m:
            raise ValueError(f"right-hand side has {rhs.shape[0]} rows, the block has {m}")
        L = self.L[:m, :m]
        return torch.cholesky_solve(rhs.double().flip(0), L).flip(0)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run a stretch of small element-wise ops on one intra-op thread, then restore the setting.

    Rounding refinement and the per-row weight searches are long sequences of ops on tensors of
    10^4-10^6 elements: OpenMP fork/join per op costs more than a second core gains, and on a shared,
    oversubscribed machine it costs several times the work itself. Large GEMMs and factorisations
    elsewhere keep all threads.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
