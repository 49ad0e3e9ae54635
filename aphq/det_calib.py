"""APHQ-ViT's calibration on detectors (detection spec §3.4): every wrapped module, in `named_modules` order, is
calibrated on FP activations of one full detector forward per module (test path: backbone, FPN, RPN, RoI and
mask heads), independently of the others except through earlier LayerNorm reparameterisations.

Differences from classification APHQ (`common.calib.calibrate`), all from the reference's detection code:

* quantile grids at [0.999, 1.0] (Δmin = q0.999 − q0.001; classification 0.9), 8 scales × 16 zero-points;
* linears: weights per row by weight MSE; inputs per tensor by the **input's own MSE**, evaluated on the first
  slice along dim 0 only (`first_slice_selection`: the first window for qkv / proj, the image for fc1 / fc2 /
  reduction, the first RoI for RoI-head FCs) while the candidate ranges come from all the data; no output-error
  rounds. qkv / fc1 / reduction: per-channel search (first slice) → LayerNorm reparameterisation (rounded mean
  zero-point) → the per-tensor search again on the transformed input and the new weight;
* convs: zero-points restricted to {2^(b−2)·…}: 2^(b−1) zero-points centred on 2^(b−1), i.e. {4, …, 11} at 4 bits,
  with 16 scales (`conv_zp_restricted`); inputs (only below 8 bits; the patch-embed input is bypassed) by
  Σ over calls of mean((x − x̂)²), every call (FPN level of the RPN convs) weighing the same;
* matmuls, per head: percentile candidates p_i = 0.999 + (0.99999 − 0.999)(i/127)^0.1 (i < 128; the 129th,
  p = 1, is never evaluated), u_i = q(p_i), l_i = q(1 − p_i); start at index 127; A jointly, B jointly, then
  `search_rounds` rounds of (fix u search l, fix l search u) for A then B; the score Σ_windows mean_{N×N}
  (AB − ÂB̂)² per head.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from common.calib.calibrate import reparam_active
from common.calib.reparam import LN_SITES, prev_norm
from common.calib.grids import GridCandidates, activation_grid, pair_qparams, weight_grid
from common.calib.reparam import reparameterize_layernorm
from common.calib.search import quant_delta, quantiles, reference_levels, self_errors
from common.quant import QuantConv2d, QuantLinear, QuantMatMul, UniformQuantizer
from common.quant.granularity import PerTensor
from common.quant.primitives import fake_quant_affine
from common.quant.quantizers import quant_state
from common.quant.wrap import quant_layers
from common.errors import UserError
from common.settings import dataclass_from

__all__ = ["DetCalibConfig", "det_calib_config", "matmul_percentiles", "conv_num_zp", "calibrate_detector",
           "calibrate_linear_det", "calibrate_conv_det", "calibrate_matmul_det", "self_select", "LN_SITES"]
log = logging.getLogger(__name__)

_IGNORED = {"augment", "draw", "batch_size", "metric", "token_wise", "prune", "memo", "evaluate", "int_search"}


@dataclass
class DetCalibConfig:
    """Detection calibration settings (defaults: the reference's, spec §3.4).

    Attributes:
        n_images: calibration images (1; each at its own size).
        eq_n: candidates per grid / matmul percentiles (128).
        search_rounds: coordinate rounds of the matmul search (3).
        reparam, reparam_requires_equal_bits: LayerNorm reparameterisation of qkv / fc1 / reduction inputs, only
            when a_bit == w_bit (the reference's condition, on by default).
        chunk_average_quantile: average the quantiles of 2^24-element chunks (reference).
        first_slice_selection: select linear input candidates on x[0:1] only (reference); False: all of x.
        conv_zp_restricted: conv zero-points {2^(b−1) ± 2^(b−2)} (4…11 at 4 bits, reference); False: the linear
            grid's min(16, 2^b).
        quantile_upper: the quantile level of Δmin's upper bound (0.999; the lower is 1 − it).
        matmul_pct_lo, matmul_pct_hi, matmul_pct_power: the matmul percentile schedule.
    """

    n_images: int = 1
    eq_n: int = 128
    search_rounds: int = 3
    reparam: bool = True
    reparam_requires_equal_bits: bool = True
    chunk_average_quantile: bool = True
    first_slice_selection: bool = True
    conv_zp_restricted: bool = True
    quantile_upper: float = 0.999
    matmul_pct_lo: float = 0.999
    matmul_pct_hi: float = 0.99999
    matmul_pct_power: float = 0.1

    def __post_init__(self):
        if self.eq_n < 16 or self.eq_n % 16:
            raise UserError(f"calib.eq_n must be a positive multiple of 16, got {self.eq_n}")
        if not 0.5 < float(self.quantile_upper) < 1.0:
            raise UserError(f"calib.quantile_upper must be in (0.5, 1), got {self.quantile_upper}")


def det_calib_config(cfg: Any = None, **overrides) -> DetCalibConfig:
    return dataclass_from(DetCalibConfig, cfg, _IGNORED, "calib (detection)", **overrides)


def matmul_percentiles(n: int = 128, lo: float = 0.999, hi: float = 0.99999, power: float = 0.1) -> list[float]:
    """p_i = lo + (hi − lo)(i/(n−1))^power for i < n, then p_n = 1.0 (n + 1 values)."""
    return [lo + (hi - lo) * (i / (n - 1)) ** power for i in range(n)] + [1.0]


def conv_num_zp(bits: int, restricted: bool = True) -> int:
    """Zero-points of the conv grid: 2^(b−1) (APHQ detection, {4…11} at 4 bits) or min(16, 2^b)."""
    return 2 ** (bits - 1) if restricted else min(16, 2 ** bits)


def self_select(grid: GridCandidates, data: Sequence[torch.Tensor], bits: int, mean: bool = False) -> torch.Tensor:
    """Per-group first argmin over the grid of Σ_k err_k, err_k = Σ (Q(x) − x)² of sample k (S_k, G, n), or
    its mean over elements with `mean` (the conv input rule: every call weighs the same)."""
    idx = torch.arange(len(grid))
    s, z = grid.params(idx)
    total = None
    for x in data:
        e = self_errors(x.float(), s.to(x.device), z.to(x.device), bits)
        if mean:
            e = e / (x.shape[0] * x.shape[2])
        total = e if total is None else total + e
    return total.argmin(0)


def _uniform(q: nn.Module) -> UniformQuantizer | None:
    return q if isinstance(q, UniformQuantizer) and q.bits < 32 else None


def _upper(cfg: DetCalibConfig) -> tuple[float, float]:
    return (float(cfg.quantile_upper), 1.0)


def _weight(layer: nn.Module, cfg: DetCalibConfig, num_zp: int | None) -> None:
    wq = _uniform(layer.weight_quantizer)
    if wq is None:
        return
    w = layer.weight.detach().float()
    grid = weight_grid(w, wq.bits, cfg.eq_n, upper=_upper(cfg), num_zp=num_zp)
    s, z = grid.select(self_select(grid, [w.reshape(1, w.shape[0], -1)], wq.bits))
    shape = (-1,) + (1,) * (w.dim() - 1)
    wq.set_qparams(s.reshape(shape), z.reshape(shape))


def _stack(calls: list[torch.Tensor]) -> torch.Tensor:
    """Linear inputs of all calls concatenated on dim 0 (tokens flattened when the calls' shapes differ)."""
    if all(c.shape[1:] == calls[0].shape[1:] for c in calls):
        return torch.cat(calls).float()
    return torch.cat([c.reshape(-1, c.shape[-1]) for c in calls]).float()


def calibrate_linear_det(layer: QuantLinear, calls: list[torch.Tensor], cfg: DetCalibConfig,
                         norm: nn.LayerNorm | None = None) -> dict[str, Any]:
    """Weights per row, input per tensor (first-slice input MSE), after the LN reparameterisation with `norm`."""
    aq = _uniform(layer.input_quantizer)
    x = _stack(calls)
    first = calls[0][0:1].float() if cfg.first_slice_selection else x
    info: dict[str, Any] = {"reparam": False}
    if norm is not None and aq is not None:
        c = x.shape[-1]
        cgrid = activation_grid(x, aq.bits, cfg.eq_n, per_channel=True, upper=_upper(cfg))
        s_c, z_c = cgrid.select(self_select(cgrid, [first.reshape(-1, c).T[None]], aq.bits))
        rp = reparameterize_layernorm(norm, layer, s_c, z_c, round_mean_zero_point=True)
        x, first = rp.transform_input(x), rp.transform_input(first)
        aq.granularity = PerTensor()
        info["reparam"] = True
    _weight(layer, cfg, None)
    if aq is not None:
        grid = activation_grid(x, aq.bits, cfg.eq_n, chunk_average=cfg.chunk_average_quantile, upper=_upper(cfg))
        s, z = grid.select(self_select(grid, [first.reshape(1, 1, -1)], aq.bits))
        aq.set_qparams(s.reshape(1), z.reshape(1))
    return info


def calibrate_conv_det(layer: QuantConv2d, calls: list[torch.Tensor], cfg: DetCalibConfig) -> dict[str, Any]:
    """Weights per out-channel and (below 8 bits) the input per tensor, both on the restricted zp grid."""
    wq, aq = _uniform(layer.weight_quantizer), _uniform(layer.input_quantizer)
    if wq is not None:
        _weight(layer, cfg, conv_num_zp(wq.bits, cfg.conv_zp_restricted))
    if aq is not None and aq.bits < 8:
        flat = torch.cat([c.reshape(-1) for c in calls]).float()
        grid = activation_grid(flat[None], aq.bits, cfg.eq_n, chunk_average=cfg.chunk_average_quantile,
                               upper=_upper(cfg), num_zp=conv_num_zp(aq.bits, cfg.conv_zp_restricted))
        s, z = grid.select(self_select(grid, [c.reshape(1, 1, -1) for c in calls], aq.bits, mean=True))
        aq.set_qparams(s.reshape(1), z.reshape(1))
    return {"calls": len(calls)}


class _Operand:
    """Per-head percentile bounds (u_i, l_i) of one matmul operand (S, H, ·, ·) and its current indices."""

    def __init__(self, x: torch.Tensor, q: UniformQuantizer | None, cfg: DetCalibConfig):
        self.x, self.q = x, q
        if q is None:
            return
        pct = matmul_percentiles(cfg.eq_n, cfg.matmul_pct_lo, cfg.matmul_pct_hi, cfg.matmul_pct_power)
        h = x.shape[1]
        qs = quantiles(x.transpose(0, 1).reshape(h, -1), reference_levels(pct), cfg.chunk_average_quantile)
        self.u, self.l = qs[:, :len(pct)].T, qs[:, len(pct):].T  # (eq_n + 1, H)
        self.iu = torch.full((h,), cfg.eq_n - 1, dtype=torch.long)
        self.il = self.iu.clone()

    def params(self, iu: torch.Tensor, il: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = torch.arange(iu.shape[-1])
        return pair_qparams(self.u[iu, heads], self.l[il, heads], self.q.bits)

    def quantized(self, s: torch.Tensor | None = None, z: torch.Tensor | None = None) -> torch.Tensor:
        """The operand fake-quantized at (s, z) (C, H) → (C, S, H, ·, ·), or at its current indices (S, H, ·, ·)."""
        if self.q is None:
            return self.x
        if s is None:
            s, z = self.params(self.iu, self.il)
            return fake_quant_affine(self.x, s.view(1, -1, 1, 1), z.view(1, -1, 1, 1), self.q.bits)
        return quant_delta(self.x[None], s[:, None, :, None, None], z[:, None, :, None, None], self.q.bits, delta=False)


def calibrate_matmul_det(mm: QuantMatMul, a: torch.Tensor, b: torch.Tensor, cfg: DetCalibConfig,
                         budget: int = 1 << 25) -> dict[str, Any]:
    """Per-head percentile search of both operands (see the module docstring)."""
    a, b = a.float(), b.float()
    ops = {"A": _Operand(a, _uniform(mm.a_quantizer), cfg), "B": _Operand(b, _uniform(mm.b_quantizer), cfg)}
    y = a @ b
    h, n = a.shape[1], cfg.eq_n

    def errors(which: str, iu: torch.Tensor, il: torch.Tensor) -> torch.Tensor:
        op, other = ops[which], ops["B" if which == "A" else "A"].quantized()
        s, z = op.params(iu, il)
        per = max(1, budget // max(y.numel() + op.x.numel(), 1))
        n_out = y.shape[-2] * y.shape[-1]
        out = []
        for i in range(0, s.shape[0], per):
            xq = op.quantized(s[i:i + per], z[i:i + per])  # (c, S, H, r, k)
            c, sw, hh, r, k = xq.shape
            if which == "A":  # one batched GEMM per (window, head): (c·r, k) @ (k, N)
                diff = (xq.permute(1, 2, 0, 3, 4).reshape(sw, hh, c * r, k) @ other).view(sw, hh, c, r, -1)
                diff.sub_(y[:, :, None])
            else:  # (N, r) @ (r, c·k)
                diff = (other @ xq.permute(1, 2, 3, 0, 4).reshape(sw, hh, r, c * k)).view(sw, hh, -1, c, k)
                diff = diff.sub_(y[:, :, :, None]).transpose(2, 3)
            # Σ_windows mean over the (N, N) output of each window and head
            out.append(diff.square_().sum((0, 3, 4)).T / n_out)
        return torch.cat(out)  # (C, H)

    def search(which: str, mode: str) -> None:
        op = ops[which]
        if op.q is None:
            return
        cand = torch.arange(n)[:, None].expand(n, h)
        if mode == "joint":
            best = errors(which, cand, cand).argmin(0)
            op.iu, op.il = best.clone(), best.clone()
        elif mode == "l":
            op.il = errors(which, op.iu[None].expand(n, h), cand).argmin(0)
        else:
            op.iu = errors(which, cand, op.il[None].expand(n, h)).argmin(0)

    search("A", "joint")
    search("B", "joint")
    for _ in range(cfg.search_rounds):
        for which in ("A", "B"):
            search(which, "l")
            search(which, "u")
    for op in ops.values():
        if op.q is not None:
            s, z = op.params(op.iu, op.il)
            op.q.set_qparams(s.view(1, -1, 1, 1), z.view(1, -1, 1, 1))
    return {"A": [ops["A"].iu.tolist(), ops["A"].il.tolist()] if ops["A"].q is not None else None,
            "B": [ops["B"].iu.tolist(), ops["B"].il.tolist()] if ops["B"].q is not None else None}


@torch.no_grad()
def _capture(model: nn.Module, layer: nn.Module, images: Sequence[torch.Tensor], device: torch.device
             ) -> list[tuple[torch.Tensor, ...]]:
    """The inputs of every call of `layer` during full detector forwards of `images` (batch 1 each)."""
    calls: list[tuple[torch.Tensor, ...]] = []
    h = layer.register_forward_pre_hook(lambda _m, args: calls.append(tuple(t.detach() for t in args)))
    try:
        for img in images:
            model([img.to(device)])
    finally:
        h.remove()
    return calls


@torch.no_grad()
def calibrate_detector(model: nn.Module, images: Sequence[torch.Tensor], cfg: DetCalibConfig, w_bit: int,
                       a_bit: int, device: torch.device) -> dict[str, Any]:
    """Calibrate every wrapped layer of a detector in place; per-layer records, timings, uncalled layers."""
    do_reparam = reparam_active(cfg, w_bit, a_bit)
    records: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    uncalled: list[str] = []
    model.eval()
    with quant_state(model, weight=False, act=False):  # every module sees FP activations ("raw")
        for qname, layer in quant_layers(model):
            t0 = time.perf_counter()
            calls = _capture(model, layer, images, device)
            if not calls:
                uncalled.append(qname)
                continue
            if isinstance(layer, QuantMatMul):
                rec = calibrate_matmul_det(layer, torch.cat([c[0] for c in calls]), torch.cat([c[1] for c in calls]),
                                           cfg)
            elif isinstance(layer, QuantConv2d):
                rec = calibrate_conv_det(layer, [c[0] for c in calls], cfg)
            else:
                site = getattr(layer, "site", "")
                norm = prev_norm(model, qname, site) if do_reparam and site in LN_SITES else None
                rec = calibrate_linear_det(layer, [c[0] for c in calls], cfg, norm)
            records[qname] = rec
            seconds[qname] = round(time.perf_counter() - t0, 3)
    if uncalled:
        log.warning("aphq detection calibration: %d layer(s) never called on the calibration images stay FP: %s",
                    len(uncalled), ", ".join(uncalled[:5]))
    return {"modules": records, "seconds": seconds, "uncalled": uncalled, "reparam": do_reparam}
