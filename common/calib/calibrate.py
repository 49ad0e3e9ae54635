"""APHQ-ViT calibration (aphq spec §2.2–§2.5): scale / zero-point search for every quantizer.

Shared by APHQ and FIMA-Q (fimaq spec §2: the same search, token-wise scales at every bit-width); moved
here unchanged from `aphq/calibrate.py`.

Every module is calibrated on FP activations of the (MLP-reconstructed, reparameterized) model, as
in the reference, but instead of one whole-model forward per module the model is walked unit by
unit (`common.calib.capture.iter_unit_inputs`) and one unit forward captures the inputs and outputs of
all its quant layers (`capture_io`). Per module:

* Linear (qkv, proj, fc1, fc2, head, Swin reduction): per-row weight and per-tensor input candidates
  on the fixed 128-point zp × range grids; self-MSE initialisation; then `search_rounds` rounds of
  "weight search on the layer output with the input quantized" / "input search on the output with
  the weights quantized" (`calib_metric` mse or mae). For qkv / fc1 / reduction the input is first
  searched per channel (self-MSE), folded into the preceding LayerNorm (RepQ-ViT reparameterization
  with a rounded mean zero-point, `common.calib.reparam`), and the full per-tensor search is run on the
  transformed input and the new weight (spec §2.5). The reference does this only when a_bit == w_bit
  (`reparam_requires_equal_bits`, default on to be faithful).
* Attention matmuls, per head: 129 linear (upper, lower) range candidates between the 0.99/0.99999
  and 0.01/0.00001 quantiles; start at index 127, joint search of A then B, then `search_rounds`
  rounds of coordinate refinement (fix u search l, fix l search u; A then B).
* Patch-embed conv: per-row percentile pairs pct_i = 0.99 + 0.0099·(i/127)^0.5 searched on the conv
  output, then one refinement round; the image input stays FP (APHQ leaves inputs of ≥ 8 bits FP).
* Token-wise option (the 2-bit config): 3-D linear inputs get a (1, N, 1) scale, matmul operands
  (1, H, N, 1) / (1, H, 1, N|d) scales, initialised from the searched per-tensor / per-head value.

Exactness: the candidate grids, quantiles (chunk-averaged like the reference unless
`chunk_average_quantile=false`), selection rules and tie-breaking (first candidate) are the
reference's. The speed-ups only change the summation order: Gram forms of the output errors, branch
and bound over sample chunks (`common.calib.grids.pruned_argmin`), and memoisation of searches whose inputs
did not change (a search that sees the same quantizer state returns the same answer).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from common.calib.capture import iter_layer_io
from common.quant import QuantConv2d, QuantLinear, QuantMatMul, UniformQuantizer
from common.quant.granularity import Granularity, PerAxis, PerTensor, PerToken
from common.quant.primitives import fake_quant_affine
from common.quant.quantizers import quantizers_of
from common.calib.reparam import LN_SITES, prev_norm, reparameterize_layernorm

from common.calib.grids import (GridCandidates, activation_grid, conv_percentiles, matmul_bounds, pair_qparams,
                                pruned_argmin, sample_chunks, weight_grid)
from common.calib.search import LeftOperandSearch, self_errors, weight_output_errors
from common.calib.intsearch import IntDirectSearch, exact_argmin, int_path_ok

__all__ = ["CalibConfig", "calibrate_model", "calibrate_linear", "calibrate_matmul", "calibrate_conv",
           "expand_token_wise", "granularity_of_scale", "reparam_active", "LN_SITES", "load_quant_state"]

log = logging.getLogger(__name__)



@dataclass
class CalibConfig:
    """Calibration settings (the `method.calib` config node).

    Attributes:
        n_images: calibration images (reference 128).
        batch_size: forward batch while capturing activations (32).
        metric: output-similarity metric of the searches, "mse" or "mae" (`calib_metric`).
        eq_n: candidates per grid (128).
        search_rounds: alternating / coordinate search rounds (3).
        token_wise: per-token input and matmul scales (the reference's 2-bit config).
        reparam: LayerNorm reparameterization of qkv / fc1 / reduction inputs.
        reparam_requires_equal_bits: reference quirk, reparam only when a_bit == w_bit.
        chunk_average_quantile: reference quirk, average the quantiles of 2^24-element chunks.
        prune: branch-and-bound over sample chunks (exact; off = exhaustive evaluation).
        memo: reuse results of searches whose quantizer state did not change (exact).
        int_search: score the attention·V operand searches and the direct-form linear input searches
            (proj, fc2) from integer codes with exact int8 GEMMs, same choices as the float32 search
            (`common.calib.intsearch`; CPU).
    """

    n_images: int = 128
    batch_size: int = 32
    metric: str = "mse"
    eq_n: int = 128
    search_rounds: int = 3
    token_wise: bool = False
    reparam: bool = True
    reparam_requires_equal_bits: bool = True
    chunk_average_quantile: bool = True
    prune: bool = True
    memo: bool = True
    int_search: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_node(cls, node: Any) -> "CalibConfig":
        """Build from a config mapping, ignoring keys that are not calibration settings."""
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        d = dict(node or {})
        return cls(**{k: v for k, v in d.items() if k in known})


def reparam_active(cfg: Any, w_bit: int, a_bit: int) -> bool:
    """Whether qkv / fc1 / reduction inputs are reparameterized (reference: only if a_bit == w_bit), for any
    calibration settings with `reparam` and `reparam_requires_equal_bits` (APHQ, FIMA-Q, AdaLog, detection)."""
    return bool(cfg.reparam) and (not cfg.reparam_requires_equal_bits or int(w_bit) == int(a_bit))


def _uniform(q: nn.Module) -> UniformQuantizer | None:
    return q if isinstance(q, UniformQuantizer) and q.bits < 32 else None


def _argmin(grid_len: int, groups: int, n: int, prune: bool,
            evaluate: Callable[[torch.Tensor, int, int], torch.Tensor], per_sample: int = 1) -> torch.Tensor:
    """Exact argmin per group; branch and bound over sample chunks when `prune` (see `pruned_argmin`)."""
    chunks = sample_chunks(n, per_sample) if prune else [(0, n)]
    return pruned_argmin(grid_len, groups, chunks, evaluate)


def _operand_argmin(n_cand: int, groups: int, n: int, cfg: "CalibConfig", search: LeftOperandSearch,
                    params: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                    fast: IntDirectSearch | None, per_sample: int) -> tuple[torch.Tensor, dict | None]:
    """The float32 search's choice for an operand search: from the integer-code errors re-scored by the
    float32 search (`exact_argmin`, with its record) when `fast` is given, else branch and bound."""
    if fast is not None:
        return exact_argmin(fast.errors(*params(torch.arange(n_cand)), 0, n),
                            lambda idx: search.errors(*params(idx), 0, n))
    return _argmin(n_cand, groups, n, cfg.prune, lambda idx, lo, hi: search.errors(*params(idx), lo, hi),
                   per_sample), None


# --------------------------------------------------------------------------- self (tensor-only) searches


def _self_search(data: torch.Tensor, grid: GridCandidates, bits: int, prune: bool) -> torch.Tensor:
    """Best grid candidate per group by the tensor's own MSE. data: (S, G, n)."""
    return _argmin(len(grid), data.shape[1], data.shape[0], prune,
                   lambda idx, lo, hi: self_errors(data[lo:hi], *grid.params(idx), bits), data[0].numel())


def _per_channel_view(x: torch.Tensor) -> torch.Tensor:
    """(S, ..., C) → (S, C, tokens) contiguous."""
    return x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------- linear


def _token_view(x: torch.Tensor) -> torch.Tensor:
    """(S, ..., C) → (S, 1, tokens, C): one group, samples on dim 0."""
    return x.reshape(x.shape[0], 1, -1, x.shape[-1])


@torch.no_grad()
def calibrate_linear(layer: QuantLinear, x: torch.Tensor, y: torch.Tensor, cfg: CalibConfig,
                     norm: nn.LayerNorm | None = None) -> dict[str, Any]:
    """Calibrate one QuantLinear on its FP input x (S, ..., in) and output y (S, ..., out), in place.

    With `norm` (the LayerNorm feeding qkv / fc1 / reduction) the input is reparameterized first.
    Returns a small record (rounds run, whether reparam happened).
    """
    wq, aq = _uniform(layer.weight_quantizer), _uniform(layer.input_quantizer)
    info: dict[str, Any] = {"reparam": False}
    x = x.float()
    if norm is not None and aq is not None:
        cgrid = activation_grid(x, aq.bits, cfg.eq_n, per_channel=True)
        best_c = _self_search(_per_channel_view(x), cgrid, aq.bits, cfg.prune)
        s_c, z_c = cgrid.select(best_c)
        rp = reparameterize_layernorm(norm, layer, s_c, z_c, round_mean_zero_point=True)
        x = rp.transform_input(x)
        aq.granularity = PerTensor()
        aq.set_qparams(rp.scale, rp.zero_point)
        info["reparam"] = True
    w = layer.weight.detach().float()
    b = None if layer.bias is None else layer.bias.detach().float()
    rows = w.shape[0]
    x_tok = x.reshape(-1, x.shape[-1])
    y_tok = y.reshape(-1, rows).float()
    if wq is None and aq is None:
        return info

    wgrid = weight_grid(w, wq.bits, cfg.eq_n) if wq is not None else None
    agrid = (activation_grid(x, aq.bits, cfg.eq_n, chunk_average=cfg.chunk_average_quantile)
             if aq is not None else None)
    w_best = _self_search(w[None], wgrid, wq.bits, False) if wq is not None else None
    a_best = _self_search(x.reshape(x.shape[0], 1, -1), agrid, aq.bits, cfg.prune) if aq is not None else None

    def w_hat(best):
        if wq is None:
            return w
        s, z = wgrid.select(best)
        return fake_quant_affine(w, s[:, None], z[:, None], wq.bits)

    def x_hat(best):
        if aq is None:
            return x_tok
        s, z = agrid.select(best)
        return fake_quant_affine(x_tok, s, z, aq.bits)

    w_memo: dict[bytes, torch.Tensor] = {}
    a_memo: dict[bytes, torch.Tensor] = {}

    def search_w(a_state):
        key = b"" if a_state is None else a_state.cpu().numpy().tobytes()
        if cfg.memo and key in w_memo:
            return w_memo[key]
        all_idx = torch.arange(len(wgrid))
        s, z = wgrid.params(all_idx)
        err = weight_output_errors(w, b, x_hat(a_state), y_tok, s, z, wq.bits, cfg.metric)
        res = pruned_argmin(len(wgrid), rows, [(0, 1)], lambda idx, lo, hi: err[idx.to(err.device)])
        w_memo[key] = res
        return res

    def search_a(w_state):
        key = b"" if w_state is None else w_state.cpu().numpy().tobytes()
        if cfg.memo and key in a_memo:
            return a_memo[key]
        right = w_hat(w_state).T[None, None]
        target = (y_tok if b is None else y_tok - b).reshape(x.shape[0], 1, -1, rows)
        search = LeftOperandSearch(_token_view(x), right, target, aq.bits, cfg.metric)
        fast = None
        if (cfg.int_search and not search.gram and cfg.metric == "mse" and w_state is not None
                and int_path_ok(aq.bits, wq.bits, x.shape[-1], x.device)):
            s_w, z_w = wgrid.select(w_state)  # per output row = per column of the right operand wᵀ
            fast = IntDirectSearch(_token_view(x), w.T[None, None], s_w.view(1, 1, 1, rows), z_w.view(1, 1, 1, rows),
                                   target, aq.bits, wq.bits)
        res, _ = _operand_argmin(len(agrid), 1, x.shape[0], cfg, search, agrid.params, fast,
                                 x[0].numel() * rows // x.shape[-1])
        a_memo[key] = res
        return res

    rounds = 0
    for _ in range(int(cfg.search_rounds)):
        rounds += 1
        prev = (w_best, a_best)
        if wq is not None:
            w_best = search_w(a_best)
        if aq is not None:
            a_best = search_a(w_best)
        if cfg.memo and all(p is None or torch.equal(p, c) for p, c in zip(prev, (w_best, a_best))):
            break  # fixed point: every further round would repeat the same two searches
    if wq is not None:
        s, z = wgrid.select(w_best)
        wq.set_qparams(s[:, None], z[:, None])
    if aq is not None:
        s, z = agrid.select(a_best)
        aq.granularity = PerTensor()
        aq.set_qparams(s.reshape(1), z.reshape(1))
    info["rounds"] = rounds
    return info


# --------------------------------------------------------------------------- conv (patch embed)


def _patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@torch.no_grad()
def calibrate_conv(layer: QuantConv2d, x: torch.Tensor, y: torch.Tensor, cfg: CalibConfig) -> dict[str, Any]:
    """Patch-embed conv: per-row percentile weight search on the conv output + one refinement round.

    The input quantizer is left uncalibrated (identity) for ≥ 8 bits, as the reference leaves such
    conv inputs in FP; below 8 bits (not a reference setting) it gets a per-tensor self-MSE search.
    """
    wq, aq = _uniform(layer.weight_quantizer), _uniform(layer.input_quantizer)
    x = x.float()
    if aq is not None and aq.bits < 8:
        agrid = activation_grid(x, aq.bits, cfg.eq_n, chunk_average=cfg.chunk_average_quantile)
        s, z = agrid.select(_self_search(x.reshape(x.shape[0], 1, -1), agrid, aq.bits, cfg.prune))
        aq.set_qparams(s.reshape(1), z.reshape(1))
    if wq is None:
        return {}
    w = layer.weight.detach().float().reshape(layer.weight.shape[0], -1)
    b = None if layer.bias is None else layer.bias.detach().float()
    inp = aq(x) if aq is not None and bool(aq.calibrated) else x
    pts = _patches(layer, inp)
    y_tok = y.float().permute(0, 2, 3, 1).reshape(-1, w.shape[0])
    u, lo = conv_percentiles(w, cfg.eq_n)  # (n, rows)
    rows = torch.arange(w.shape[0])

    def best_of(uu: torch.Tensor, ll: torch.Tensor) -> torch.Tensor:
        s, z = pair_qparams(uu, ll, wq.bits)
        err = weight_output_errors(w, b, pts, y_tok, s, z, wq.bits, cfg.metric)
        return pruned_argmin(err.shape[0], w.shape[0], [(0, 1)], lambda idx, _lo, _hi: err[idx])

    i_best = best_of(u, lo)
    iu, il = i_best.clone(), i_best.clone()
    il = best_of(u[iu, rows][None].expand_as(lo), lo)
    iu = best_of(u, lo[il, rows][None].expand_as(u))
    s, z = pair_qparams(u[iu, rows], lo[il, rows], wq.bits)
    wq.set_qparams(s.reshape(-1, *([1] * (layer.weight.dim() - 1))), z.reshape(-1, *([1] * (layer.weight.dim() - 1))))
    return {"rounds": 1}


# --------------------------------------------------------------------------- attention matmul


class _MatMulState:
    """Per-head (upper, lower) candidate indices of one operand and its candidate bounds."""

    def __init__(self, x: torch.Tensor, q: UniformQuantizer | None, cfg: CalibConfig):
        self.q = q
        if q is not None:
            self.u, self.l = matmul_bounds(x, cfg.eq_n, cfg.chunk_average_quantile)
            h = x.shape[1]
            self.iu = torch.full((h,), cfg.eq_n - 1, dtype=torch.long)
            self.il = self.iu.clone()

    def params(self, iu: torch.Tensor, il: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = torch.arange(iu.shape[-1])
        return pair_qparams(self.u[iu, heads], self.l[il, heads], self.q.bits)

    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.params(self.iu, self.il)

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        if self.q is None:
            return x
        s, z = self.current()
        return fake_quant_affine(x, s.view(1, -1, 1, 1), z.view(1, -1, 1, 1), self.q.bits)

    def key(self, h: int) -> tuple[int, int]:
        return (-1, -1) if self.q is None else (int(self.iu[h]), int(self.il[h]))


def _int_matmul_search(which: str, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor, hs: torch.Tensor,
                       other: "_MatMulState", me: "_MatMulState", search: LeftOperandSearch,
                       cfg: CalibConfig) -> IntDirectSearch | None:
    """The integer-code evaluation of a direct-form matmul operand search, or None where it does not apply
    (Gram form, mae, an unquantized other operand, codes outside int8)."""
    if search.gram or cfg.metric != "mse" or other.q is None:
        return None
    s_o, z_o = other.current()
    if which == "A":
        left, right, target = a[:, hs], b[:, hs], y[:, hs]
    else:
        left, right, target = b[:, hs].transpose(-1, -2), a[:, hs].transpose(-1, -2), y[:, hs].transpose(-1, -2)
    if not int_path_ok(me.q.bits, other.q.bits, left.shape[-1], left.device):
        return None
    return IntDirectSearch(left, right, s_o[hs].view(1, -1, 1, 1), z_o[hs].view(1, -1, 1, 1), target,
                           me.q.bits, other.q.bits)


@torch.no_grad()
def calibrate_matmul(mm: QuantMatMul, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor,
                     cfg: CalibConfig) -> dict[str, Any]:
    """Per-head search of both operands of A @ B (A: (S, H, n, k), B: (S, H, k, m)), in place."""
    qa, qb = _uniform(mm.a_quantizer), _uniform(mm.b_quantizer)
    a, b, y = a.float(), b.float(), y.float()
    sa, sb = _MatMulState(a, qa, cfg), _MatMulState(b, qb, cfg)
    heads = a.shape[1]
    eq_n = cfg.eq_n
    memo: dict[tuple, int] = {}
    counts = {"searches": 0, "head_searches": 0, "memo_hits": 0}

    def run(which: str, mode: str) -> None:
        me, other = (sa, sb) if which == "A" else (sb, sa)
        if me.q is None:
            return
        keys = [(h, which, mode, int(me.iu[h]) if mode == "l" else -1, int(me.il[h]) if mode == "u" else -1,
                 other.key(h)) for h in range(heads)]
        todo = [h for h in range(heads) if not (cfg.memo and keys[h] in memo)]
        counts["memo_hits"] += heads - len(todo)
        if todo:
            hs = torch.tensor(todo)
            if which == "A":
                left, right, target = a[:, hs], sb.quantized(b)[:, hs], y[:, hs]
            else:
                left, right = b[:, hs].transpose(-1, -2), sa.quantized(a)[:, hs].transpose(-1, -2)
                target = y[:, hs].transpose(-1, -2)
            search = LeftOperandSearch(left, right, target, me.q.bits, cfg.metric)
            cols = torch.arange(len(todo))

            def _params(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                n = idx.numel()
                cand = idx[:, None].expand(n, len(todo))
                iu = cand if mode in ("joint", "u") else me.iu[hs][None].expand(n, -1)
                il = cand if mode in ("joint", "l") else me.il[hs][None].expand(n, -1)
                return pair_qparams(me.u[iu, hs[cols]], me.l[il, hs[cols]], me.q.bits)

            fast = _int_matmul_search(which, a, b, y, hs, other, me, search, cfg) if cfg.int_search else None
            best, info = _operand_argmin(eq_n, len(todo), a.shape[0], cfg, search, _params, fast, left[0].numel())
            if info is not None:
                counts["int_searches"] = counts.get("int_searches", 0) + 1
                counts["rescored"] = counts.get("rescored", 0) + info["rescored"]
            counts["searches"] += 1
            counts["head_searches"] += len(todo)
            for j, h in enumerate(todo):
                memo[keys[h]] = int(best[j])
        for h in range(heads):
            v = memo[keys[h]]
            if mode in ("joint", "u"):
                me.iu[h] = v
            if mode in ("joint", "l"):
                me.il[h] = v

    run("A", "joint")
    run("B", "joint")
    for _ in range(int(cfg.search_rounds)):
        run("A", "l")
        run("A", "u")
        run("B", "l")
        run("B", "u")
    for st, q in ((sa, qa), (sb, qb)):
        if q is not None:
            s, z = st.current()
            q.set_qparams(s.view(1, -1, 1, 1), z.view(1, -1, 1, 1))
    return counts


# --------------------------------------------------------------------------- token-wise expansion


@torch.no_grad()
def _expand_scale(q: UniformQuantizer, shape: tuple[int, ...]) -> None:
    """Replace q.scale by a parameter of `shape` filled from its current value (zp unchanged)."""
    q.scale = nn.Parameter(q.scale.detach().expand(shape).clone(), requires_grad=q.scale.requires_grad)
    q.granularity = granularity_of_scale(q.scale)


def granularity_of_scale(scale: torch.Tensor) -> Granularity:
    """The granularity a scale's shape implies (informational attribute of the quantizer)."""
    kept = tuple(i for i, n in enumerate(scale.shape) if n > 1)
    if not kept:
        return PerTensor()
    if scale.dim() == 3 and kept == (1,):
        return PerToken()
    return PerAxis(kept)


def expand_token_wise(layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> bool:
    """Token-wise scales (spec §2.4 step 6, matmul step 4); returns whether anything was expanded."""
    if isinstance(layer, QuantLinear):
        q = _uniform(layer.input_quantizer)
        x = inputs[0]
        if q is None or x.dim() != 3:
            return False
        _expand_scale(q, (1, x.shape[1], 1))
        return True
    if isinstance(layer, QuantMatMul):
        a, b = inputs
        done = False
        qa, qb = _uniform(layer.a_quantizer), _uniform(layer.b_quantizer)
        if qa is not None:
            _expand_scale(qa, (1, a.shape[1], a.shape[2], 1))
            done = True
        if qb is not None:
            _expand_scale(qb, (1, b.shape[1], 1, b.shape[3]))
            done = True
        return done
    return False


# --------------------------------------------------------------------------- model walk


@torch.no_grad()
def calibrate_model(model: nn.Module, images: torch.Tensor, cfg: CalibConfig, w_bit: int, a_bit: int,
                    device: torch.device | str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Calibrate every quant layer of a wrapped timm ViT/DeiT/Swin in place (see module docstring).

    Args:
        model: wrapped by `common.quant.wrap_model` (quantizers uncalibrated), on `device`.
        images: calibration images (n, C, H, W), FP.
        cfg: calibration settings.
        w_bit, a_bit: the bits config (decides the reparam-only-if-equal-bits quirk).
    Returns:
        {"modules": {qname: record}, "seconds": {qname: search time}, "reparam": bool}.
    """
    do_reparam = reparam_active(cfg, w_bit, a_bit)
    records: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}
    model.eval()
    for qname, layer, ins, out in iter_layer_io(model, images, cfg.batch_size, device, "aphq calibration", progress):
        t0, c0 = time.perf_counter(), time.process_time()
        if isinstance(layer, QuantMatMul):
            rec = calibrate_matmul(layer, ins[0], ins[1], out, cfg)
        elif isinstance(layer, QuantConv2d):
            rec = calibrate_conv(layer, ins[0], out, cfg)
        else:
            reparam = do_reparam and layer.site in LN_SITES
            norm = prev_norm(model, getattr(layer, "qname", ""), layer.site) if reparam else None
            rec = calibrate_linear(layer, ins[0], out, cfg, norm)
        if cfg.token_wise and expand_token_wise(layer, ins):
            rec = {**rec, "token_wise": True}
        records[qname] = rec
        seconds[qname] = round(time.perf_counter() - t0, 3)
        cpu_seconds[qname] = round(time.process_time() - c0, 3)
    return {"modules": records, "seconds": seconds, "cpu_seconds": cpu_seconds, "reparam": do_reparam}


@torch.no_grad()
def load_quant_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a stage's state dict into a freshly wrapped model (spec §1.2 `load_model`).

    Reparameterization may have created a bias on Swin `reduction` (so a zero bias is added where the
    state has one), token-wise scales change quantizer shapes (handled by the quantizers themselves),
    and LayerNorm-fed inputs become per-tensor (the `granularity` attribute follows the loaded scales).
    """
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.bias is None and f"{name}.bias" in state:
            m.bias = nn.Parameter(torch.zeros(m.out_features, device=m.weight.device, dtype=m.weight.dtype))
    model.load_state_dict(state)
    for name, q in quantizers_of(model, role="act"):
        if isinstance(q, UniformQuantizer) and f"{name}.scale" in state:
            q.granularity = granularity_of_scale(q.scale)
