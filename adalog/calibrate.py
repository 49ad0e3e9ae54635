"""AdaLog calibration (adalog spec §3): FPCS searches of every quantizer on FP activations.

Every quant layer is calibrated on FP activations (all quantizers off), in forward order. Instead of
the reference's one whole-model forward per module, the model is walked unit by unit
(`common.calib.capture.iter_unit_inputs`) and one unit forward captures the inputs and outputs of all
its quant layers (spec §7: the capture order does not matter because every search sees FP data; the
reparameterization keeps the FP function).

Per layer (all objectives are output or self MSE, minimised; spec §3.3–§3.7):

* uniform linear (proj, head, and qkv / fc1 / reduction without reparam): weight FPCS on the weight
  itself, input FPCS on the input itself, then `search_rounds` × (weight FPCS on the output with the
  input quantized by the current input quantizer; input FPCS on the output with the current weights);
* LayerNorm-fed linear (qkv, fc1, Swin reduction, when reparameterized — the reference only does it
  when a_bit == w_bit): per-channel input FPCS on the input itself, RepQ reparameterization into the
  LayerNorm with a rounded mean zero-point (`common.calib.reparam`), then the uniform-linear procedure
  on the new weight and the transformed input;
* post-GELU fc2 with AdaLog input: weight FPCS on the weight; scale bounds ud from the positive
  inputs; s = the second-to-last point of a 128-point grid over ud, q = 37; then `search_rounds` ×
  (joint (q, s) FPCS: the 8 best q of 10…137 at the current s, × 16 scales over ud, width 32, 4
  offsets; weight FPCS on the output with the input AdaLog-quantized);
* q·kᵀ (`matmul1`): per-head grids for both operands, both quantizers start at grid index −2, then
  `search_rounds` × (FPCS of A with B quantized; FPCS of B with A quantized), per head;
* attn·v (`matmul2`) with AdaLog A: s = 1 (never searched), v starts at grid index −2, then
  `search_rounds` × (exhaustive q ∈ 10…137, one per layer, A in the table form without the 1e-15 clamp;
  per-head FPCS of v with A AdaLog-quantized);
* patch-embed conv: per-out-channel weight grid (2^(b−1) zero-points), one FPCS on the conv output; the
  image input stays FP (the reference's qconv_a_bit = 8 leaves it unquantized).

The candidate evaluations reuse the exact error engines of `common.calib.search` (Gram forms where cheaper);
only the summation order differs from the reference (float64 sums instead of float32 means), so a
near-tie can resolve differently.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.calib.search import CAND_BUDGET, LeftOperandSearch, self_errors, weight_output_errors
from common.calib.capture import iter_layer_io
from common.calib.calibrate import reparam_active
from common.calib.reparam import LN_SITES, prev_norm, reparameterize_layernorm
from common.quant import QuantConv2d, QuantLinear, QuantMatMul, UniformQuantizer
from common.quant.adalog import AdaLogQuantizer, adalog_codes, adalog_levels
from common.quant.granularity import PerTensor
from common.quant.quantizers import LogQuantizer
from common.settings import dataclass_from

from .fpcs import best_k, fpcs
from .grids import (channel_candidates, conv_candidates, gelu_scale_bounds, head_candidates, input_candidates,
                    linear_grid, weight_candidates)

__all__ = ["AdaLogCalibConfig", "calib_config", "calibrate_model", "calibrate_linear", "calibrate_post_gelu",
           "calibrate_matmul", "calibrate_softmax_matmul", "calibrate_conv", "reparam_active", "LN_SITES",
           "adalog_output_errors", "softmax_base_errors"]

log = logging.getLogger(__name__)

_IGNORED = {"n_images", "augment", "draw", "evaluate"}


@dataclass
class AdaLogCalibConfig:
    """The `method.calib` node (defaults: the reference's configs/{3,4,6}bit.py and hard-coded values).

    Attributes:
        batch_size: forward batch while capturing activations (memory only).
        eq_n: candidates per initial grid (128).
        search_rounds: alternating weight / activation rounds (`search_round` = 3).
        fpcs: FPCS (True) or only the fixed initial grids (False; `fpcs = False` in the reference).
        steps: FPCS rounds including the initial one (6).
        width: beam width of the uniform searches (16; n_new = eq_n / width = 8 offsets).
        gelu_base_num / gelu_scale_num / gelu_width: post-GELU joint search: 8 bases × 16 scales, width
            32 (n_new = eq_n / 32 = 4).
        q_min: smallest base exponent; the candidates are q_min … q_min + eq_n − 1 (10 … 137).
        reparam: LayerNorm reparameterization of qkv / fc1 / reduction inputs.
        reparam_requires_equal_bits: [quirk] only when a_bit == w_bit (the reference's condition).
        chunk_average_quantile: [quirk] average the quantiles of 2^24-element chunks (false: exact).
    """

    batch_size: int = 32
    eq_n: int = 128
    search_rounds: int = 3
    fpcs: bool = True
    steps: int = 6
    width: int = 16
    gelu_base_num: int = 8
    gelu_scale_num: int = 16
    gelu_width: int = 32
    q_min: int = 10
    reparam: bool = True
    reparam_requires_equal_bits: bool = True
    chunk_average_quantile: bool = True

    @property
    def n_steps(self) -> int:
        return int(self.steps) if self.fpcs else 1

    def q_candidates(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.arange(self.q_min, self.q_min + self.eq_n, device=device, dtype=torch.int64)


def calib_config(cfg: Any = None, **overrides) -> AdaLogCalibConfig:
    return dataclass_from(AdaLogCalibConfig, cfg, _IGNORED, "adalog calib", **overrides)


def _uniform(q: nn.Module) -> UniformQuantizer | None:
    return q if isinstance(q, UniformQuantizer) and q.bits < 32 else None


def _adalog(q: nn.Module) -> AdaLogQuantizer | None:
    return q if isinstance(q, AdaLogQuantizer) and q.bits < 32 else None


def _chunk(per_candidate: int) -> int:
    return max(1, CAND_BUDGET // max(per_candidate, 1))


# --------------------------------------------------------------------------- uniform searches


def _fpcs(cfg: AdaLogCalibConfig, score, scales: torch.Tensor, zps: torch.Tensor, min_scale: float | None = None):
    """FPCS of a uniform grid with the configured width, steps and n_new = eq_n / width offsets."""
    return fpcs(score, scales, zps, width=cfg.width, steps=cfg.n_steps, n_new=max(1, int(cfg.eq_n / cfg.width)),
                min_scale=min_scale)


def _weight_fpcs(w: torch.Tensor, bits: int, cfg: AdaLogCalibConfig, score, kind: str = "weight"):
    """FPCS of a per-row weight grid with `score(scales (C, rows), zps (C, rows))`."""
    return _fpcs(cfg, score, *weight_candidates(w, bits, cfg.eq_n, kind))


def _self_weight_score(w: torch.Tensor, bits: int):
    return lambda s, z: self_errors(w[None], s, z, bits)


def _output_weight_score(w, b, x_hat, y, bits):
    return lambda s, z: weight_output_errors(w, b, x_hat, y, s, z, bits)


def _set_weight(wq: UniformQuantizer, res, ndim: int) -> None:
    shape = (-1,) + (1,) * (ndim - 1)
    wq.set_qparams(res.scale.reshape(shape), res.aux.reshape(shape))


def _weight_hat(layer, wq: UniformQuantizer | None) -> torch.Tensor:
    w = layer.weight.detach().float()
    return wq.fake_quant(w) if wq is not None and bool(wq.calibrated) else w


@torch.no_grad()
def _uniform_linear(layer: QuantLinear, x: torch.Tensor, y: torch.Tensor, cfg: AdaLogCalibConfig) -> int:
    """§3.3 on a per-tensor uniform input; returns the rounds run."""
    wq, aq = _uniform(layer.weight_quantizer), _uniform(layer.input_quantizer)
    w = layer.weight.detach().float()
    b = None if layer.bias is None else layer.bias.detach().float()
    rows = w.shape[0]
    s_n = x.shape[0]
    x_tok = x.reshape(-1, x.shape[-1])
    y_tok = y.reshape(-1, rows).float()
    target = (y_tok if b is None else y_tok - b).reshape(s_n, 1, -1, rows)
    x_self = x.reshape(s_n, 1, -1)
    if wq is not None:
        _set_weight(wq, _weight_fpcs(w, wq.bits, cfg, _self_weight_score(w, wq.bits)), 2)
    a0 = input_candidates(x, aq.bits, cfg.eq_n, cfg.chunk_average_quantile) if aq is not None else None

    def act_search(score):
        res = _fpcs(cfg, score, *a0, min_scale=1e-4)
        aq.granularity = PerTensor()
        aq.set_qparams(res.scale.reshape(1), res.aux.reshape(1))

    if aq is not None:
        act_search(lambda s, z: self_errors(x_self, s, z, aq.bits))
    for _ in range(int(cfg.search_rounds)):
        if wq is not None:
            x_hat = aq.fake_quant(x_tok) if aq is not None else x_tok
            _set_weight(wq, _weight_fpcs(w, wq.bits, cfg, _output_weight_score(w, b, x_hat, y_tok, wq.bits)), 2)
        if aq is not None:
            search = LeftOperandSearch(x_tok.reshape(s_n, 1, -1, x.shape[-1]), _weight_hat(layer, wq).T[None, None],
                                       target, aq.bits)
            act_search(lambda s, z: search.errors(s, z, 0, s_n))
    return int(cfg.search_rounds)


@torch.no_grad()
def calibrate_linear(layer: QuantLinear, x: torch.Tensor, y: torch.Tensor, cfg: AdaLogCalibConfig,
                     norm: nn.LayerNorm | None = None) -> dict[str, Any]:
    """A linear with a uniform input (§3.3), reparameterized into `norm` first when given (§3.4)."""
    aq = _uniform(layer.input_quantizer)
    x = x.float()
    info: dict[str, Any] = {"reparam": False}
    if norm is not None and aq is not None:
        tok = x.reshape(-1, x.shape[-1])
        data = tok.T.contiguous()[None]  # (1, channels, tokens): one group per channel
        res = _fpcs(cfg, lambda s, z: self_errors(data, s, z, aq.bits), *channel_candidates(x, aq.bits, cfg.eq_n),
                    min_scale=1e-4)
        rp = reparameterize_layernorm(norm, layer, res.scale, res.aux, round_mean_zero_point=True)
        x = rp.transform_input(x)
        aq.granularity = PerTensor()
        aq.set_qparams(rp.scale, rp.zero_point)
        info["reparam"] = True
    info["rounds"] = _uniform_linear(layer, x, y, cfg)
    return info


# --------------------------------------------------------------------------- post-GELU AdaLog


def adalog_output_errors(x: torch.Tensor, w_hat: torch.Tensor, target: torch.Tensor, scales: torch.Tensor,
                         qs: torch.Tensor, bits: int, shift: float) -> torch.Tensor:
    """Σ ‖(AdaLog_{s,q}(x + c) − c)·Ŵᵀ − target‖² per candidate (table form): float64 (C,).

    x: (T, k) FP input; w_hat: (m, k); target: (T, m) = y − b; scales (C,), qs (C,) integer exponents.
    """
    xs = x + shift
    per = x.numel() + target.numel()
    out = torch.empty(scales.numel(), dtype=torch.float64)
    step = _chunk(per)
    for i in range(0, scales.numel(), step):
        s = scales[i:i + step].reshape(-1, 1, 1).to(x)
        q = qs[i:i + step].to(x.device)
        lv = adalog_levels(q, bits, x.dtype, batched=True)  # (c, 2^B)
        codes, mask = _codes(xs[None], s, q.reshape(-1, 1, 1), bits)
        xq = torch.gather(lv, 1, codes.reshape(codes.shape[0], -1)).reshape(codes.shape) * s * mask - shift
        o = (xq @ w_hat.T).sub_(target)
        out[i:i + step] = torch.linalg.vecdot(o, o).sum(-1, dtype=torch.float64).cpu()
    return out


def _codes(x: torch.Tensor, s: torch.Tensor, q: torch.Tensor, bits: int, clamp: bool = True):
    codes, mask = adalog_codes(x, s, q, bits, clamp_min=1e-15 if clamp else None)
    return codes.long(), mask


@torch.no_grad()
def calibrate_post_gelu(layer: QuantLinear, x: torch.Tensor, y: torch.Tensor, cfg: AdaLogCalibConfig) -> dict[str, Any]:
    """fc2 with a shifted AdaLog input quantizer (§3.5)."""
    wq, aq = _uniform(layer.weight_quantizer), _adalog(layer.input_quantizer)
    w = layer.weight.detach().float()
    b = None if layer.bias is None else layer.bias.detach().float()
    rows = w.shape[0]
    x_tok = x.float().reshape(-1, x.shape[-1])
    y_tok = y.float().reshape(-1, rows)
    target = y_tok if b is None else y_tok - b
    c = float(aq.shift)
    if wq is not None:
        _set_weight(wq, _weight_fpcs(w, wq.bits, cfg, _self_weight_score(w, wq.bits)), 2)
    lo, hi = gelu_scale_bounds(x_tok, c)
    grid = linear_grid(lo, hi, cfg.eq_n)
    aq.set_qparams(grid[-2], int(aq.q))
    q_all = cfg.q_candidates(x_tok.device)
    picks = []

    def errors(scales: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
        return adalog_output_errors(x_tok, _weight_hat(layer, wq), target, scales.reshape(-1), qs.reshape(-1),
                                    aq.bits, c).reshape(scales.shape)

    for _ in range(int(cfg.search_rounds)):
        s_cur = aq.scale.detach().reshape(()).float()
        if cfg.fpcs:
            # q pre-selection at the current scale, then the joint (q, s) beam search
            e_q = errors(s_cur.expand(q_all.numel())[:, None], q_all[:, None])
            q_top = q_all[best_k(e_q, cfg.gelu_base_num)[:, 0]]
            s16 = linear_grid(lo, hi, cfg.gelu_scale_num)
            s0 = s16.repeat(q_top.numel())[:, None]
            q0 = q_top.repeat_interleave(cfg.gelu_scale_num)[:, None]
            res = fpcs(errors, s0, q0, width=cfg.gelu_width, steps=cfg.steps,
                       n_new=max(1, cfg.eq_n // cfg.gelu_width), delta=(s16[1] - s16[0]).reshape(1))
            aq.set_qparams(res.scale, int(res.aux))
        else:
            e_q = errors(s_cur.expand(q_all.numel())[:, None], q_all[:, None])
            aq.set_qparams(s_cur, int(q_all[best_k(e_q, 1)[0, 0]]))
            qv = aq.q.expand(grid.numel())[:, None]
            e_s = errors(grid[:, None], qv)
            aq.set_qparams(grid[best_k(e_s, 1)[0, 0]], None)
        picks.append((float(aq.scale), int(aq.q)))
        if wq is not None:
            x_hat = aq.fake_quant(x_tok)
            _set_weight(wq, _weight_fpcs(w, wq.bits, cfg, _output_weight_score(w, b, x_hat, y_tok, wq.bits)), 2)
    return {"ud": [float(lo), float(hi)], "picks": picks, "q": int(aq.q), "scale": float(aq.scale)}


# --------------------------------------------------------------------------- attention matmuls


def _init_at(q: UniformQuantizer, cand: tuple[torch.Tensor, torch.Tensor], index: int = -2) -> None:
    s, z = cand
    q.set_qparams(s[index].reshape(1, -1, 1, 1), z[index].reshape(1, -1, 1, 1))


def _head_fpcs(q: UniformQuantizer, cand, score, cfg: AdaLogCalibConfig) -> None:
    res = _fpcs(cfg, score, *cand)
    q.set_qparams(res.scale.reshape(1, -1, 1, 1), res.aux.reshape(1, -1, 1, 1))


def _b_score(b: torch.Tensor, a_hat: torch.Tensor, y: torch.Tensor, bits: int):
    """Per-head errors of v / kᵀ candidates as the left operand of the transposed product."""
    search = LeftOperandSearch(b.transpose(-1, -2), a_hat.transpose(-1, -2), y.transpose(-1, -2), bits)
    return lambda s, z: search.errors(s, z, 0, b.shape[0])


@torch.no_grad()
def calibrate_matmul(mm: QuantMatMul, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor,
                     cfg: AdaLogCalibConfig) -> dict[str, Any]:
    """q·kᵀ with per-head uniform operands (§3.6). a: (S, H, n, k), b: (S, H, k, m), y: (S, H, n, m)."""
    qa, qb = _uniform(mm.a_quantizer), _uniform(mm.b_quantizer)
    a, b, y = a.float(), b.float(), y.float()
    ca = head_candidates(a, qa.bits, cfg.eq_n, cfg.chunk_average_quantile) if qa is not None else None
    cb = head_candidates(b, qb.bits, cfg.eq_n, cfg.chunk_average_quantile) if qb is not None else None
    for q, cand in ((qa, ca), (qb, cb)):
        if q is not None:
            _init_at(q, cand)
    for _ in range(int(cfg.search_rounds)):
        if qa is not None:
            b_hat = qb.fake_quant(b) if qb is not None else b
            search = LeftOperandSearch(a, b_hat, y, qa.bits)
            _head_fpcs(qa, ca, lambda s, z: search.errors(s, z, 0, a.shape[0]), cfg)
        if qb is not None:
            a_hat = qa.fake_quant(a) if qa is not None else a
            _head_fpcs(qb, cb, _b_score(b, a_hat, y, qb.bits), cfg)
    return {"rounds": int(cfg.search_rounds)}


def softmax_base_errors(a: torch.Tensor, b_hat: torch.Tensor, y: torch.Tensor, qs: torch.Tensor, bits: int,
                        scale: float = 1.0) -> torch.Tensor:
    """Σ ‖AdaLog_q(A)·B̂ − Y‖² over heads, rows and columns per base exponent (C,), table form with s = 1 and
    no 1e-15 clamp (the reference's `_search_best_A_log_base`: −log2(0) = ∞ is masked to 0)."""
    out = torch.empty(qs.numel(), dtype=torch.float64)
    lv_all = adalog_levels(qs.to(a.device), bits, a.dtype, batched=True)  # (C, 2^B)
    step = _chunk(a[0].numel() + y[0].numel())
    for i in range(qs.numel()):
        total = torch.zeros((), dtype=torch.float64)
        q = qs[i].to(a.device)
        for lo in range(0, a.shape[0], step):
            sl = slice(lo, lo + step)
            codes, mask = _codes(a[sl], scale, q, bits, clamp=False)
            a_hat = lv_all[i][codes] * scale * mask
            o = (a_hat @ b_hat[sl]).sub_(y[sl])
            total += torch.linalg.vecdot(o.reshape(-1, o.shape[-1]), o.reshape(-1, o.shape[-1])).sum(
                dtype=torch.float64).cpu()
        out[i] = total
    return out


@torch.no_grad()
def calibrate_softmax_matmul(mm: QuantMatMul, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor,
                             cfg: AdaLogCalibConfig) -> dict[str, Any]:
    """attn·v with a log A quantizer (§3.7): AdaLog s = 1 and one q per layer, v per head."""
    qa, qb = mm.a_quantizer, _uniform(mm.b_quantizer)
    a, b, y = a.float(), b.float(), y.float()
    cb = head_candidates(b, qb.bits, cfg.eq_n, cfg.chunk_average_quantile) if qb is not None else None
    if qb is not None:
        _init_at(qb, cb)
    ada = _adalog(qa)
    if ada is not None:
        ada.set_qparams(1.0, int(ada.q))
    elif isinstance(qa, LogQuantizer):
        qa.set_qparams(torch.ones(1))
    q_all = cfg.q_candidates(a.device)
    picks = []
    for _ in range(int(cfg.search_rounds)):
        if ada is not None:
            b_hat = qb.fake_quant(b) if qb is not None else b
            e = softmax_base_errors(a, b_hat, y, q_all, ada.bits, float(ada.scale))
            ada.set_qparams(ada.scale.detach(), int(q_all[best_k(e[:, None], 1)[0, 0]]))
            picks.append(int(ada.q))
        if qb is not None:
            a_hat = qa.fake_quant(a) if bool(getattr(qa, "calibrated", False)) and qa.bits < 32 else a
            _head_fpcs(qb, cb, _b_score(b, a_hat, y, qb.bits), cfg)
        if ada is None:
            break  # log2 / log-sqrt2 A: B is searched once (the reference's loop break)
    return {"q_picks": picks, "q": int(ada.q) if ada is not None else None}


# --------------------------------------------------------------------------- patch-embed conv


def _patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@torch.no_grad()
def calibrate_conv(layer: QuantConv2d, x: torch.Tensor, y: torch.Tensor, cfg: AdaLogCalibConfig) -> dict[str, Any]:
    """Patch-embed conv: per-out-channel grid (2^(b−1) zero-points), one FPCS on the conv output.

    The image input stays FP at ≥ 8 bits (the reference); below that (not a reference setting) it gets a
    per-tensor input FPCS on the input itself first.
    """
    wq, aq = _uniform(layer.weight_quantizer), _uniform(layer.input_quantizer)
    x = x.float()
    if aq is not None and aq.bits < 8:
        res = _fpcs(cfg, lambda s, z: self_errors(x.reshape(x.shape[0], 1, -1), s, z, aq.bits),
                    *input_candidates(x, aq.bits, cfg.eq_n, cfg.chunk_average_quantile), min_scale=1e-4)
        aq.set_qparams(res.scale.reshape(1), res.aux.reshape(1))
    if wq is None:
        return {}
    w = layer.weight.detach().float().reshape(layer.weight.shape[0], -1)
    b = None if layer.bias is None else layer.bias.detach().float()
    inp = aq.fake_quant(x) if aq is not None and bool(aq.calibrated) else x
    pts = _patches(layer, inp)
    y_tok = y.float().permute(0, 2, 3, 1).reshape(-1, w.shape[0])
    cand = conv_candidates(w, wq.bits, cfg.eq_n)
    ndim = layer.weight.dim()
    wq.set_qparams(cand[0][-2].reshape((-1,) + (1,) * (ndim - 1)), cand[1][-2].reshape((-1,) + (1,) * (ndim - 1)))
    res = _fpcs(cfg, _output_weight_score(w, b, pts, y_tok, wq.bits), *cand)
    _set_weight(wq, res, ndim)
    return {"rounds": 1}


# --------------------------------------------------------------------------- model walk


@torch.no_grad()
def calibrate_model(model: nn.Module, images: torch.Tensor, cfg: AdaLogCalibConfig, w_bit: int, a_bit: int,
                    device: torch.device | str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Calibrate every quant layer of a model wrapped with AdaLog's scheme, in place.

    Returns {"modules": {qname: record}, "seconds": {qname: s}, "reparam": bool}.
    """
    do_reparam = reparam_active(cfg, w_bit, a_bit)
    records: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    model.eval()
    for qname, layer, ins, out in iter_layer_io(model, images, cfg.batch_size, device, "adalog calibration", progress):
        t0 = time.perf_counter()
        if isinstance(layer, QuantMatMul):
            if layer.site == "matmul2" and isinstance(layer.a_quantizer, (AdaLogQuantizer, LogQuantizer)):
                rec = calibrate_softmax_matmul(layer, ins[0], ins[1], out, cfg)
            else:
                rec = calibrate_matmul(layer, ins[0], ins[1], out, cfg)
        elif isinstance(layer, QuantConv2d):
            rec = calibrate_conv(layer, ins[0], out, cfg)
        elif _adalog(layer.input_quantizer) is not None:
            rec = calibrate_post_gelu(layer, ins[0], out, cfg)
        else:
            reparam = do_reparam and layer.site in LN_SITES
            norm = prev_norm(model, getattr(layer, "qname", ""), layer.site) if reparam else None
            rec = calibrate_linear(layer, ins[0], out, cfg, norm)
        records[qname] = rec
        seconds[qname] = round(time.perf_counter() - t0, 3)
    return {"modules": records, "seconds": seconds, "reparam": do_reparam}
