"""ERQ (Zhong et al., ICML 2024 / TPAMI 2025, zysxmu/ERQ): error reduction on top of RepQ-ViT.

Stages (spec §1.2), each switchable from `conf/method/erq.yaml`:
  A. activation calibration (RepQ-ViT lazy init, weights FP, first 32 images)      `act_init`
  B. LayerNorm reparameterization of norm1→qkv and norm2→fc1 (fractional z̄)        `reparam`
  C–F, per layer, streaming unit by unit over the calibration images:
     statistics G = ÃᵀÃ, C = Ãᵀ(X − X̃) of the FP input (no activation dump)          `erq.stats`
     Aqer: ridge regression of W, b against the own input-quantization error       `aqer`
     weight re-calibration on the Aqer-updated weights (10-point grid; dual-uniform `weight_init`,
     grids for qkv / fc1)                                                             `dual_uniform`
     Wqer: halving column blocks, rounding refinement, ridge compensation; the     `wqer`
     patch-embed conv gets the ridge step without refinement
After stage B every layer's Aqer and Wqer depend only on its own FP input, its own activation
quantizer and its own weights, so layers are processed independently as soon as a unit's forward has
streamed their statistics; the next unit's input is that forward's (pre-update) FP output.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from common.calib.capture import batched
from common.run.registry import register_method
from common.quant.modules import QuantConv2d, QuantLinear
from common.quant.quantizers import Quantizer, UniformQuantizer, quant_state
from common.quant.wrap import quant_layers
from common.models.units import model_units

from .aqer import aqer_update
from .dual_uniform import DualUniformQuantizer
from .linalg import SuffixCholesky, ridge_matrix, single_threaded
from .repq import RepQViT, fit_quantizer
from .stats import LayerStats, collect_stats
from .wqer import WeightGrid, wqer_layer

__all__ = ["ERQ"]
log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _features(layer: nn.Module) -> int:
    if isinstance(layer, QuantConv2d):
        return layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
    return layer.in_features


def _quantizing(q: nn.Module) -> bool:
    return isinstance(q, Quantizer) and q.bits < 32


def weight_grid_of(q: nn.Module, d_out: int) -> WeightGrid:
    """The frozen grid of a fitted per-row uniform or dual-uniform weight quantizer."""
    if isinstance(q, DualUniformQuantizer):
        scale, zp = q.grid()
        return WeightGrid(scale.detach(), zp.detach(), q.bits)
    if isinstance(q, UniformQuantizer):
        return WeightGrid(q.scale.detach().reshape(d_out, 1), q.zero_point.reshape(d_out, 1), q.bits)
    raise TypeError(f"Wqer needs a uniform weight quantizer, got {type(q).__name__}")


@register_method("erq")
class ERQ(RepQViT):
    """RepQ-ViT init, then Aqer, weight re-calibration and Wqer, layer by layer."""

    def prepare(self, model: nn.Module) -> nn.Module:
        super().prepare(model)
        du = self.cfg.dual_uniform
        if du.enabled:
            for _, m in quant_layers(model, (QuantLinear,)):
                if m.site in du.sites and _quantizing(m.weight_quantizer):
                    m.weight_quantizer = DualUniformQuantizer(m.weight_quantizer.bits, m.out_features,
                                                              m.in_features).to(m.weight.device)
        return model

    # ------------------------------------------------------------------ λ and switches per layer
    def aqer_applies(self, layer: nn.Module) -> bool:
        a = self.cfg.aqer
        return bool(a.enabled) and layer.site not in a.skip_sites and _quantizing(layer.input_quantizer)

    def wqer_applies(self, layer: nn.Module) -> bool:
        w = self.cfg.wqer
        if not w.enabled or not _quantizing(layer.weight_quantizer):
            return False
        return bool(w.conv) if isinstance(layer, QuantConv2d) else layer.site not in w.skip_sites

    def aqer_lambda(self, layer: nn.Module) -> float:
        a = self.cfg.aqer
        return float(a.head_lambda) if layer.site == "head" else float(a.lambda_scale) * float(self.cfg.coe)

    def wqer_lambda(self, layer: nn.Module) -> float:
        w = self.cfg.wqer
        if isinstance(layer, QuantConv2d):
            return float(w.conv_lambda_scale) * float(self.cfg.coe)
        if layer.site == "head" and not w.head_lambda_overwritten:
            return float(self.cfg.aqer.head_lambda)
        return float(w.lambda_scale) * float(self.cfg.coe)

    # ------------------------------------------------------------------ per layer
    @torch.no_grad()
    def reduce_layer(self, layer: nn.Module, stats: LayerStats) -> dict:
        """Aqer → weight re-calibration → Wqer for one layer; returns diagnostics."""
        cfg, ctx = self.cfg, self.ctx
        d_out = layer.weight.shape[0]
        w = layer.weight.detach().reshape(d_out, -1).clone()
        b = None if layer.bias is None else layer.bias.detach().clone()
        has_bias = b is not None
        gram = stats.gram if has_bias else stats.gram[:-1, :-1]
        do_aqer, do_wqer = self.aqer_applies(layer), self.wqer_applies(layer)
        lam1, lam2 = self.aqer_lambda(layer), self.wqer_lambda(layer)
        pen1 = bool(cfg.aqer.penalize_bias) or not has_bias
        pen2 = bool(cfg.wqer.penalize_bias) or not has_bias
        info: dict = {"layer": layer.qname, "aqer": do_aqer, "wqer": do_wqer}

        chol1 = chol2 = None
        with ctx.timed("erq_aqer"):
            if do_aqer:
                chol1 = SuffixCholesky(ridge_matrix(gram, lam1, pen1))
                w, b = aqer_update(w, b, stats, lam1, cfg.aqer.penalize_bias, chol=chol1)
        with ctx.timed("erq_weight_init"):
            self.refit_weights(layer, w)
            wq = layer.weight_quantizer
        with ctx.timed("erq_wqer"):
            if do_wqer:
                if chol1 is not None and lam1 == lam2 and pen1 == pen2 and cfg.wqer.compensate:
                    chol2 = chol1  # same ridge matrix: one factorisation serves both steps
                grid = weight_grid_of(wq, d_out)
                refine = bool(cfg.wqer.refine.enabled) and not isinstance(layer, QuantConv2d) and \
                    layer.site in cfg.wqer.refine.sites
                v0 = torch.cat([w, b[:, None]], 1) if has_bias else w.clone()
                w, b = wqer_layer(w, b, stats.gram, grid, lam2, penalize_bias=bool(cfg.wqer.penalize_bias),
                                  refine=refine, max_iters=int(cfg.wqer.refine.max_iters),
                                  compensate=bool(cfg.wqer.compensate), chol=chol2)
                if cfg.get("diagnostics"):
                    info.update(self._output_errors(v0, w, b, grid, stats.gram, has_bias))
        layer.weight.copy_(w.reshape(layer.weight.shape))
        if has_bias:
            layer.bias.copy_(b)
        return info

    @staticmethod
    def _output_errors(v0, w, b, grid: WeightGrid, gram_ext, has_bias) -> dict:
        """‖Ã(V̂ − V)ᵀ‖² of Wqer and of plain round-to-nearest, relative to the Aqer output (diagnostic)."""
        d_in = w.shape[1]
        rtn_w = grid.dequant(v0[:, :d_in], slice(0, d_in), "round")
        g = gram_ext if has_bias else gram_ext[:-1, :-1]

        def err(v: torch.Tensor) -> float:
            e = (v - v0).double()
            return float(((e @ g) * e).sum())

        v_hat = torch.cat([w, b[:, None]], 1) if has_bias else w.clone()
        if not has_bias:  # the last column is RTN-quantized at inference
            v_hat[:, -1] = grid.dequant(w[:, -1:], slice(d_in - 1, d_in), "round")[:, 0]
        v_rtn = torch.cat([rtn_w, v0[:, d_in:]], 1)
        return {"wqer_err": err(v_hat), "rtn_err": err(v_rtn)}

    # ------------------------------------------------------------------ streaming over units
    @torch.no_grad()
    def reduce_errors(self, model: nn.Module, images: torch.Tensor) -> None:
        """Stages C–F: stream each unit's FP forward, then reduce its layers' errors."""
        cfg, ctx = self.cfg, self.ctx
        dtype = _DTYPES[str(cfg.stats_dtype)]
        x = images.to(ctx.device)
        units = model_units(model)
        for unit in tqdm(units, desc="erq error reduction", mininterval=2.0, leave=False):
            layers = {m.qname: m for _, m in quant_layers(unit.module, (QuantLinear, QuantConv2d))}
            stats = {n: LayerStats(_features(m), weight=m.weight if self.aqer_applies(m) else None, dtype=dtype,
                                   device=ctx.device)
                     for n, m in layers.items() if self.aqer_applies(m) or self.wqer_applies(m)}
            with ctx.timed("erq_stats"):
                with quant_state(model, weight=False, act=False), \
                        collect_stats({n: layers[n] for n in stats}, stats):
                    x = torch.cat([unit(b) for b in batched(x, int(cfg.batch_size))])
            for name, layer in layers.items():
                if name in stats:
                    with single_threaded():  # per-layer solves, searches and refinement: small ops
                        info = self.reduce_layer(layer, stats[name])
                    if cfg.get("diagnostics"):
                        ctx.tracker.log({"event": "erq_layer", **info})
                else:  # FP layer or every step switched off: plain weight re-calibration
                    with ctx.timed("erq_weight_init"), single_threaded():
                        self.refit_weights(layer)
            del stats

    def refit_weights(self, layer: nn.Module, w: torch.Tensor | None = None) -> None:
        """Stage E: fit the layer's weight quantizer on its (Aqer-updated) weights w (d_out, ·)."""
        wq = layer.weight_quantizer
        w = layer.weight.detach() if w is None else w.reshape(layer.weight.shape)
        if isinstance(wq, DualUniformQuantizer):
            du = self.cfg.dual_uniform
            base = w.shape[0] if du.k_from == "out_features" else w.shape[1]
            wq.fit(w, self.weight_grid(), base // int(du.k_divisor), float(du.percentile))
        elif _quantizing(wq):
            wq.calibrated.fill_(False)
            fit_quantizer(wq, w, self.act_grid(), self.weight_grid())

    # ------------------------------------------------------------------ method
    def quantize(self, model: nn.Module, data) -> nn.Module:
        images, _ = data.calibration(self.n_calib())
        self.prepare(model)

        def calibrate() -> None:
            with self.ctx.timed("erq_act_init"):
                self.calibrate(model, images)
            with self.ctx.timed("erq_reparam"):
                self.reparameterize(model)

        sig = self.model_stage(model, "erq_calibrate",
                               self.stage_key("act_init", "reparam", "patch_embed_a_bit", "dual_uniform"), calibrate)
        key = {"upstream": sig, **self.stage_key("coe", "aqer", "wqer", "weight_init", "dual_uniform", "stats_dtype")}
        self.model_stage(model, "erq_reduce", key, lambda: self.reduce_errors(model, images))
        return self.enable_all(model)
