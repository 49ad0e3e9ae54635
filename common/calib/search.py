"""Exact error engines and quantile helpers of the calibration searches (grid / beam searches over
per-group (scale, zero-point) candidates), shared by the methods.

Moved here from `aphq/search.py` (same code) so that every method can drive them (APHQ, FIMA-Q,
AdaLog's FPCS); the candidate grids are in `common.calib.grids`.

* `quantiles(x, probs, chunk_average)`: torch.quantile semantics (linear interpolation; p rounded to
  float32, rank p·(n−1) in float64, float32 lerp weight) via exact order statistics; with
  `chunk_average` rows longer than 2^24 are viewed as (m, n/m) chunks whose quantiles are averaged (the
  APHQ / AdaLog references' workaround for torch.quantile's old size limit). `reference_levels`: the
  references' lower levels 1 − float32(p).
* `self_errors`: Σ (Q(x) − x)² per candidate and group.
* `LeftOperandSearch`: Σ‖Q(L)·R − Y‖² of quantizing the left operand of a product, per group (Gram
  form ‖r‖² + ⟨δ, δM + 2g⟩ when the inner dimension is the smaller one).
* `weight_output_errors`: per-row output errors of weight candidates through the input's Gram matrix.
All sums are float64; candidates are batched to bound memory (`CAND_BUDGET` elements per batch).
"""
from __future__ import annotations

from typing import Sequence

import torch

from common.calib.kernels import fake_quant as _fused_fake_quant
from common.calib.threads import ThreadBuffers, map_pieces, sample_pieces
from common.quant.primitives import fake_quant_affine

__all__ = ["QUANTILE_MAX", "CAND_BUDGET", "chunk_count", "order_statistics", "reference_levels", "quantiles",
           "quant_delta", "self_errors", "LeftOperandSearch", "weight_output_errors"]

#: Longest row torch.quantile accepts; above it the reference splits into chunks and averages.
QUANTILE_MAX = 2 ** 24
#: Elements per candidate batch in the vectorised evaluations (bounds memory to a few hundred MB).
CAND_BUDGET = 1 << 20
#: Sample ranges per group of `LeftOperandSearch.errors` (the units of work of the thread pool; fixed,
#: so the sums do not depend on the thread count).
PIECES = 4
#: Gram-form searches in pieces on the thread pool too (off: one batched call with OpenMP threads).
THREADED_GRAM = True


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


def reference_levels(upper: Sequence[float]) -> list[float]:
    """The reference's quantile levels for upper bounds `pct`: pct + (1 − pct), both as it forms them.

    The reference writes `pct = torch.tensor([...])` (float32) and takes `torch.quantile(x, 1 - pct)`,
    so each lower level is 1 − float32(p) computed in float32 (exact: Sterbenz), not float32(1 − p).
    """
    pct = torch.tensor(list(upper), dtype=torch.float32)
    return pct.tolist() + (1 - pct).tolist()


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


_BUFS = ThreadBuffers()


def candidates_delta(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int,
                     delta: bool = True) -> torch.Tensor:
    """`quant_delta` of x (G, S, E) for candidates scale / zp (G, C) → (G, S, C, E), the same values.

    On CPU one fused pass (`common.calib.kernels.fake_quant`, bit-identical to the torch ops) into a
    reused buffer of this thread (valid until its next call); elsewhere the torch ops.
    """
    g, n_s, e = x.shape
    c = scale.shape[1]
    if x.device.type != "cpu":
        return quant_delta(x[:, :, None], scale[:, None, :, None], zp[:, None, :, None], bits, delta)
    out = _BUFS.get("delta", (g, n_s, c, e), torch.float32)
    _fused_fake_quant(x.float().contiguous().numpy(), scale.float().contiguous().numpy(),
                      zp.float().contiguous().numpy(), float(2 ** bits - 1), delta, out.numpy())
    return out


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
        d = candidates_delta(xg, scale[i:i + step].T, zp[i:i + step].T, bits)[:, 0]  # (G, c, S·n)
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
        stacked into the rows, so the right operand is never copied per candidate. The product goes to
        a reused buffer of this thread (valid until the next call)."""
        g, s, c, n, k = q.shape
        m = r.shape[-1]
        # reshape, not view: with one sample the broadcast quantizer output can come back in a
        # non-contiguous layout (size-1 dims), where reshape copies; otherwise it is the same view
        if r.shape[1] == 1 and r.shape[0] == 1:  # one matrix for all (a linear's weight, one sample)
            a, b = q.reshape(-1, k), r[0, 0]
        elif r.shape[1] == 1:  # one per group, shared by all samples
            a, b = q.reshape(g, s * c * n, k), r[:, 0]
        else:
            a, b = q.reshape(g * s, c * n, k), r.expand(g, s, k, m).reshape(g * s, k, m)
        out = _BUFS.get("product", a.shape[:-1] + (m,), torch.float32) if q.device.type == "cpu" else None
        return torch.matmul(a, b, out=out).view(g, s, c, n, m)

    def errors(self, scale: torch.Tensor, zp: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """float64 (C, G) error sums over samples [lo, hi) for candidates (C, G).

        Computed in (group, sample range) pieces (`PIECES` ranges, fixed) on
        `common.calib.threads.map_pieces`, their partial sums added in a fixed order.
        """
        groups = self.left.shape[0]
        if self.gram and not THREADED_GRAM:  # one batched call: large GEMMs that OpenMP spreads well
            return self._piece(scale, zp, 0, groups, lo, hi)
        tasks = [(g, a, b) for g in range(groups) for a, b in sample_pieces(lo, hi, PIECES)]
        parts = map_pieces(lambda t: self._piece(scale[:, t[0]:t[0] + 1], zp[:, t[0]:t[0] + 1], t[0], t[0] + 1,
                                                 *t[1:]), tasks)
        out = torch.zeros(scale.shape[0], groups, dtype=torch.float64, device=scale.device)
        for (g, _, _), part in zip(tasks, parts):
            out[:, g] += part[:, 0]
        return out

    def _piece(self, scale: torch.Tensor, zp: torch.Tensor, g0: int, g1: int, lo: int, hi: int) -> torch.Tensor:
        """Errors (C, g1 − g0) of groups [g0, g1) over samples [lo, hi)."""
        gs = slice(g0, g1)

        def grp(t: torch.Tensor) -> torch.Tensor:
            return t[gs] if t.shape[0] > 1 else t

        left = self.left[gs, lo:hi]  # (g, s, n, k)
        g, ns, n, k = left.shape
        per = left.numel() * (2 if self.gram else 1 + self.right.shape[-1] // k)
        step = _cand_batch(per)
        flat = left.reshape(g, ns, n * k)
        out = []
        for i in range(0, scale.shape[0], step):
            s, z = scale[i:i + step].T, zp[i:i + step].T  # (g, c)
            c = s.shape[1]
            if self.gram:
                d = candidates_delta(flat, s, z, self.bits).view(g, ns, c, n, k)
                v = self._times(d, self._rows(grp(self.m), lo, hi)).add_(self.g2[gs, lo:hi, None])
                # ⟨δ, v⟩ row by row: vecdot's product and float32 row sums, with the product in place
                e = v.mul_(d).sum(-1).sum((1, 3), dtype=torch.float64)  # (g, c)
                e += self.base[gs, lo:hi].sum(1, keepdim=True)
            else:
                q = candidates_delta(flat, s, z, self.bits, delta=False).view(g, ns, c, n, k)
                o = self._times(q, self._rows(grp(self.right), lo, hi)).sub_(self.target[gs, lo:hi, None])
                e = (o.mul_(o) if self.metric == "mse" else o.abs_()).sum(-1).sum((1, 3), dtype=torch.float64)
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
