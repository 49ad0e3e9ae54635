"""Block reconstruction (BRECQ / QDrop / APHQ "optimize", aphq spec §4.2 and §4.5), shared by the methods.

Units (`common.models.units.model_units`: patch_embed, every block, every Swin PatchMerging, head) are
reconstructed in forward order. For each unit:

* its weight quantizers become AdaRound (`common.recon.adaround`) and its activation quantizers, of
  every family, switch to their training form (`ste`: straight-through rounding; AdaLog: the exact
  base) and, in `qdrop` mode, QDrop with `drop_prob`; the parameters they declare through the
  `Quantizer.scale_parameters()` protocol (uniform and log scales, AdaLog's scale) are learned;
* 'iters' steps of Adam on α (lr `w_lr`) and on those scales (lr `a_lr`, cosine to 0), each on
  `randperm(N)[:batch_size]` samples:

      x     = x_q (qinp) | x_fp (rinp) | where(U < drop_prob, x_q, x_fp) elementwise (qdrop)
      rec   = mean((ŷ − y_fp)² · W)                    hessian_perturb / hessian_brecq (W broadcast or W[idx])
            = mean_{other} Σ_{dim 1} (ŷ − y_fp)² / loss_div   (|·| for mae)       mse / mae
            = KL(softmax(y_fp) ‖ softmax(ŷ)) 'batchmean'                         head unit, any metric
      rec   ← 2·rec / rec₁  (rec₁ = first step's rec; `init_loss_norm`, post-73e78a7 reference)
            = Σ_terms c_k·term_k / term_k⁰   in general (`loss_norm`: per-term scale c_k or unnormalised;
              term_k⁰ re-taken whenever a `step_hook` asks; terms from the caller's `unit_loss`, metric custom)
      round = 0 for t < warmup·iters, else λ Σ (1 − |2h(α) − 1|^β(t))
      loss  = rec + round

* then hard rounding is written into the weights (`finalize_adaround`) and the activation
  quantizers go back to eval (no STE, no QDrop).

Targets come from the FP teacher `fp_model` (the GELU model, even when `qmodel` had its MLPs
reconstructed with ReLU). Faster than the reference with the same maths (spec §7): the FP unit
inputs/outputs come from ONE walk over the FP model (each unit forward once, only the current
unit's tensors kept), the quantized input of unit ℓ+1 is computed incrementally as
pre(unit_ℓ^quant(x_q,ℓ)) right after unit ℓ is finalised (one unit forward instead of a whole
quantized-model sweep), ⌊W/s⌋ is cached by AdaRound, parameters that are not learned get
`requires_grad=False` (no wasted weight/bias/LayerNorm gradients), the round loss is skipped during
warm-up, activation quantizers train through a hand-fused STE/QDrop autograd function, and
`cfg.compile` optionally `torch.compile`s those kernels or the whole unit (as one graph, no breaks).

Randomness: every unit draws its batches from a CPU generator and its QDrop masks from the global
RNG, both seeded from (run generator, unit index), so a run resumed at unit k (`start_unit=k`)
reproduces an uninterrupted run exactly (the caller RNG state is restored afterwards).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from common.recon.adaround import attach_adaround, beta_schedule, finalize_adaround
from common.settings import dataclass_from
from common.quant.quantizers import Quantizer, UniformQuantizer, calibration_pinned, quantizers_of
from common.models.units import Unit, model_units

__all__ = ["BlockReconConfig", "block_recon_config", "reconstruct_model", "unit_rec_loss", "keep_mask",
           "tune_cpu_allocator", "WeightsArg", "learned_scales", "StepHook", "HookState", "UnitLossFn"]

#: weights(unit_name, quantized_input, fp_input) -> per-unit loss weights (1, *out) / (N, *out), or None.
WeightsArg = Callable[[str, torch.Tensor, torch.Tensor], "torch.Tensor | None"] | Mapping[str, torch.Tensor] | None

_MODES = ("qdrop", "qinp", "rinp")
_METRICS = ("hessian_perturb", "hessian_brecq", "mse", "mae", "custom")
_IGNORED_KEYS = {"name", "n_images", "enabled", "temp", "eps", "keep_gpu", "head_loss", "draw", "augment",
                 "aph_mode", "aph_batch_size"}


@dataclass
class BlockReconConfig:
    """Block-reconstruction hyper-parameters (defaults: the reference's, spec §4.5 and §5).

    Attributes:
        iters: optimizer steps per unit (20 000).
        batch_size: samples per step (32).
        w_lr: Adam lr of the AdaRound α (1e-3, no schedule).
        a_lr: Adam lr of the activation scales (4e-5, cosine-annealed to 0 over `iters`).
        round_lambda: λ of the rounding regulariser (0.01; summed, not averaged, over all weights).
        beta_start, beta_end, warmup: β schedule 20 → 2, linear after the first `warmup`·iters steps.
        mode: block input: "qdrop" (elementwise mix), "qinp" (quantized prefix) or "rinp" (FP input).
        drop_prob: QDrop probability of KEEPING the quantized value (input mix and every act quantizer).
        metric: "hessian_perturb" (APH), "hessian_brecq" (Fisher g²), "mse", "mae", or "custom" (the
            caller's `unit_loss` gives the terms; the objective statistics then report the mse).
        use_mean_hessian: average per-sample weights over samples before use (hessian_perturb only).
        init_loss_norm: rec ← 2·rec/rec₁ (reference after 73e78a7). False: the pre-73e78a7 variant,
            weights rescaled to mean 1 and rec = Σ_{dim1}(…)/10 averaged (best effort from the spec).
        learn_act_scale: train the activation scales, i.e. every `scale_parameters()` of the unit's active
            activation quantizers, whatever their family (reference: always).
        loss_div: the mse / mae reconstruction loss is divided by this (AdaLog's "Retrain": 10; 1 elsewhere).
        log_every: loss-curve logging period (0: first and last step only).
        compile: "auto" (default): "kernels" from `AUTO_COMPILE_ITERS` (5000) steps per unit on, eager
            below; False: eager; True / "kernels": torch.compile the fused fake-quant kernels (one fused
            loop per quantizer forward/backward, shared by all units; 10–60 s of compilation on CPU,
            worth it for full-length runs: DeiT-T block step 0.28 → 0.225 s on 2 threads; same
            expressions, float-rounding-level differences; a compiler failure falls back to eager with
            a warning); "unit": torch.compile each unit's training forward as one graph (no graph
            breaks: quantizer `calibrated` flags are pinned to Python bools while the unit trains, the
            QDrop bits are drawn out of place, the fused fake-quant traces its out-of-place form; for
            GPUs, where it fuses whole units; recompiles per unit).
        eval_batch_size: batch of the capture / incremental-input / statistics passes.
        seed: seed of the run generator when the caller passes none.
        eval_stats: compute the unit objective over all samples before and after training.
        fused_quant: train activation quantizers with a fused STE fake-quant + QDrop autograd function
            (same forward values bit for bit, same gradient formula, far fewer elementwise passes; the
            QDrop mask at drop_prob 0.5 is drawn from random bits). It uses the clamp subgradient 1 at the
            grid ends, as the reference's torch 1.10 did; the plain UniformQuantizer path (False)
            follows the installed torch, whose clamp gradient is 0 there (torch 2.14).
        tune_allocator: on CPU, call `tune_cpu_allocator` (no page faults on re-allocated activations).
        loss_norm: per-term normalisation {term: scale or None}. Each loss term (the metric's name, "head"
            for the head unit's KL, or the term names of a `unit_loss`) enters as scale·term/term₀, term₀
            its detached value at the first step and at every step where a `step_hook` sets
            `reset_norm`; None: the term enters unnormalised. Terms not listed: 2.0 with `init_loss_norm`
            (APHQ: 2·rec/rec₁ for every unit, head included), else None.
    """

    iters: int = 20000
    batch_size: int = 32
    w_lr: float = 1e-3
    a_lr: float = 4e-5
    round_lambda: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    mode: str = "qdrop"
    drop_prob: float = 0.5
    metric: str = "hessian_perturb"
    use_mean_hessian: bool = True
    init_loss_norm: bool = True
    learn_act_scale: bool = True
    loss_div: float = 1.0
    log_every: int = 100
    compile: bool | str = "auto"
    eval_batch_size: int = 128
    seed: int = 3407
    eval_stats: bool = True
    fused_quant: bool = True
    tune_allocator: bool = True
    loss_norm: dict | None = None

    def __post_init__(self):
        if self.mode not in _MODES:
            raise ValueError(f"block reconstruction mode must be one of {_MODES}, got {self.mode!r}")
        if self.metric not in _METRICS:
            raise ValueError(f"block reconstruction metric must be one of {_METRICS}, got {self.metric!r} "
                             "(the reference's 'hessian' is unimplemented there too)")
        if not 0.0 <= float(self.drop_prob) <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {self.drop_prob}")
        _compile_mode(self.compile)


#: `compile="auto"` compiles the fake-quant kernels from this many steps per unit on (the one-off
#: compilation, ~10–60 s on CPU, is then a small fraction of the unit's training time).
AUTO_COMPILE_ITERS = 5000


def _compile_mode(value: bool | str, iters: int | None = None) -> str | None:
    """None (eager), "kernels" or "unit" from the `compile` setting; "auto" picks kernels for long runs."""
    mode = {"false": None, "true": "kernels", "none": None, "": None}.get(str(value).lower(), str(value).lower())
    if mode not in (None, "kernels", "unit", "auto"):
        raise ValueError(f"compile must be false, auto, true/'kernels' or 'unit', got {value!r}")
    if mode == "auto":
        return "kernels" if iters is not None and iters >= AUTO_COMPILE_ITERS else None
    return mode


def block_recon_config(cfg: Any = None, **overrides) -> BlockReconConfig:
    """BlockReconConfig from a dataclass, dict or DictConfig (+ keyword overrides); unknown keys warn."""
    return dataclass_from(BlockReconConfig, cfg, _IGNORED_KEYS, "block_recon", **overrides)


# --------------------------------------------------------------------------- losses


def unit_rec_loss(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, metric: str, kind: str,
                  legacy: bool = False, loss_div: float = 1.0) -> torch.Tensor:
    """Reconstruction loss of one batch (before the first-step normalisation).

    Args:
        out, target: unit output and FP target, same shape.
        weight: APH / Fisher weights broadcastable to `out` (already indexed for per-sample weights).
        metric: see `BlockReconConfig.metric`; the `head` kind always uses KL(softmax(y)‖softmax(ŷ)).
        legacy: pre-73e78a7 form Σ_{dim1}(·)/10, averaged (weights are expected normalised to mean 1).
        loss_div: divisor of the mse / mae loss (not of the head's KL).
    """
    if kind == "head":
        return F.kl_div(F.log_softmax(out, dim=-1), F.softmax(target, dim=-1), reduction="batchmean")
    if metric in ("hessian_perturb", "hessian_brecq"):
        e = (out - target).square() * weight
        return e.sum(1).mean() / 10 if legacy else e.mean()
    e = (out - target).square() if metric == "mse" else (out - target).abs()
    return e.sum(1).mean() / loss_div if loss_div != 1.0 else e.sum(1).mean()


# --------------------------------------------------------------------------- CPU allocator

_ALLOCATOR_TUNED = False


def tune_cpu_allocator(mmap_threshold: int = 64 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Keep freed large blocks in the heap (glibc `mallopt`), once per process; True if applied.

    A reconstruction step allocates and frees dozens of 5–20 MB activations; glibc serves those
    with fresh `mmap`s (or trims them back to the OS), so every step page-faults its memory in
    again, which costs as much as the arithmetic on CPU. Raising the mmap and trim thresholds makes
    the allocator reuse the blocks. Pure allocator policy: no effect on results; the process keeps
    its peak heap instead of returning it to the OS. No-op on non-glibc systems.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        # M_MMAP_THRESHOLD (-3); older glibc caps it at 32 MiB. M_TRIM_THRESHOLD (-1).
        ok = libc.mallopt(-3, int(mmap_threshold)) == 1 or libc.mallopt(-3, 32 << 20) == 1
        ok = libc.mallopt(-1, int(trim_threshold)) == 1 and ok
    except (OSError, AttributeError):
        ok = False
    _ALLOCATOR_TUNED = bool(ok)
    return _ALLOCATOR_TUNED


# --------------------------------------------------------------------------- fused training fake-quant

_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def keep_mask(like: torch.Tensor, prob: float) -> torch.Tensor:
    """Float 0/1 mask with P(1) = `prob`, same shape/device/dtype as `like` (QDrop's U(0,1) < p).

    For p = 0.5 (every QDrop config) each element is one random bit (8 per random byte): exactly
    Bernoulli(0.5), as float32 U < 0.5 is, at a fraction of the cost of one float draw per element
    on CPU. Other p use U(0,1) < p. Draws from the global RNG of the tensor's device.
    """
    if prob == 0.5:
        n = like.numel()
        sh = None if torch.compiler.is_compiling() else _BIT_SHIFTS.get(like.device)
        if sh is None:
            sh = torch.arange(8, dtype=torch.uint8, device=like.device)
            if not torch.compiler.is_compiling():
                _BIT_SHIFTS[like.device] = sh
        # randint(0, 256) draws the same bytes as uint8 `random_()` (one 32-bit draw each), out of place.
        b = torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8, device=like.device)
        bits = torch.bitwise_and(torch.bitwise_right_shift(b[:, None], sh), 1).reshape(-1)[:n]
        return _like_layout(bits.reshape(like.shape), like)
    return (torch.rand_like(like) < prob).to(like.dtype)  # rand_like fills `like`'s layout already


def _like_layout(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`mask` (logical order) as `like`'s dtype, laid out in memory like `like` (q, k, v are permuted
    views: elementwise kernels mixing their strides with a row-major mask run ~10x slower). The
    conversion pass does the transposition; values, and so the random stream, are unchanged."""
    if like.is_contiguous() or torch.compiler.is_compiling():
        return mask.to(like.dtype)
    return torch.empty_like(like).copy_(mask)


def _fq_forward_math(x, scale, zp, keep, qmax: float, need_x: bool, need_s: bool):
    """Out-of-place form of `_FakeQuantSTE.forward` (what `compile` hands to torch.compile). The QDrop
    mask stays an input: inductor's in-kernel RNG is 3x slower than `keep_mask` on CPU."""
    v = x / scale
    c = torch.round(v) + zp
    cc = c.clamp(0, qmax)
    u = cc - zp
    y = u * scale
    inside = (c == cc).to(x.dtype)
    if keep is not None:
        y = torch.where(keep > 0.5, y, x)
    t = ((u - inside * v) * (keep if keep is not None else 1.0)) if need_s else None
    pass_x = (inside if keep is None else torch.where(keep > 0.5, inside, 1.0)) if need_x else None
    return y, pass_x, t


def _fq_backward_math(g, pass_x, t, dims: tuple[int, ...]):
    grad_x = g * pass_x if pass_x is not None else None
    grad_s = (g * t).sum(dim=dims, keepdim=True) if (t is not None and dims) else (g * t if t is not None else None)
    return grad_x, grad_s


def _broadcast_dims(x_shape: torch.Size, p_shape: torch.Size) -> tuple[int, ...]:
    """Dimensions of x over which a broadcast parameter's gradient is summed."""
    off = len(x_shape) - len(p_shape)
    return tuple(i for i in range(len(x_shape)) if i < off or (p_shape[i - off] == 1 and x_shape[i] != 1))


_COMPILED: dict[str, Callable] = {}
_COMPILE_BROKEN: list[str] = []  # the first compilation error, once torch.compile failed in this process


def _compiled_kernels() -> tuple[Callable, Callable]:
    if not _COMPILED:
        _COMPILED["fwd"] = torch.compile(_fq_forward_math, dynamic=False)
        _COMPILED["bwd"] = torch.compile(_fq_backward_math, dynamic=False)
    return _COMPILED["fwd"], _COMPILED["bwd"]


def _compile_failed(err: Exception) -> None:
    """Fall back to the eager kernels for the rest of the process (no C++ compiler, unsupported backend…)."""
    if not _COMPILE_BROKEN:
        _COMPILE_BROKEN.append(f"{type(err).__name__}: {err}"[:500])
        warnings.warn("block_recon: torch.compile of the fake-quant kernels failed, using the eager kernels "
                      f"(same maths; set method.recon.compile=false to silence this): {_COMPILE_BROKEN[0]}",
                      stacklevel=3)


class _FakeQuantSTE(torch.autograd.Function):
    """Asymmetric fake-quant with straight-through rounding and optional QDrop, fused by hand.

    Forward (bitwise the same values as `fake_quant_affine(..., ste=True)` + `where(keep, x̂, x)`):
        c = round(x/s) + z;  x̂ = (clamp(c, 0, qmax) − z)·s;  y = keep ? x̂ : x
    Backward (the STE derivative of that expression, `inside` = 1[0 ≤ c ≤ qmax]):
        ∂L/∂x = g·(keep·inside + 1 − keep)
        ∂L/∂s = Σ_broadcast g·keep·((clamp(c) − z) − inside·x/s)
    Both factors are formed in the forward pass, reusing its buffers (three fresh buffers per call:
    x/s, round, clamp; z folded into the clamp bounds), so the backward is one multiply per input,
    in place, plus one reduction; the difference (clamp(c) − z) − x/s is formed per element before
    summing (no cancellation between two large sums, unlike the autograd graph). With `compiled`,
    forward and backward are torch.compile'd kernels of the same expressions; traced inside a
    compiled unit (`compile="unit"`), the out-of-place expressions are traced.
    """

    @staticmethod
    def forward(ctx, x, scale, zp, qmax: float, keep, compiled: bool = False):
        need_x, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.scale_shape, ctx.compiled = scale.shape, False
        if torch.compiler.is_compiling():  # traced into a compiled unit: the out-of-place expressions
            y, pass_x, t = _fq_forward_math(x, scale, zp, keep, qmax, need_x, need_s)
            ctx.traced, ctx.dims = True, _broadcast_dims(x.shape, scale.shape)
            ctx.save_for_backward(pass_x, t)
            return y
        ctx.traced = False
        compiled = compiled and not _COMPILE_BROKEN
        if compiled:
            try:
                y, pass_x, t = _compiled_kernels()[0](x, scale, zp, keep, qmax, need_x, need_s)
            except Exception as err:  # noqa: BLE001 - any compiler failure: same maths eagerly
                _compile_failed(err)
            else:
                ctx.compiled, ctx.dims = True, _broadcast_dims(x.shape, scale.shape)
                ctx.save_for_backward(pass_x, t)
                return y
        y, pass_x, t = _fq_pass(x, scale, zp, qmax, keep, need_x, need_s)
        ctx.save_for_backward(pass_x, t)
        return y

    @staticmethod
    def backward(ctx, g):
        pass_x, t = ctx.saved_tensors
        if ctx.traced:
            grad_x, grad_s = _fq_backward_math(g, pass_x, t, ctx.dims)
            return grad_x, (grad_s.reshape(ctx.scale_shape) if grad_s is not None else None), None, None, None, None
        if ctx.compiled and not _COMPILE_BROKEN:
            try:
                grad_x, grad_s = _compiled_kernels()[1](g, pass_x, t, ctx.dims)
                if grad_s is not None:
                    grad_s = grad_s.reshape(ctx.scale_shape)
                return grad_x, grad_s, None, None, None, None
            except Exception as err:  # noqa: BLE001 - the saved factors mean the same in both paths
                _compile_failed(err)
        grad_s = t.mul_(g).sum_to_size(ctx.scale_shape) if t is not None else None  # t is not needed afterwards
        grad_x = None
        if pass_x is not None:  # in pass_x's buffer when that gives g·pass_x's own layout (it is not needed after)
            grad_x = pass_x.mul_(g) if g.stride() == pass_x.stride() else g * pass_x
        return grad_x, grad_s, None, None, None, None


def _fq_pass(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmax: float, keep: torch.Tensor | None,
             need_x: bool, need_s: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The eager elementwise sequence of `_FakeQuantSTE.forward`, in reused buffers: (y, pass_x, t)."""
    v = x / scale
    r = torch.round(v)
    u = torch.clamp(r, -zp, qmax - zp)  # = clamp(r + z, 0, qmax) − z exactly (integers; huge r saturates either way)
    inside = torch.eq(r, u, out=r) if (need_x or need_s) else None  # r is not needed any more
    t = pass_x = None
    if need_s:  # (clamp(c) − z) − inside·x/s, in v's buffer
        t = torch.addcmul(u, inside, v, value=-1, out=v)
    y = u.mul_(scale)  # u is not needed any more: three fresh buffers per call, not four
    if keep is not None:
        torch.lerp(x, y, keep, out=y)  # exact selection for 0/1 weights
        if t is not None:
            t.mul_(keep)
    if need_x:  # keep ? inside : 1, exact for 0/1 weights
        pass_x = inside if keep is None else torch.lerp(inside.new_ones(()).expand_as(inside), inside, keep,
                                                         out=inside)
    return y, pass_x, t


class _TrainingQuantizer(UniformQuantizer):
    """A UniformQuantizer while its unit is reconstructed: same state and knobs, fused STE/QDrop path."""

    compiled = False

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        if self.symmetric or not self.ste:
            return UniformQuantizer.fake_quant(self, x)
        z = (torch.round(self.zero_point) if self.round_zero_point else self.zero_point).detach()
        keep = keep_mask(x, float(self.drop_prob)) if (self.training and self.drop_prob < 1.0) else None
        return _FakeQuantSTE.apply(x, self.scale, z.to(x.dtype), float(2 ** self.bits - 1), keep, self.compiled)


# --------------------------------------------------------------------------- step hooks, custom losses

#: unit_loss(out, target, idx) -> {term name: scalar tensor} (raw terms; normalised by `cfg.loss_norm`).
UnitLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "dict[str, torch.Tensor]"]


@dataclass
class HookState:
    """What a `StepHook` sees: the unit in its current training state (AdaRound soft weights at the
    current α, activation quantizers with STE and QDrop on) before training step `step` (0-based), and
    the unit's cached tensors. Setting `reset_norm` re-takes every term's normaliser at this step."""

    unit: Unit
    index: int
    step: int
    iters: int
    module: nn.Module
    fp_in: torch.Tensor
    fp_out: torch.Tensor
    q_in: torch.Tensor
    device: torch.device
    tracker: Any = None
    reset_norm: bool = False


@dataclass
class StepHook:
    """A per-unit callback, run before training step `it` (0-based) when `it % every == 0` (every > 0)
    or `it in steps`; after the step's input batch is drawn, before its forward (the loss of that step
    already sees what the hook changed). Global-RNG draws inside the hook (QDrop masks) come from the
    unit's seeded stream, so runs stay reproducible."""

    fn: Callable[[HookState], None]
    every: int = 0
    steps: tuple[int, ...] = ()

    def due(self, it: int) -> bool:
        return (self.every > 0 and it % self.every == 0) or it in self.steps


def _norm_scale(cfg: "BlockReconConfig", term: str) -> float | None:
    table = cfg.loss_norm or {}
    if term in table:
        return None if table[term] is None else float(table[term])
    return 2.0 if cfg.init_loss_norm else None


# --------------------------------------------------------------------------- helpers


def _seed_for(base: int, index: int) -> int:
    return (base * 1_000_003 + 7919 * (index + 1)) % (2 ** 62)


@torch.no_grad()
def _apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, bs: int, device: torch.device) -> torch.Tensor:
    return torch.cat([fn(b.to(device)) for b in x.split(bs)])


def _act_quantizers(module: nn.Module) -> list[Quantizer]:
    """The unit's active activation quantizers, of every family (their learned parameters come from the
    `Quantizer.scale_parameters()` protocol, never from a family check here)."""
    return [q for _, q in quantizers_of(module, role="act") if q.active]


def learned_scales(act_qs: list[Quantizer]) -> list[nn.Parameter]:
    """The parameters block reconstruction learns for these quantizers (each once)."""
    out: list[nn.Parameter] = []
    for q in act_qs:
        out += [p for p in q.scale_parameters() if all(p is not o for o in out)]
    return out


class _Weights:
    """Resolves the per-unit loss weights from the `weights` argument."""

    def __init__(self, weights: WeightsArg, cfg: BlockReconConfig):
        self.weights, self.cfg = weights, cfg

    def __call__(self, unit: Unit, q_in: torch.Tensor, fp_in: torch.Tensor, device: torch.device
                 ) -> torch.Tensor | None:
        cfg = self.cfg
        if unit.kind == "head" or cfg.metric in ("mse", "mae", "custom"):
            return None
        if callable(self.weights):
            w = self.weights(unit.name, q_in, fp_in)
        elif self.weights is not None:
            w = self.weights.get(unit.name)
        else:
            w = None
        if w is None:
            raise ValueError(f"metric {cfg.metric!r} needs loss weights for unit {unit.name!r}; pass `weights` "
                             "(APH dict from aphq.aph.average_perturbation_hessian, or a callable)")
        w = w.to(device=device, dtype=torch.float32)
        if cfg.metric == "hessian_perturb" and cfg.use_mean_hessian and w.shape[0] > 1:
            w = w.mean(0, keepdim=True)
        if not cfg.init_loss_norm:
            w = w * (w.numel() / w.sum().clamp_min(torch.finfo(w.dtype).tiny))
        return w


def _weight_rows(w: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    if w is None or w.shape[0] == 1:
        return w
    return w[idx]


@torch.no_grad()
def _objective(module: nn.Module, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, cfg: BlockReconConfig,
               kind: str) -> float:
    """Un-normalised unit loss over all samples (eval mode), averaged over batches weighted by size
    (the mse for a `custom` metric, whose terms may depend on state gathered during training)."""
    total, n = 0.0, x.shape[0]
    metric = "mse" if cfg.metric == "custom" else cfg.metric
    for start in range(0, n, cfg.eval_batch_size):
        sl = slice(start, min(start + cfg.eval_batch_size, n))
        wb = w if (w is None or w.shape[0] == 1) else w[sl]
        loss = unit_rec_loss(module(x[sl]), y[sl], wb, metric, kind, legacy=not cfg.init_loss_norm,
                             loss_div=cfg.loss_div)
        total += float(loss) * (sl.stop - sl.start)
    return total / n


# --------------------------------------------------------------------------- public API


def reconstruct_model(qmodel: nn.Module, fp_model: nn.Module, images: torch.Tensor, cfg: Any = None,
                      weights: WeightsArg = None, tracker=None, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None, on_unit_done: Callable[[str], None] | None = None,
                      start_unit: int = 0, q_input: torch.Tensor | None = None, stop_unit: int | None = None,
                      progress: bool = True, step_hook: Callable[[Unit, int], StepHook | None] | None = None,
                      unit_loss: Callable[[Unit, int], UnitLossFn | None] | None = None) -> dict:
    """Reconstruct every unit of the calibrated wrapped model `qmodel`, in place.

    Args:
        qmodel: calibrated model from `common.quant.wrap.wrap_model` (possibly with ReLU MLPs after MR).
        fp_model: the FP teacher (GELU) with the same unit structure; unchanged.
        images: reconstruction images (the reference: 1024), kept in this order.
        cfg: BlockReconConfig, dict or DictConfig.
        weights: per-unit loss weights for the hessian metrics: a dict {unit: (1|N, *out)} (the APH), or a
            callable weights(unit_name, quantized_input, fp_input) called just before the unit trains (e.g.
            `aphq.aph.brecq_fisher_weights`); None for mse/mae. Per-sample weights are indexed with the
            batch indices. Not used for `head` (KL).
        tracker: `common.run.tracking.Tracker`; curve ``recon/<unit>`` gets loss, rec (normalised), rec_raw
            and round every `log_every` steps and at the first and last step.
        device: where captures and training live.
        generator: run-level CPU generator (default: seeded with `cfg.seed`); each unit's seed is drawn
            from it deterministically, so a fresh generator with the same seed reproduces a run.
        on_unit_done: called with the unit name right after the unit is finalised (checkpoint hook).
        start_unit: resume at this unit index; units before it must already be reconstructed in `qmodel`.
        q_input: the quantized input of unit `start_unit`'s module (default: recomputed from `images`
            through the finalised units, which gives the same tensor).
        stop_unit: stop before this unit index (default: all units).
        progress: show tqdm bars.
        step_hook: step_hook(unit, index) -> a `StepHook` run inside that unit's training loop (or None),
            called when the unit starts training; the hook sees the unit in its current training state.
        unit_loss: unit_loss(unit, index) -> the unit's loss terms function (`UnitLossFn`) or None (the
            built-in metric); required for metric "custom" on non-head units. Each term is normalised as
            `cfg.loss_norm` says; the curve also logs every raw term as ``rec_<term>``.

    Returns:
        {"units": {name: {"rec_first", "rec_last" (un-normalised training loss at the first/last step),
        "round_last", "objective_before", "objective_after" (unit loss over all images with the
        quantized input, before training with round-to-nearest and after hard rounding), "seconds",
        "sec_per_iter", "iters"}}, "seconds": total, "capture_seconds": FP/quant stream time}.
    """
    cfg = block_recon_config(cfg)
    device = torch.device(device)
    if cfg.tune_allocator and device.type == "cpu":
        tune_cpu_allocator()
    units_q, units_fp = model_units(qmodel), model_units(fp_model)
    if [u.name for u in units_q] != [u.name for u in units_fp]:
        raise ValueError("qmodel and fp_model must have the same units: "
                         f"{[u.name for u in units_q]} vs {[u.name for u in units_fp]}")
    stop = len(units_q) if stop_unit is None else min(stop_unit, len(units_q))
    if not 0 <= start_unit <= stop:
        raise ValueError(f"start_unit {start_unit} out of range 0..{stop}")
    gen = generator if generator is not None else torch.Generator().manual_seed(int(cfg.seed))
    base_seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
    resolve_w = _Weights(weights, cfg)
    if cfg.metric == "custom" and unit_loss is None:
        raise ValueError("metric 'custom' needs `unit_loss` (the caller's loss terms)")
    eb = cfg.eval_batch_size
    t_total = time.perf_counter()
    capture = 0.0
    saved_rg = [(p, p.requires_grad) for p in qmodel.parameters()]
    saved_train = [(m, m.training) for m in list(qmodel.modules()) + list(fp_model.modules())]
    stats: dict[str, dict] = {}
    try:
        qmodel.eval()
        fp_model.eval()
        for p, _ in saved_rg:
            p.requires_grad_(False)
        t0 = time.perf_counter()
        fp_prev = images
        for u in units_fp[:start_unit]:
            fp_prev = _apply(u.module, _apply(u.pre, fp_prev, eb, device), eb, device)
        if q_input is None:
            q_prev = images
            for u in units_q[:start_unit]:
                q_prev = _apply(u.module, _apply(u.pre, q_prev, eb, device), eb, device)
        capture += time.perf_counter() - t0
        for index in range(start_unit, stop):
            uq, uf = units_q[index], units_fp[index]
            t0 = time.perf_counter()
            fp_in = _apply(uf.pre, fp_prev, eb, device)
            fp_out = _apply(uf.module, fp_in, eb, device)
            if index == start_unit and q_input is not None:
                q_in = q_input.to(device)
            else:
                q_in = _apply(uq.pre, q_prev, eb, device)
            capture += time.perf_counter() - t0
            w = resolve_w(uq, q_in, fp_in, device)
            stats[uq.name] = _reconstruct_unit(uq, fp_in, fp_out, q_in, w, cfg, _seed_for(base_seed, index),
                                               tracker, device, progress, index=index,
                                               hook=step_hook(uq, index) if step_hook is not None else None,
                                               loss_fn=unit_loss(uq, index) if unit_loss is not None else None)
            if on_unit_done is not None:
                on_unit_done(uq.name)
            if index + 1 < stop:
                t0 = time.perf_counter()
                q_prev = _apply(uq.module, q_in, eb, device)
                fp_prev = fp_out
                capture += time.perf_counter() - t0
            del fp_in, q_in, w
    finally:
        for p, flag in saved_rg:
            p.requires_grad_(flag)
        for m, flag in saved_train:
            m.training = flag
    return {"units": stats, "seconds": round(time.perf_counter() - t_total, 3), "capture_seconds": round(capture, 3)}


def _reconstruct_unit(unit: Unit, fp_in: torch.Tensor, fp_out: torch.Tensor, q_in: torch.Tensor,
                      w: torch.Tensor | None, cfg: BlockReconConfig, seed: int, tracker, device: torch.device,
                      progress: bool, index: int = 0, hook: StepHook | None = None,
                      loss_fn: UnitLossFn | None = None) -> dict:
    """Train one unit (AdaRound α + activation scales) and finalise it."""
    module, kind = unit.module, unit.kind
    legacy = not cfg.init_loss_norm
    if cfg.metric == "custom" and kind != "head" and loss_fn is None:
        raise ValueError(f"metric 'custom': unit_loss gave no loss for unit {unit.name!r}")
    builtin_term = "head" if kind == "head" else cfg.metric
    scales_of: dict[str, float | None] = {}
    before = _objective(module, q_in, fp_out, w, cfg, kind) if cfg.eval_stats else float("nan")
    adas = attach_adaround(module)
    act_qs = _act_quantizers(module)
    alphas = [a.alpha for a in adas]
    scales = learned_scales(act_qs) if cfg.learn_act_scale else []
    for p in alphas + scales:
        p.requires_grad_(True)
    fused = [q for q in act_qs if type(q) is UniformQuantizer] if cfg.fused_quant else []
    compile_mode = _compile_mode(cfg.compile, cfg.iters)
    for q in fused:
        q.__class__ = _TrainingQuantizer
        q.compiled = compile_mode == "kernels"
    for q in act_qs:
        q.ste = True
        q.drop_prob = float(cfg.drop_prob) if cfg.mode == "qdrop" else 1.0
        q.train()
    w_opt = torch.optim.Adam(alphas, lr=cfg.w_lr) if alphas else None
    a_opt = torch.optim.Adam(scales, lr=cfg.a_lr) if scales else None
    a_sched = torch.optim.lr_scheduler.CosineAnnealingLR(a_opt, T_max=cfg.iters, eta_min=0.0) if a_opt else None
    forward = torch.compile(module, dynamic=False) if compile_mode == "unit" else module
    gen = torch.Generator().manual_seed(seed)
    n = fp_in.shape[0]
    warm = cfg.warmup * cfg.iters
    norms: dict[str, float] | None = None  # per-term normalisers (rec₁ of each term, re-taken on reset)
    rec_first = rec_last = round_last = float("nan")
    t0 = time.perf_counter()
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices), calibration_pinned(module):
            torch.manual_seed(seed)
            bar = tqdm(range(1, cfg.iters + 1), desc=f"recon {unit.name}", disable=not progress, mininterval=2.0)
            for t in bar:
                idx = torch.randperm(n, generator=gen)[: cfg.batch_size].to(device)
                x_fp = fp_in[idx]
                if cfg.mode == "rinp":
                    x = x_fp
                elif cfg.mode == "qinp":
                    x = q_in[idx]
                elif cfg.fused_quant:
                    x = torch.lerp(x_fp, q_in[idx], keep_mask(x_fp, float(cfg.drop_prob)))
                else:
                    x_q = q_in[idx]
                    x = torch.where(torch.rand_like(x_q) < cfg.drop_prob, x_q, x_fp)
                reset = False
                if hook is not None and hook.due(t - 1):
                    hstate = HookState(unit, index, t - 1, cfg.iters, module, fp_in, fp_out, q_in, device, tracker)
                    hook.fn(hstate)
                    reset = hstate.reset_norm
                if loss_fn is not None:
                    terms = loss_fn(forward(x), fp_out[idx], idx)
                else:
                    terms = {builtin_term: unit_rec_loss(forward(x), fp_out[idx], _weight_rows(w, idx), cfg.metric,
                                                         kind, legacy, cfg.loss_div)}
                if norms is None or reset or terms.keys() - norms.keys():
                    first = norms is None
                    norms = dict(norms or {})
                    for name, v in terms.items():
                        if first or reset or name not in norms:
                            v0 = norms[name] = float(v.detach())
                            if not (v0 > 0 and math.isfinite(v0)):
                                warnings.warn(f"{unit.name}: reconstruction loss term {name!r} is {v0} at its "
                                              "normalisation step; skipping its normalisation (the reference "
                                              "would produce NaN here)")
                    if first:
                        rec_first = sum(norms.values())
                parts = []
                for name, v in terms.items():
                    if name not in scales_of:
                        scales_of[name] = _norm_scale(cfg, name)
                    scale, v0 = scales_of[name], norms[name]
                    parts.append(v * (scale / v0) if (scale is not None and v0 > 0 and math.isfinite(v0)) else v)
                rec = next(iter(terms.values())) if len(terms) == 1 else sum(terms.values())
                rec_opt = parts[0] if len(parts) == 1 else sum(parts[1:], parts[0])
                if alphas and t >= warm:
                    beta = beta_schedule(t, cfg.iters, cfg.warmup, cfg.beta_start, cfg.beta_end)
                    round_loss = cfg.round_lambda * sum(a.round_loss(beta) for a in adas)
                    loss = rec_opt + round_loss
                else:
                    round_loss = None
                    loss = rec_opt
                if w_opt is not None:
                    w_opt.zero_grad(set_to_none=True)
                if a_opt is not None:
                    a_opt.zero_grad(set_to_none=True)
                if loss.requires_grad:
                    loss.backward()
                if w_opt is not None:
                    w_opt.step()
                if a_opt is not None:
                    a_opt.step()
                    a_sched.step()
                if t == 1 or t == cfg.iters or (cfg.log_every and t % cfg.log_every == 0):
                    rec_last = float(rec.detach())
                    round_last = 0.0 if round_loss is None else float(round_loss.detach())
                    if tracker is not None:
                        extra = {f"rec_{k}": float(v.detach()) for k, v in terms.items()} if loss_fn else {}
                        tracker.log_curve(f"recon/{unit.name}", t, loss=float(loss.detach()),
                                          rec=float(rec_opt.detach()), rec_raw=rec_last, round=round_last, **extra)
    finally:
        seconds = time.perf_counter() - t0
        finalize_adaround(module)
        for q in fused:
            q.__class__ = UniformQuantizer
            q.__dict__.pop("compiled", None)
        for q in act_qs:
            q.ste = False
            q.drop_prob = 1.0
            q.eval()
        for p in alphas + scales:
            p.requires_grad_(False)
            p.grad = None
    after = _objective(module, q_in, fp_out, w, cfg, kind) if cfg.eval_stats else float("nan")
    return {"rec_first": rec_first, "rec_last": rec_last, "round_last": round_last, "objective_before": before,
            "objective_after": after, "seconds": round(seconds, 3), "sec_per_iter": seconds / max(cfg.iters, 1),
            "iters": cfg.iters}
