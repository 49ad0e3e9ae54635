"""Vectorised percentile-grid MSE searches for quantizer initialisation (RepQ-ViT / ERQ style).

RepQ-ViT and ERQ fit every uniform quantizer the same way: for each probability p of a small grid,
take the range [quantile(x, 1 − p), quantile(x, p)] (linear interpolation, torch.quantile
semantics), turn it into an asymmetric (scale, zero-point) with a rounded zero-point, score it by the
mean squared fake-quant error of x itself, and keep the first candidate with a strictly smaller score
(the references start from a best score of 1e10). The log-sqrt2 post-softmax quantizer does the same
with a single scale s = quantile(x, p).

The references loop over channels / rows and call torch.quantile 2·|grid| times each. Here every
group (a weight row, an activation channel, or the whole tensor) is a row of a (groups, elements)
matrix: the needed order statistics are taken once (a sort, or `topk` of the two tails when the grid
only touches the extremes of a large tensor), all grid quantiles are interpolated from them, and
each candidate's error is evaluated for all groups at once, in chunks.

Quantile semantics: torch.quantile rounds p to the input dtype (float32), computes the rank p·(n − 1)
in float64 and lerps between the neighbouring order statistics with a float32 weight; above 2^24 elements torch refuses and the
references fall back to numpy.percentile (float64 rank and lerp). Both are reproduced.
"""
from __future__ import annotations

from typing import Sequence

import torch

from common.calib.search import QUANTILE_MAX as TORCH_QUANTILE_MAX  # one source for torch.quantile's limit

__all__ = ["group_quantiles", "search_uniform_percentile", "search_log_sqrt2_percentile", "TORCH_QUANTILE_MAX"]

# TORCH_QUANTILE_MAX: the largest input torch.quantile accepts; above it the references use numpy.percentile.
_CHUNK = 1 << 18  # elements per chunk when scoring candidates (cache-sized)


def _ranks(n: int, probs: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(below, above, weight) of the interpolation rank p·(n−1) for each p."""
    if n <= TORCH_QUANTILE_MAX:  # torch.quantile: q rounded to float32, rank in float64, float32 weight
        q = torch.tensor(list(probs), dtype=torch.float32).double()
    else:  # numpy.percentile(x, 100 p): float64 q and rank, float64 lerp
        q = torch.tensor([p * 100.0 / 100.0 for p in probs], dtype=torch.float64)
    r = q * float(n - 1)
    below = r.floor().long().clamp(0, n - 1)
    above = r.ceil().long().clamp(0, n - 1)
    w = r - below.double()
    return below, above, (w.float() if n <= TORCH_QUANTILE_MAX else w)


def _tails(row: torch.Tensor, k_lo: int, k_hi: int, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The k_lo smallest (ascending) and k_hi largest (descending) values of a long 1-D tensor, exactly.

    One min/max pass over blocks of `block` elements: the k-th largest block maximum t has at least k
    elements ≥ t above it, so every one of the k largest values lies in a block whose maximum is ≥ t.
    Only those few blocks are gathered and sorted (likewise for the minima).
    """
    n = row.numel()
    nb = n // block
    blocks = row[:nb * block].view(nb, block)
    rest = row[nb * block:]
    out = []
    for k, largest in ((k_lo, False), (k_hi, True)):
        if k == 0:
            out.append(row[:0])
            continue
        ext = blocks.amax(1) if largest else blocks.amin(1)  # (faster than one aminmax pass on CPU)
        kk = min(k, nb)
        t = torch.topk(ext, kk, largest=largest, sorted=False).values
        t = t.min() if largest else t.max()
        sel = blocks[(ext >= t) if largest else (ext <= t)].reshape(-1)
        cand = torch.cat([sel, rest])
        out.append(torch.topk(cand, k, largest=largest, sorted=True).values)
    return out[0], out[1]


def _order_stats(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (G, n) -> the order statistics at sorted positions `idx` (K,) for every row, as (G, K).

    Uses the two tails only (`topk`) when all positions are near the ends of a long row, else a sort.
    """
    n = x.shape[1]
    low, high = idx < n // 2, idx >= n // 2
    lo_need = int(idx[low].max().item()) + 1 if bool(low.any()) else 0
    hi_need = n - int(idx[high].min().item()) if bool(high.any()) else 0
    if n > 4096 and lo_need + hi_need < n // 8:
        out = torch.empty(x.shape[0], idx.numel(), dtype=x.dtype, device=x.device)
        if x.shape[0] == 1 and n > (1 << 16):
            small, big = (t[None, :] for t in _tails(x[0], lo_need, hi_need))
        else:
            small = torch.topk(x, lo_need, dim=1, largest=False, sorted=True).values if lo_need else None
            big = torch.topk(x, hi_need, dim=1, largest=True, sorted=True).values if hi_need else None
        if lo_need:
            out[:, low] = small[:, idx[low].to(x.device)]  # small[:, k] = k-th smallest
        if hi_need:
            out[:, high] = big[:, (n - 1 - idx[high]).to(x.device)]  # big[:, k] = k-th largest
        return out
    return torch.sort(x, dim=1).values[:, idx.to(x.device)]


def group_quantiles(x: torch.Tensor, probs: Sequence[float]) -> torch.Tensor:
    """Linear-interpolation quantiles of each row of x (G, n) at each p: shape (G, len(probs)).

    Matches torch.quantile(row, p) for n ≤ 2^24 and numpy.percentile(row, 100 p) above (cast back
    to x's dtype).
    """
    if x.dim() != 2:
        raise ValueError(f"group_quantiles expects a (groups, elements) matrix, got shape {tuple(x.shape)}")
    n = x.shape[1]
    below, above, w = _ranks(n, probs)
    idx = torch.cat([below, above])
    stats = _order_stats(x, idx)
    k = len(probs)
    lo, hi = stats[:, :k], stats[:, k:]
    if w.dtype == torch.float64:  # numpy fallback: float64 lerp, then back to x's dtype
        lo64, hi64 = lo.double(), hi.double()
        return torch.lerp(lo64, hi64, w.to(x.device)[None, :].expand_as(lo64)).to(x.dtype)
    return torch.lerp(lo, hi, w.to(x.device, x.dtype)[None, :].expand_as(lo))


def _candidate_mse(x: torch.Tensor, n_cand: int, err_fn) -> torch.Tensor:
    """(G, P) mean of err_fn(chunk, rows, c, buf)² per row and candidate, float64.

    x is walked in cache-sized chunks (rows, or columns of a single long row) and every candidate is
    scored on a chunk while it is in cache; `err_fn` writes Q_c(chunk) − chunk into `buf`.
    """
    G, n = x.shape
    total = torch.zeros(G, n_cand, dtype=torch.float64, device=x.device)
    col_step = min(n, _CHUNK)
    row_step = max(1, _CHUNK // col_step)
    buf = torch.empty(min(G, row_step) * col_step, dtype=x.dtype, device=x.device)
    for i in range(0, G, row_step):
        rows = slice(i, i + row_step)
        for j in range(0, n, col_step):
            xs = x[rows, j:j + col_step]
            b = buf[:xs.numel()].view(xs.shape)
            for c in range(n_cand):
                err_fn(xs, rows, c, b)
                total[rows, c] += b.mul_(b).sum(1)
    return total / n


def _uniform_error(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """fake_quant_affine(x) − x for an integer zero-point, in place in `out` (no other allocation)."""
    if scale.numel() == 1:  # scalar bounds take torch's fast clamp path
        scale, zp = float(scale), float(zp)
    t = torch.div(x, scale, out=out) if out is not None else x / scale
    t.round_()
    t.clamp_(min=-zp, max=(2 ** bits - 1) - zp)  # round(x/s) + z clamped to [0, 2^b−1], minus z
    t.mul_(scale)
    return t.sub_(x)


def _log_sqrt2_error(x: torch.Tensor, scale: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """fake_quant_log_sqrt2(x) − x, in place in `out`."""
    level = torch.div(x, scale, out=out) if out is not None else x / scale
    level.log2_().mul_(-2.0).round_()
    under = level >= 2 ** bits
    level.clamp_(0, 2 ** bits - 1).mul_(-0.5).exp2_().mul_(scale)
    level.masked_fill_(under, 0.0)
    return level.sub_(x)


def _pick_first_best(scores: torch.Tensor, init: float = 1e10) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (G, P) -> (index of the first strictly-best candidate per row, found mask).

    Equivalent to `best = init; for c: if score[c] < best: take c` (NaN scores never win).
    """
    s = torch.where(torch.isnan(scores), torch.full_like(scores, float("inf")), scores)
    best = s.argmin(dim=1)  # first index among equal minima
    found = s.gather(1, best[:, None])[:, 0] < init
    return best, found


@torch.no_grad()
def search_uniform_percentile(x: torch.Tensor, bits: int, probs: Sequence[float],
                              min_scale: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row asymmetric (scale, zero-point) of x (G, n) chosen from a percentile grid by MSE.

    Candidate c: hi = q(x, p_c), lo = q(x, 1 − p_c), Δ = (hi − lo)/(2^b − 1), z = round(−lo/Δ);
    score = mean((x − Q(x))²); the first candidate with the smallest score wins (RepQ-ViT order).
    Returns float32 tensors of shape (G,).
    """
    x = x.float()
    k = len(probs)
    # lower levels exactly as the references write them: torch.quantile(x, 1.0 - pct) with a Python float
    # (1 − 0.99 = 0.010000000000000009, rounded to float32 by torch) and, above 2^24 elements,
    # np.percentile(x, (1 - pct) * 100); `_ranks` reproduces both from these values
    q = group_quantiles(x, list(probs) + [1.0 - p for p in probs])  # one sort / tail pass for both ends
    q_hi, q_lo = q[:, :k], q[:, k:]
    levels = 2 ** bits - 1
    scale = ((q_hi - q_lo) / levels).clamp_min(min_scale)  # (G, P)
    zp = torch.round(-q_lo / scale)
    scores = _candidate_mse(x, len(probs), lambda xs, rows, c, buf: _uniform_error(
        xs, scale[rows, c:c + 1], zp[rows, c:c + 1], bits, out=buf))
    best, found = _pick_first_best(scores)
    s = scale.gather(1, best[:, None])[:, 0]
    z = zp.gather(1, best[:, None])[:, 0]
    if not bool(found.all()):  # degenerate rows (all scores ≥ 1e10 or NaN): fall back to min/max
        lo, hi = x.amin(1), x.amax(1)
        s_mm = ((hi - lo) / levels).clamp_min(min_scale)
        s = torch.where(found, s, s_mm)
        z = torch.where(found, z, torch.round(-lo / s_mm))
    return s, z


@torch.no_grad()
def search_log_sqrt2_percentile(x: torch.Tensor, bits: int, probs: Sequence[float]) -> torch.Tensor:
    """Scale s of the log-sqrt2 quantizer for a whole tensor: s = quantile(x, p) with the best MSE.

    The reference default (no candidate better than 1e10) is s = max(x). Returns a (1,) tensor.
    """
    flat = x.float().reshape(1, -1)
    cands = group_quantiles(flat, probs)[0]  # (P,)
    scores = _candidate_mse(flat, len(probs), lambda xs, rows, c, buf: _log_sqrt2_error(xs, cands[c], bits, out=buf))[0]
    best, found = _pick_first_best(scores[None, :])
    s = cands[best[0]] if bool(found[0]) else flat.max()
    return s.reshape(1)
