"""RepQ-ViT (Li et al., ICCV 2023, zkkli/RepQ-ViT): the baseline ERQ starts from.

Quantizer placement (spec §2.2): asymmetric per-row weights; per-tensor activations, except the
LayerNorm outputs feeding qkv / fc1 (and, in RepQ-ViT, Swin's `reduction`), which are first fitted per
channel; log-sqrt2 quantizer for the post-softmax probabilities; fractional zero-points allowed.

Pipeline:
  1. Lazy calibration: one forward over the calibration batch in which every enabled quantizer fits
     itself on the first tensor it sees (the references' `inited` flag): percentile grid + MSE
     (`common.calib.percentile`). RepQ-ViT quantizes weights during this pass, ERQ does not.
  2. Scale reparameterization: the per-channel (Δ_c, z_c) are folded into the LayerNorm affine and the
     next linear (`common.calib.reparam`); the activation quantizer becomes per-tensor (Δ̄, z̄) and the
     linear's weight quantizer is refitted on the rescaled weights.
Both methods share these steps; `erq.method.ERQ` adds Aqer / Wqer on top.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Callable, Iterator, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from timm.models.swin_transformer import PatchMerging
from torch import nn

from common.run.registry import PTQMethod, register_method, scheme_from_bits
from common.calib.percentile import search_log_sqrt2_percentile, search_uniform_percentile
from common.quant.granularity import PerChannel, PerTensor
from common.quant.modules import QuantLinear
from common.quant.quantizers import LogQuantizer, Quantizer, UniformQuantizer, quant_state, quantizers_of
from common.quant.scheme import QuantScheme
from common.quant.wrap import wrap_model
from common.calib.reparam import reparameterize_layernorm

from .dual_uniform import DualUniformQuantizer
from .linalg import single_threaded

__all__ = ["RepQViT", "fit_quantizer", "lazy_init", "reparam_pairs", "apply_reparam", "build_scheme"]
log = logging.getLogger(__name__)

REPARAM_SITES = ("norm1", "norm2", "downsample")


def build_scheme(bits: DictConfig, cfg: DictConfig) -> QuantScheme:
    """The RepQ/ERQ quantizer placement for the bits config and the method config."""
    sites = tuple(cfg.reparam.sites) if cfg.reparam.enabled else ()
    ln_sites = ("qkv", "fc1") + (("reduction",) if "downsample" in sites else ())
    scheme = scheme_from_bits(bits, ln_act_granularity="channel" if cfg.reparam.enabled else "tensor",
                              ln_sites=ln_sites, softmax_quantizer="log_sqrt2", round_zero_point=False)
    if cfg.get("patch_embed_a_bit") is not None:  # RepQ-ViT quantizes the image to 8 bits
        scheme = dataclasses.replace(scheme, patch_embed_a_bit=int(cfg.patch_embed_a_bit))
    return scheme


@torch.no_grad()
def fit_quantizer(q: nn.Module, x: torch.Tensor, act_grid: Sequence[float], weight_grid: Sequence[float]) -> None:
    """Fit one quantizer on tensor x with the RepQ-ViT percentile searches.

    Uniform weights: one search per output row (conv: per output channel) on the weight grid.
    Uniform activations: per tensor, or per last-dim channel (PerChannel(-1)), on the activation grid.
    log-sqrt2: one scale for the tensor. Dual-uniform weights are fitted by `DualUniformQuantizer.fit`.
    """
    if isinstance(q, LogQuantizer):
        q.set_qparams(search_log_sqrt2_percentile(x, q.bits, act_grid))
    elif isinstance(q, UniformQuantizer):
        if q.symmetric:
            raise ValueError("RepQ/ERQ quantizers are asymmetric")
        if q.role == "weight":
            s, z = search_uniform_percentile(x.reshape(x.shape[0], -1), q.bits, weight_grid)
            shape = (x.shape[0],) + (1,) * (x.dim() - 1)
            q.set_qparams(s.reshape(shape), z.reshape(shape))
        elif isinstance(q.granularity, PerChannel) and q.granularity.axes in ((-1,), (x.dim() - 1,)):
            s, z = search_uniform_percentile(x.reshape(-1, x.shape[-1]).T.contiguous(), q.bits, act_grid)
            q.set_qparams(s, z)
        elif isinstance(q.granularity, PerTensor):
            s, z = search_uniform_percentile(x.reshape(1, -1), q.bits, act_grid)
            q.set_qparams(s, z)
        else:
            raise ValueError(f"RepQ/ERQ activation quantizers are per tensor or per channel, not {q.granularity}")
    else:
        raise TypeError(f"cannot fit a {type(q).__name__} with the percentile search")


@contextlib.contextmanager
def lazy_init(model: nn.Module, act_grid: Sequence[float], weight_grid: Sequence[float]) -> Iterator[None]:
    """While active, every enabled, uncalibrated quantizer fits itself on the first tensor it receives."""
    handles = []

    def hook(q: Quantizer, args):
        if q.enabled and q.bits < 32 and not bool(q.calibrated):
            with single_threaded():  # a chain of cache-sized element-wise ops: threads only add sync cost
                fit_quantizer(q, args[0].detach(), act_grid, weight_grid)

    for _, q in quantizers_of(model):
        if isinstance(q, (UniformQuantizer, LogQuantizer)):
            handles.append(q.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def reparam_pairs(model: nn.Module, sites: Sequence[str]) -> list[tuple[str, nn.LayerNorm, nn.Linear]]:
    """(name, LayerNorm, consumer linear) pairs to reparameterize: blocks' norm1→attn.qkv,
    norm2→mlp.fc1, and Swin PatchMerging norm→reduction (`downsample`)."""
    bad = set(sites) - set(REPARAM_SITES)
    if bad:
        raise ValueError(f"unknown reparam sites {sorted(bad)}; use a subset of {list(REPARAM_SITES)}")
    pairs = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if "norm1" in sites and isinstance(getattr(m, "norm1", None), nn.LayerNorm) and \
                isinstance(getattr(getattr(m, "attn", None), "qkv", None), nn.Linear):
            pairs.append((prefix + "norm1", m.norm1, m.attn.qkv))
        if "norm2" in sites and isinstance(getattr(m, "norm2", None), nn.LayerNorm) and \
                isinstance(getattr(getattr(m, "mlp", None), "fc1", None), nn.Linear):
            pairs.append((prefix + "norm2", m.norm2, m.mlp.fc1))
        if "downsample" in sites and isinstance(m, PatchMerging) and isinstance(m.norm, nn.LayerNorm):
            pairs.append((prefix + "norm", m.norm, m.reduction))
    return pairs


@torch.no_grad()
def apply_reparam(pairs: list[tuple[str, nn.LayerNorm, nn.Linear]], round_mean_zero_point: bool = False) -> list[str]:
    """Fold each consumer's per-channel input (Δ_c, z_c) into the LayerNorm and the linear.

    The input quantizer becomes per-tensor (Δ̄, z̄) and the weight quantizer is marked uncalibrated
    (its weights were rescaled). Returns the names of the reparameterized norms.
    """
    done = []
    for name, norm, lin in pairs:
        aq = lin.input_quantizer
        if not (isinstance(aq, UniformQuantizer) and bool(aq.calibrated) and aq.scale.numel() > 1):
            continue
        rep = reparameterize_layernorm(norm, lin, aq.scale.detach(), aq.zero_point, round_mean_zero_point)
        aq.set_qparams(rep.scale, rep.zero_point)
        aq.granularity = PerTensor()
        if isinstance(lin.weight_quantizer, Quantizer):
            lin.weight_quantizer.calibrated.fill_(False)
        done.append(name)
    return done


def _ensure_bias(linear: nn.Linear) -> None:
    """Give a bias-free linear a zero bias (reparameterization writes one; the state dict must have it)."""
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, device=linear.weight.device,
                                               dtype=linear.weight.dtype))


@register_method("repq")
class RepQViT(PTQMethod):
    """RepQ-ViT: percentile-MSE quantizer init + LayerNorm scale reparameterization, no reconstruction."""

    tasks = ("classification", "sr", "detection")  # per-layer maths; ERQ inherits it (its SR settings: conf/method_task/)

    # ------------------------------------------------------------------ shared steps
    def act_grid(self) -> list[float]:
        return [float(p) for p in self.cfg.act_init.grid]

    def weight_grid(self) -> list[float]:
        return [float(p) for p in self.cfg.weight_init.grid]

    def prepare(self, model: nn.Module) -> nn.Module:
        """Wrap the FP model and make its structure final (so cached state dicts load into it)."""
        wrap_model(model, build_scheme(self.bits, self.cfg))
        if self.cfg.reparam.enabled:
            for _, _, lin in reparam_pairs(model, list(self.cfg.reparam.sites)):
                if isinstance(lin, QuantLinear) and not isinstance(lin.input_quantizer, UniformQuantizer):
                    continue
                _ensure_bias(lin)
        return model.to(self.ctx.device)

    def act_init_images(self, images: torch.Tensor) -> torch.Tensor:
        k = self.cfg.act_init.get("images")
        return images if k is None else images[:int(k)]

    def images(self, data) -> dict[str, int]:
        """`calibration` (weights, reparam, Aqer / Wqer) and `act_init` (the activation-init forward: ERQ's
        first 32, RepQ-ViT's all)."""
        n = self.n_calib()
        k = self.cfg.act_init.get("images")
        return {"calibration": n, "act_init": n if k is None else min(n, int(k))}

    @torch.no_grad()
    def calibrate(self, model: nn.Module, images: torch.Tensor) -> None:
        """One forward over the activation-init images, every quantizer fitting itself lazily."""
        x = self.act_init_images(images).to(self.ctx.device)
        with quant_state(model, weight=bool(self.cfg.act_init.quantize_weights), act=True), \
                lazy_init(model, self.act_grid(), self.weight_grid()):
            model(x)

    def reparameterize(self, model: nn.Module) -> list[str]:
        if not self.cfg.reparam.enabled:
            return []
        return apply_reparam(reparam_pairs(model, list(self.cfg.reparam.sites)),
                             bool(self.cfg.reparam.round_mean_zero_point))

    @torch.no_grad()
    def fit_weights(self, model: nn.Module, only_uncalibrated: bool = True) -> None:
        """Fit weight quantizers directly on the current weights (the references' re-calibration pass)."""
        for _, m in model.named_modules():
            q = getattr(m, "weight_quantizer", None)
            if isinstance(q, UniformQuantizer) and q.bits < 32 and not (only_uncalibrated and bool(q.calibrated)):
                with single_threaded():
                    fit_quantizer(q, m.weight.detach(), self.act_grid(), self.weight_grid())

    def stage_key(self, *sections: str) -> dict:
        """Config sections a stage depends on (plus bits and n_calib)."""
        cfg = OmegaConf.to_container(self.cfg, resolve=True)
        return {"bits": OmegaConf.to_container(self.bits, resolve=True), "method": self.name,
                "n_calib": cfg.get("n_calib"), **{s: cfg.get(s) for s in sections}}

    def model_stage(self, model: nn.Module, name: str, key: dict, work: Callable[[], None]) -> str:
        """Run `work` (which changes `model` in place) as a cached stage holding the model's state dict.

        A finished stage is loaded instead of recomputed (resume); returns the stage's signature.
        """
        def compute() -> dict:
            work()
            return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}

        result, sig = self.ctx.stage(name, key, compute)
        model.load_state_dict(result["state_dict"])
        return sig

    @staticmethod
    def enable_all(model: nn.Module) -> nn.Module:
        for _, q in quantizers_of(model):
            q.enabled = True
        return model

    # ------------------------------------------------------------------ method
    def quantize(self, model: nn.Module, data) -> nn.Module:
        images, _ = data.calibration(self.n_calib())
        self.prepare(model)

        def work() -> None:
            with self.ctx.timed("repq_calibrate"):
                self.calibrate(model, images)
            with self.ctx.timed("repq_reparam"):
                names = self.reparameterize(model)
            with self.ctx.timed("repq_weight_init"):
                self.fit_weights(model, only_uncalibrated=True)
            log.info("RepQ-ViT: reparameterized %d LayerNorms", len(names))

        self.model_stage(model, "repq_init", self.stage_key("act_init", "weight_init", "reparam", "patch_embed_a_bit"),
                         work)
        return self.enable_all(model)
