"""Search primitives of APHQ-ViT's calibration (aphq spec §2.4, §2.5): candidate grids, the
reference's quantile semantics, and exact-but-fast argmin engines.

Candidate grids (all asymmetric, zero-point rounded; b bits, L = 2^b − 1):

* linear weight, per output row, and per-tensor / per-channel activations ("zp × range grid"):
  Δmin = q0.9 − q0.1, Δmax = max − min; num_zp = min(16, 2^b), num_scale = eq_n / num_zp;
  s_j = (Δmin + j/(num_scale − 1)·(Δmax − Δmin)) / L,  z ∈ {2^(b−1) − num_zp/2, …, 2^(b−1) + num_zp/2 − 1};
  candidate k = (zp k // num_scale, scale k mod num_scale). Activation scales are clamped to ≥ 1e-4.
* attention matmul operands, per head: u_i = u0.99 + i/eq_n·(u0.99999 − u0.99),
  l_i = l0.00001 + i/eq_n·(l0.01 − l0.00001), s = (u − l)/L, z = −round(l/s).
* patch-embed conv weight, per row: pct_i = 0.99 + (0.9999 − 0.99)(i/127)^0.5, u = q(pct), l = q(1 − pct).

Quantiles follow torch.quantile (linear interpolation; p rounded to float32, rank p·(n−1) in float64,
float32 lerp weight). The reference cannot take torch.quantile of more than 2^24 elements, so it views
the data as (m, −1) with m the smallest power of two that works and AVERAGES the m chunk quantiles
(`chunk_count`); `quantiles(..., chunk_average=True)` replicates that, False gives exact quantiles.
Order statistics of long rows are found by a histogram selection (O(n), exact) instead of a sort.

Argmin engines (same math as the reference's exhaustive loops, different summation order):

* `pruned_argmin`: the errors the reference sums are sums of non-negative per-sample terms, so a
  candidate whose partial sum over some samples already exceeds the full error of another candidate
  can never win. Candidates are evaluated on a growing prefix of the samples and dropped as soon as
  that happens (branch and bound). The result is the exact argmin (first index on ties).
* `LeftOperandSearch`: errors Σ‖Q(L)·R − Y‖² of quantizing the left operand L of a product, per group
  (1 group for a linear's input, one per head for attention). When L's inner dimension k is smaller
  than R's width m it uses ‖r + δR‖² = ‖r‖² + 2⟨δ, rRᵀ⟩ + δ(RRᵀ)δᵀ with δ = Q(L) − L, r = LR − Y
  (cost k² instead of k·m per row); right operands are searched as left operands of the transpose.
* `weight_output_errors`: per-row output errors of weight candidates through the Gram matrix of the
  (quantized) input: ‖X̂ŵ + b − y‖² = const + 2eᵀX̂ᵀρ + eᵀ(X̂ᵀX̂)e with e = ŵ − w, ρ = X̂w + b − y.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from common.quant.primitives import fake_quant_affine

__all__ = ["QUANTILE_MAX", "chunk_count", "order_statistics", "quantiles", "GridCandidates", "zp_scale_grid",
           "weight_grid", "activation_grid", "matmul_bounds", "pair_qparams", "conv_percentiles",
           "pruned_argmin", "sample_chunks", "self_errors", "quant_delta", "LeftOperandSearch", "weight_output_errors",
           "CAND_BUDGET"]

#: Longest row torch.quantile accepts; above it the reference splits into chunks and averages.
QUANTILE_MAX = 2 ** 24
#: Elements per candidate batch in the vectorised evaluations (bounds memory to a few hundred MB).
CAND_BUDGET = 1 << 20


# --------------------------------------------------------------------------- quantiles


def chunk_count(n: int) -> int:
    """The reference's m: the smallest power of two such that a length-n row viewed as (m, n/m) has
    rows torch.quantile accepts (n/m ≤ 2^24; the view needs m | n)."""
    m = 1
    while n % m or n // m > QUANTILE_MAX:
        m *= 2
        if m > n:
            raise ValueError(f"cannot split {n} elements into power-of-two chunks of at most 2^24")
    return m


def _select_in_row(x: torch.Tensor, ks: list[int], bins: int = 2048) -> list[torch.Tensor]:
    """Exact k-th smallest values (0-based ranks `ks`) of a 1-D tensor by histogram selection."""
    n = x.numel()
    out: dict[int, torch.Tensor] = {}
    lo, hi = x.min(), x.max()
    for k in ks:
        if k == 0:
            out[k] = lo
        elif k == n - 1:
            out[k] = hi
    rest = sorted({k for k in ks if k not in out})
    if not rest:
        return [out[k] for k in ks]
    if n <= 1 << 16 or not bool(hi > lo):
        srt = torch.sort(x).values
        for k in rest:
            out[k] = srt[k]
        return [out[k] for k in ks]
    # bin index is a monotone function of x, so order statistics can be located bin by bin
    width = float(bins) / float(hi - lo)
    idx = ((x - lo) * width).to(torch.int64).clamp_(0, bins - 1)
    cum = torch.bincount(idx, minlength=bins).cumsum(0)
    targets = torch.searchsorted(cum, torch.tensor(rest, device=cum.device), right=True)
    for b in targets.unique().tolist():
        members = x[idx == b]
        before = int(cum[b - 1]) if b > 0 else 0
        srt = torch.sort(members).values
        for k, t in zip(rest, targets.tolist()):
            if t == b:
                out[k] = srt[k - before]
    return [out[k] for k in ks]


def order_statistics(x: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """x (G, n) → (G, len(ranks)): the values at sorted positions `ranks` of every row (exact)."""
    g, n = x.shape
    ks = [int(k) for k in ranks]
    if n <= 1 << 16:
        srt = torch.sort(x, dim=1).values
        return srt[:, torch.tensor(ks, device=x.device)]
    rows = [torch.stack(_select_in_row(x[i], ks)) for i in range(g)]
    return torch.stack(rows)


def _torch_quantile_rows(x: torch.Tensor, probs: Sequence[float]) -> torch.Tensor:
    """torch.quantile(x, probs, dim=1) (linear) for x (G, n) as (G, P), via order statistics."""
    n = x.shape[1]
    q = torch.tensor(list(probs), dtype=torch.float32).double()
    r = q * float(n - 1)
    below = r.floor().long().clamp(0, n - 1)
    above = r.ceil().long().clamp(0, n - 1)
    w = (r - below.double()).float().to(x.device)
    stats = order_statistics(x, below.tolist() + above.tolist())
    lo, hi = stats[:, :len(probs)], stats[:, len(probs):]
    return torch.lerp(lo, hi, w[None, :].expand_as(lo))


def quantiles(x: torch.Tensor, probs: Sequence[float], chunk_average: bool = True) -> torch.Tensor:
    """Quantiles of each row of x (G, n) → (G, P), as the reference computes them.

    With `chunk_average` (the reference), rows longer than 2^24 are viewed as (m, n/m) contiguous
    chunks (m from `chunk_count`) and the m chunk quantiles are averaged, max and min included.
    Without it the quantile is exact (torch semantics at any length).
    """
    x = x.float()
    g, n = x.shape
    m = chunk_count(n) if chunk_average else 1
    qs = _torch_quantile_rows(x.reshape(g * m, n // m), probs)
    return qs.reshape(g, m, -1).mean(1) if m > 1 else qs


# --------------------------------------------------------------------------- candidate grids


@dataclass
class GridCandidates:
    """A zp × scale grid per group: `scales` (G, num_scale), `zps` (num_zp,); candidate k ↦
    (zps[k // num_scale], scales[:, k % num_scale])."""

    scales: torch.Tensor
    zps: torch.Tensor

    @property
    def num_scale(self) -> int:
        return self.scales.shape[1]

    def __len__(self) -> int:
        return self.num_scale * self.zps.numel()

    def params(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate indices (C,) → scale (C, G), zp (C, G) (the same zp for every group)."""
        idx = idx.to(self.scales.device)
        s = self.scales[:, idx % self.num_scale].T
        z = self.zps[idx // self.num_scale][:, None].expand_as(s)
        return s, z

    def select(self, best: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group chosen candidates (G,) → scale (G,), zp (G,)."""
        best = best.to(self.scales.device)
        s = self.scales.gather(1, (best % self.num_scale)[:, None])[:, 0]
        return s, self.zps[best // self.num_scale].to(s.dtype)


def zp_scale_grid(q_hi: torch.Tensor, q_max: torch.Tensor, q_lo: torch.Tensor, q_min: torch.Tensor, bits: int,
                  eq_n: int = 128, min_scale: float | None = None) -> GridCandidates:
    """The fixed zp × range grid from per-group quantiles q0.9, max, q0.1, min (each (G,))."""
    num_zp = min(16, 2 ** bits)
    num_scale = eq_n // num_zp
    d_min = (q_hi - q_lo)[:, None]
    d_max = (q_max - q_min)[:, None]
    ratio = torch.tensor([j / (num_scale - 1) for j in range(num_scale)], dtype=torch.float32,
                         device=q_hi.device)[None, :]
    scales = (d_min + ratio * (d_max - d_min)) / (2 ** bits - 1)
    if min_scale is not None:
        scales = scales.clamp_min(min_scale)
    n_levels = 2 ** (bits - 1)
    zps = torch.arange(n_levels - num_zp // 2, n_levels + num_zp // 2, dtype=torch.float32, device=q_hi.device)
    return GridCandidates(scales, zps)


def weight_grid(w: torch.Tensor, bits: int, eq_n: int = 128) -> GridCandidates:
    """Per-output-row grid of a weight (rows, ...) (spec §2.4 step 1)."""
    w2 = w.detach().reshape(w.shape[0], -1).float()
    q = torch.quantile(w2, torch.tensor([0.9, 1.0, 0.1, 0.0], device=w2.device), dim=1)
    grid = zp_scale_grid(q[0], q[1], q[2], q[3], bits, eq_n)
    grid.scales = grid.scales.clamp_min(1e-8)  # guards constant rows (the reference would divide by 0)
    return grid


def activation_grid(x: torch.Tensor, bits: int, eq_n: int = 128, per_channel: bool = False,
                    chunk_average: bool = True) -> GridCandidates:
    """Per-tensor grid from quantiles of the flattened input, or per-channel (last dim) for the
    LayerNorm reparameterization (spec §2.4 step 2, §2.5 step 1); scales clamped to ≥ 1e-4."""
    x = x.detach().float()
    rows = x.reshape(-1, x.shape[-1]).T if per_channel else x.reshape(1, -1)
    q = quantiles(rows, [0.9, 1.0, 0.1, 0.0], chunk_average and not per_channel)
    return zp_scale_grid(q[:, 0], q[:, 1], q[:, 2], q[:, 3], bits, eq_n, min_scale=1e-4)


def matmul_bounds(x: torch.Tensor, eq_n: int = 128, chunk_average: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head linear candidate bounds of an attention operand (B, H, ...): u, l of shape (eq_n+1, H).

    u_i = u0.99 + i/eq_n (u0.99999 − u0.99), l_i = l0.00001 + i/eq_n (l0.01 − l0.00001).
    """
    h = x.shape[1]
    rows = x.detach().float().transpose(0, 1).reshape(h, -1)
    q = quantiles(rows, [0.99, 0.99999, 0.01, 0.00001], chunk_average)  # (H, 4)
    i = torch.tensor([k / eq_n for k in range(eq_n + 1)], dtype=torch.float32, device=x.device)[:, None]
    u = q[None, :, 0] + i * (q[None, :, 1] - q[None, :, 0])
    lo = q[None, :, 3] + i * (q[None, :, 2] - q[None, :, 3])
    return u, lo


def pair_qparams(u: torch.Tensor, lo: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zp) of the range [l, u]: s = (u − l)/(2^b − 1), z = −round(l/s) (elementwise)."""
    s = ((u - lo) / (2 ** bits - 1)).clamp_min(1e-8)  # clamp only guards degenerate (constant) groups
    return s, -torch.round(lo / s)


def conv_percentiles(w: torch.Tensor, n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (u, l) candidates of the patch-embed conv weight: each (n, rows)."""
    pct = [0.99 + (0.9999 - 0.99) * (i / (n - 1)) ** 0.5 for i in range(n)]
    w2 = w.detach().reshape(w.shape[0], -1).float()
    qs = torch.quantile(w2, torch.tensor(pct + [1 - p for p in pct], device=w2.device), dim=1)
    return qs[:n], qs[n:]


# --------------------------------------------------------------------------- argmin engines


def sample_chunks(n: int, per_sample: int = 1, min_elems: int = 1 << 16, min_total: int = 1 << 20
                  ) -> list[tuple[int, int]]:
    """Growing contiguous sample ranges covering [0, n) for branch and bound: ~n/32, n/32, n/16, ….

    `per_sample` is the work per sample and candidate (elements); chunks hold at least `min_elems`
    of it, and small problems (< `min_total` per candidate) are not split (pruning would not pay).
    """
    if n * per_sample < min_total:
        return [(0, n)]
    step = max(1, n // 32, -(-min_elems // max(per_sample, 1)))
    out, lo = [], 0
    while lo < n:
        hi = min(n, lo + step)
        out.append((lo, hi))
        lo = hi
        if len(out) >= 2:
            step *= 2
    return out


def pruned_argmin(n_cand: int, n_groups: int, chunks: Sequence[tuple[int, int]],
                  evaluate: Callable[[torch.Tensor, int, int], torch.Tensor]) -> torch.Tensor:
    """Exact per-group argmin over candidates of errors that are sums of non-negative per-sample terms.

    Args:
        n_cand, n_groups: candidates are 0..n_cand−1, each scored for every group.
        chunks: sample ranges partitioning the data (`sample_chunks`).
        evaluate: (candidate indices (C,), lo, hi) → float64 (C, n_groups) partial errors on samples [lo, hi).

    Returns:
        (n_groups,) winning candidate per group (the first one among equal minima).

    Branch and bound: after the first chunk, the per-group best candidates are evaluated on all data
    (their full errors U_g bound the optimum); the others go on chunk by chunk and are dropped for a
    group once their partial error exceeds U_g, which their full error then also does.
    """
    all_idx = torch.arange(n_cand)
    part = evaluate(all_idx, *chunks[0]).double().cpu()
    if len(chunks) == 1:
        return _first_argmin(part)
    seeds = part.argmin(0).unique()
    for lo, hi in chunks[1:]:
        part[seeds] += evaluate(seeds, lo, hi).double().cpu()
    is_seed = torch.zeros(n_cand, dtype=torch.bool)
    is_seed[seeds] = True
    bound = part[seeds].min(0).values  # (G,) full errors of the best seeds
    alive = (part <= bound[None, :]) & ~is_seed[:, None]
    for lo, hi in chunks[1:]:
        idx = alive.any(1).nonzero()[:, 0]
        if idx.numel() == 0:
            break
        part[idx] += evaluate(idx, lo, hi).double().cpu()
        alive[idx] &= part[idx] <= bound[None, :]
    final = torch.where(alive | is_seed[:, None], part, torch.full_like(part, float("inf")))
    return _first_argmin(final)


def _first_argmin(err: torch.Tensor) -> torch.Tensor:
    """Per-column argmin, first index among ties, NaN never wins."""
    err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    best = err.min(0, keepdim=True).values
    hit = err == best
    return hit.to(torch.int8).argmax(0)


def _cand_batch(per_cand: int) -> int:
    return max(1, CAND_BUDGET // max(per_cand, 1))


def quant_delta(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int,
                delta: bool = True) -> torch.Tensor:
    """Q(x) − x (or Q(x) with `delta=False`) for broadcastable candidate parameters, in one buffer.

    Q(x) = (clamp(round(x/s) + z, 0, 2^b − 1) − z)·s, computed in place in one buffer instead of the
    primitive's temporaries (same values). z must already be rounded (all APHQ candidates are).
    """
    t = torch.div(x, scale)
    t.round_().add_(zp).clamp_(0, 2 ** bits - 1).sub_(zp)
    t.mul_(scale)
    return t.sub_(x) if delta else t


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of (B, X) views as float64 (B,), without a product temporary."""
    return torch.linalg.vecdot(a, b).double()


def self_errors(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """Σ (Q(x) − x)² per candidate and group.

    Args:
        x: (S, G, n) data; groups share nothing (a weight row, a channel, the whole tensor).
        scale, zp: (C, G) candidate parameters.
    Returns:
        float64 (C, G) sums over samples and elements.
    """
    xg = x.transpose(0, 1).reshape(x.shape[1], 1, -1)  # (G, 1, S·n)
    g, per = xg.shape[0], xg.shape[2]
    out = []
    step = _cand_batch(g * per)
    for i in range(0, scale.shape[0], step):
        s = scale[i:i + step].T[:, :, None]  # (G, c, 1)
        z = zp[i:i + step].T[:, :, None]
        d = quant_delta(xg, s, z, bits)  # (G, c, S·n)
        c = d.shape[1]
        out.append(_dot(d.reshape(g * c, per), d.reshape(g * c, per)).reshape(g, c).T)
    return torch.cat(out)


class LeftOperandSearch:
    """Errors of quantizing the left operand of a product, for candidate (scale, zp) per group.

    Args:
        left: (S, G, n, k) FP left operand (samples, groups, rows, inner).
        right: (S or 1, G or 1, k, m) right operand, already in its final (quantized) form.
        target: (S, G, n, m) FP output the product is compared with (bias already removed).
        bits: bits of the left operand's quantizer.
        metric: "mse" (sum of squares) or "mae" (sum of absolute values).

    `errors(scale, zp, lo, hi)` → float64 (C, G) error sums over samples [lo, hi) for candidates
    (C, G). With mse and k < m the Gram form Σ ‖r‖² + ⟨δ, δM + 2g⟩ is used (δ = Q(L) − L, r = LR − Y,
    g = rRᵀ, M = RRᵀ). Data are stored group-first so every reduction is a batched dot product.
    """

    def __init__(self, left: torch.Tensor, right: torch.Tensor, target: torch.Tensor, bits: int,
                 metric: str = "mse"):
        if metric not in ("mse", "mae"):
            raise ValueError(f"calib_metric must be 'mse' or 'mae', got {metric!r}")
        self.bits, self.metric = bits, metric
        k, m = left.shape[-1], right.shape[-1]
        self.gram = metric == "mse" and k < m
        self.left = left.transpose(0, 1).contiguous()  # (G, S, n, k)
        self.right = right.transpose(0, 1)  # (G|1, S|1, k, m)
        if self.gram:
            r = left @ right - target
            rt = right.transpose(-1, -2)
            self.base = r.pow(2).sum((2, 3), dtype=torch.float64).T.contiguous()  # (G, S)
            self.g2 = (2 * (r @ rt)).transpose(0, 1).contiguous()  # (G, S, n, k)
            self.m = (right @ rt).transpose(0, 1)  # (G|1, S|1, k, k)
        else:
            self.target = target.transpose(0, 1).contiguous()  # (G, S, n, m)

    @staticmethod
    def _rows(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return t[:, lo:hi] if t.shape[1] > 1 else t

    @staticmethod
    def _times(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """q (G, s, c, n, k) @ r (G|1, s|1, k, m) → (G, s, c, n, m) as one (batched) GEMM: candidates are
        stacked into the rows, so the right operand is never copied per candidate."""
        g, s, c, n, k = q.shape
        m = r.shape[-1]
        if r.shape[1] == 1:  # shared by all samples (a linear's weight)
            if r.shape[0] == 1:
                return (q.view(-1, k) @ r[0, 0]).view(g, s, c, n, m)
            return torch.bmm(q.view(g, s * c * n, k), r[:, 0]).view(g, s, c, n, m)
        rb = r.expand(g, s, k, m).reshape(g * s, k, m)
        return torch.bmm(q.view(g * s, c * n, k), rb).view(g, s, c, n, m)

    def errors(self, scale: torch.Tensor, zp: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        left = self.left[:, lo:hi, None]  # (G, s, 1, n, k)
        g = left.shape[0]
        per = left[0].numel() * (2 if self.gram else 1 + self.right.shape[-1] // left.shape[-1])
        step = _cand_batch(g * per)
        out = []
        for i in range(0, scale.shape[0], step):
            s = scale[i:i + step].T[:, None, :, None, None]  # (G, 1, c, 1, 1)
            z = zp[i:i + step].T[:, None, :, None, None]
            if self.gram:
                d = quant_delta(left, s, z, self.bits)  # (G, s, c, n, k)
                v = self._times(d, self._rows(self.m, lo, hi)).add_(self.g2[:, lo:hi, None])
                e = torch.linalg.vecdot(d, v).sum((1, 3), dtype=torch.float64)  # (G, c)
                e += self.base[:, lo:hi].sum(1, keepdim=True)
            else:
                q = quant_delta(left, s, z, self.bits, delta=False)
                o = self._times(q, self._rows(self.right, lo, hi)).sub_(self.target[:, lo:hi, None])
                e = (torch.linalg.vecdot(o, o) if self.metric == "mse" else o.abs().sum(-1)).sum(
                    (1, 3), dtype=torch.float64)
            out.append(e.T)
        return torch.cat(out)


def weight_output_errors(w: torch.Tensor, bias: torch.Tensor | None, x_hat: torch.Tensor, y: torch.Tensor,
                         scale: torch.Tensor, zp: torch.Tensor, bits: int, metric: str = "mse",
                         token_chunk: int = 1 << 14) -> torch.Tensor:
    """Per-row output errors Σ_t (x̂_t·ŵ_k + b_k − y_tk)² of weight candidates (up to a per-row constant).

    Args:
        w: (rows, in) FP weight; bias: (rows,) or None.
        x_hat: (T, in) input as the layer sees it (already quantized); y: (T, rows) FP output.
        scale, zp: (C, rows) candidates.
    Returns:
        float64 (C, rows). With mse the Gram form is used (exact up to a per-row constant, which does
        not change the argmin); mae evaluates outputs directly.
    """
    rows, k = w.shape
    b = torch.zeros(rows, device=w.device) if bias is None else bias.detach()
    if metric == "mse":
        gram = torch.zeros(k, k, dtype=torch.float64, device=w.device)
        proj = torch.zeros(k, rows, dtype=torch.float64, device=w.device)
        for i in range(0, x_hat.shape[0], token_chunk):
            xc = x_hat[i:i + token_chunk]
            rho = torch.addmm(b, xc, w.T).sub_(y[i:i + token_chunk])
            gram += (xc.T @ xc).double()
            proj += (xc.T @ rho).double()
        gram32, proj32 = gram.float(), proj.float().T  # (k, k), (rows, k)
        out = []
        step = _cand_batch(rows * k * 2)
        for i in range(0, scale.shape[0], step):
            e = quant_delta(w[None], scale[i:i + step, :, None], zp[i:i + step, :, None], bits)  # (c, rows, k)
            v = (e @ gram32).add_(proj32[None], alpha=2)
            c = e.shape[0]
            out.append(_dot(e.reshape(c * rows, k), v.reshape(c * rows, k)).reshape(c, rows))
        return torch.cat(out)
    if metric != "mae":
        raise ValueError(f"calib_metric must be 'mse' or 'mae', got {metric!r}")
    out = []
    for c in range(scale.shape[0]):
        w_c = fake_quant_affine(w, scale[c][:, None], zp[c][:, None], bits)
        acc = torch.zeros(rows, dtype=torch.float64, device=w.device)
        for i in range(0, x_hat.shape[0], token_chunk):
            acc += torch.addmm(b, x_hat[i:i + token_chunk], w_c.T).sub_(y[i:i + token_chunk]).abs_().sum(
                0, dtype=torch.float64)
        out.append(acc)
    return torch.stack(out)

