"""APHQ-ViT MLP Reconstruction (MR, aphq spec §3): GELU → ReLU, then refit fc1/fc2 of every block MLP.

Every block MLP of the model to quantize gets a ReLU instead of its GELU (`relu_swap`); fc1 and fc2
(weights and biases, FP32) are then trained to reproduce the MLP output of the original GELU model:

    h      = relu(fc1(x))                     x: fc1 input (norm2 output) of the FP GELU model
    ŷ      = fc2(h),   ŷ_clip = fc2(clamp(h, 0, ub))
    R(u)   = mean_{b,c} Σ_n H̄_{n,c} (u − y)²_{b,n,c} / loss_div          y: FP GELU MLP output
    L      = R(ŷ) + clamp_weight · R(ŷ_clip)                              (clamp_weight 2, loss_div 10)

`ub` is the `pct` quantile of the positive GELU outputs of that block (rank ⌈count·pct⌉ − 1 in the
sorted positives; exact `kthvalue`). H̄ is the Average Perturbation Hessian of the MLP output
(`aphq.aph`, always averaged over samples, as the reference), RMS-normalised: H̄ ← H̄·√(numel/ΣH̄²);
`metric="mse"` drops it. Adam(lr 4e-5) with cosine annealing to 0 over `iters` (20 000) steps of
32 samples drawn by `torch.randperm(N)[:32]` from a generator seeded with the run seed.

All targets come from the FP GELU model, so blocks are independent. The FP model is walked once,
block by block, so only one block's data (x, y and the positive GELU outputs) live in memory.
Faster than the reference with the same maths (spec §7): fc1 is computed once per step (the
reference runs it twice), the clamped branch is fc2(h) − relu(h − ub)·W2ᵀ evaluated on the ~1–2 %
of hidden units above `ub` (so a step costs 5 GEMMs instead of the reference's 10), the APH of all
MLPs is computed up front in one pass per batch (`average_perturbation_hessian` with
``blocks.i.mlp`` sites), and the FP model is walked once for all blocks.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from common.recon.block import tune_cpu_allocator
from common.settings import dataclass_from
from common.models.units import model_units

from .aph import average_perturbation_hessian, strict_fp32

__all__ = ["MLPReconConfig", "mlp_recon_config", "relu_swap", "reconstruct_mlps", "mlp_blocks", "positive_quantile"]

# Keys of a method's `mlp_recon` config node that are not MR hyper-parameters (accepted silently).
_IGNORED_KEYS = {"enabled", "name", "n_images", "aph_mean", "aph_rms_norm", "draw", "augment"}


@dataclass
class MLPReconConfig:
    """MR hyper-parameters (defaults = the reference's hard-coded values, spec §3 and §5).

    Attributes:
        iters: optimizer steps per block (20 000).
        batch_size: samples per step (32).
        lr: Adam learning rate, cosine-annealed to 0 over `iters` (4e-5).
        pct: clamp percentile of the positive GELU outputs (0.99; 0.98 in the 2/4-bit best configs).
        clamp_weight: weight of the clamped-output term (2.0).
        loss_div: divisor of both loss terms (10).
        metric: "hessian_perturb" (APH-weighted) or "mse".
        temp, eps: APH temperature and perturbation (20, 1e-6).
        log_every: log the loss curve every this many steps (0: only first and last).
        seed: seed of the sampling generator when none is passed.
        aph_batch_size: batch of the APH passes (the KL 'batchmean' divisor; 32).
        aph_mode: "faithful" (reference ±ε, fp32) or "hvp" (exact 2ε|H𝟙|; zero for LayerNorm models).
        eval_batch_size: batch for computing data and the before/after objective.
        sparse_clip: compute fc2(clamp(h, 0, ub)) as fc2(h) − relu(h − ub)·W2ᵀ on the entries above ub
            only (same maths, ~1/3 fewer GEMM FLOPs per step); False: both fc2 products densely.
        tune_allocator: on CPU, `common.recon.block.tune_cpu_allocator` (allocation policy only).
    """

    iters: int = 20000
    batch_size: int = 32
    lr: float = 4e-5
    pct: float = 0.99
    clamp_weight: float = 2.0
    loss_div: float = 10.0
    metric: str = "hessian_perturb"
    temp: float = 20.0
    eps: float = 1e-6
    log_every: int = 100
    seed: int = 3407
    aph_batch_size: int = 32
    aph_mode: str = "faithful"
    eval_batch_size: int = 128
    sparse_clip: bool = True
    tune_allocator: bool = True

    def __post_init__(self):
        if self.metric not in ("hessian_perturb", "mse"):
            raise ValueError(f"MLP reconstruction metric must be 'hessian_perturb' or 'mse', got {self.metric!r} "
                             "(the reference's 'mae' crashes, spec §8)")
        if not 0.0 < float(self.pct) <= 1.0:
            raise ValueError(f"pct must be in (0, 1], got {self.pct}")


def mlp_recon_config(cfg: Any = None, **overrides) -> MLPReconConfig:
    """MLPReconConfig from a dataclass, dict or DictConfig (+ keyword overrides); unknown keys warn."""
    return dataclass_from(MLPReconConfig, cfg, _IGNORED_KEYS, "mlp_recon", **overrides)


def relu_swap(model: nn.Module) -> nn.Module:
    """Replace the activation of every block MLP (a module whose name ends with 'mlp') by ReLU, in place."""
    for name, module in model.named_modules():
        if name.endswith("mlp") and isinstance(getattr(module, "act", None), nn.Module):
            if not isinstance(module.act, nn.ReLU):
                module.act = nn.ReLU()
    return model


def mlp_blocks(model: nn.Module) -> list[str]:
    """Names of the transformer blocks whose MLPs MR reconstructs (ViT `blocks.i`, Swin `layers.s.blocks.j`)."""
    return [u.name for u in model_units(model) if u.kind == "block"]


def positive_quantile(values: torch.Tensor, pct: float) -> float:
    """The reference's `ub`: element of rank ⌈count·pct⌉ − 1 (0-based) among the sorted positive values."""
    pos = values[values > 0]
    count = pos.numel()
    if count == 0:
        return float("inf")
    k = min(max(math.ceil(count * pct), 1), count)
    return float(torch.kthvalue(pos.float(), k).values)


@torch.no_grad()
def _block_data(block: nn.Module, block_input: torch.Tensor, batch_size: int):
    """fc1 input x, MLP output y, the positive fc2 inputs (GELU outputs) and the block output, in batches."""
    mlp = block.mlp
    xs, ys, pos, outs = [], [], [], []
    handles = [
        mlp.fc1.register_forward_hook(lambda _m, a, _o: xs.append(a[0])),
        mlp.register_forward_hook(lambda _m, _a, o: ys.append(o)),
        mlp.fc2.register_forward_hook(lambda _m, a, _o: pos.append(a[0][a[0] > 0])),
    ]
    try:
        for b in block_input.split(batch_size):
            outs.append(block(b))
    finally:
        for h in handles:
            h.remove()
    return torch.cat(xs), torch.cat(ys), torch.cat(pos), torch.cat(outs)


def _loss(y_hat: torch.Tensor, y_clip: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None,
          clamp_weight: float, loss_div: float) -> torch.Tensor:
    """R(ŷ) + clamp_weight·R(ŷ_clip), R(u) = mean_{b,c} Σ_n w (u − y)² / loss_div."""
    e = (y_hat - y).square() + clamp_weight * (y_clip - y).square()
    if weight is not None:
        e = e * weight
    return e.sum(1).mean() / loss_div


class _Fc2WithClip(torch.autograd.Function):
    """(fc2(h), fc2(clamp(h, max=ub))) with the clamped branch as fc2(h) − e·W2ᵀ on the few entries above `ub`.

    clamp(h, 0, ub) = h − e with e = relu(h − ub), nonzero for about (1 − pct) of the positive hidden
    units, so the clamped branch costs sparse CSR products instead of three dense GEMMs:
        forward   ŷ = h·W2ᵀ + b2,   ŷ_clip = ŷ − e·W2ᵀ
        backward  g = g₁ + g₂;   ∂h = g·W2 − (g₂·W2) sampled on e's pattern (added in place: no dense
                  zeros, no second dense gradient to add);   ∂W2 = gᵀ·h − (eᵀ·g₂)ᵀ;   ∂b2 = Σ_rows g
    The dense products are the ones autograd forms for `F.linear` (same calls, same layouts) and every
    sum is taken in the same order as the autograd graph of ŷ and ŷ − e·W2ᵀ, so the values are bit for
    bit those of that graph; only the floating-point summation order differs from fc2(clamp(h)).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor | None, ub: float):
        y_hat = F.linear(h, w2, b2)
        h2d = h.reshape(-1, h.shape[-1])
        m, k = h2d.shape
        flat = torch.nonzero(h2d.reshape(-1) > ub).squeeze(1)
        rows, cols = flat // k, flat % k
        vals = h2d.reshape(-1)[flat] - ub
        e = _csr(_crow(rows, m), cols, vals, (m, k))
        corr = torch.sparse.mm(e, w2.t().contiguous())
        ctx.save_for_backward(h2d, w2, flat, rows, cols, vals)
        ctx.has_bias, ctx.y_shape = b2 is not None, y_hat.shape
        return y_hat, y_hat - corr.reshape(y_hat.shape)

    @staticmethod
    def backward(ctx, g1: torch.Tensor, g2: torch.Tensor):
        h2d, w2, flat, rows, cols, vals = ctx.saved_tensors
        m, k = h2d.shape
        g = (g1 + g2).reshape(m, -1)  # ŷ's gradient: its own plus the clamped branch's
        g2n = (-g2).reshape(m, -1).contiguous()  # the correction's gradient (ŷ_clip = ŷ − corr)
        grad_h = grad_w2 = grad_b2 = None
        if ctx.needs_input_grad[0]:
            grad_h = g.mm(w2)
            pattern = _csr(_crow(rows, m), cols, torch.zeros_like(vals), (m, k))
            sampled = torch.sparse.sampled_addmm(pattern, g2n, w2, beta=0.0)
            grad_h.view(-1).index_add_(0, flat, sampled.values())
            grad_h = grad_h.view(ctx.y_shape[:-1] + (k,))
        if ctx.needs_input_grad[1]:
            order = torch.argsort(cols, stable=True)
            et = _csr(_crow(cols[order], k), rows[order], vals[order], (k, m))
            grad_w2 = g.t().mm(h2d) + torch.sparse.mm(et, g2n).t()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b2 = g.sum(0)
        return grad_h, grad_w2, grad_b2, None


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Sparse CSR tensor built from valid indices (no invariant check; torch's 'beta' warning muted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _crow(sorted_rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """CSR row pointer of sorted row indices."""
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=sorted_rows.device)
    crow[1:] = torch.bincount(sorted_rows, minlength=n_rows).cumsum(0)
    return crow


def _mlp_forward(mlp: nn.Module, x: torch.Tensor, ub: float, sparse_clip: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ŷ, ŷ_clip) with fc1 computed once; ŷ_clip = ŷ − e·W2ᵀ (sparse) or, without `sparse_clip`, both fc2
    products in one stacked GEMM."""
    h = torch.relu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias))
    if not sparse_clip or not math.isfinite(ub):
        both = F.linear(torch.cat([h, h.clamp(max=ub)]), mlp.fc2.weight, mlp.fc2.bias)
        return both[: x.shape[0]], both[x.shape[0]:]
    return _Fc2WithClip.apply(h, mlp.fc2.weight, mlp.fc2.bias, float(ub))


@torch.no_grad()
def _objective(mlp: nn.Module, x: torch.Tensor, y: torch.Tensor, weight, ub: float, cfg: MLPReconConfig) -> float:
    """The MR loss over all samples (mean over batches of the per-batch loss, batch-size weighted)."""
    total = 0.0
    for xb, yb in zip(x.split(cfg.eval_batch_size), y.split(cfg.eval_batch_size)):
        y_hat, y_clip = _mlp_forward(mlp, xb, ub, cfg.sparse_clip)
        total += float(_loss(y_hat, y_clip, yb, weight, cfg.clamp_weight, cfg.loss_div)) * xb.shape[0]
    return total / x.shape[0]


def reconstruct_mlps(model: nn.Module, fp_model: nn.Module, images: torch.Tensor, cfg: Any = None,
                     tracker=None, device: torch.device | str = "cpu", generator: torch.Generator | None = None,
                     blocks: list[str] | None = None, progress: bool = True) -> dict:
    """MLP reconstruction of every block of `model`, in place (GELU → ReLU first, if not done yet).

    Args:
        model: the model to quantize (timm ViT/DeiT/Swin, same architecture as `fp_model`; unwrapped,
            or wrapped with quantizers disabled — only fc1/fc2 weights and biases are used).
        fp_model: the FP GELU teacher (unchanged).
        images: the MR images (the reference: 1024 augmented train images).
        cfg: MLPReconConfig, dict or DictConfig (see `MLPReconConfig`; `enabled` etc. are ignored).
        tracker: `common.run.tracking.Tracker`; the loss is logged as curve ``mr/<block>`` every
            `log_every` steps (and at the first and last step).
        device: where data and training live.
        generator: CPU generator for `randperm` sampling (default: seeded with `cfg.seed`).
        blocks: subset of block names to reconstruct (default: all, in order).

    Returns:
        {"blocks": {block: {"ub", "loss_first", "loss_last", "objective_before", "objective_after",
        "seconds", "sec_per_iter"}}, "aph_seconds": float, "seconds": float}. Objectives are the full
        MR loss over all images, before and after training (so they can be compared).
    """
    cfg = mlp_recon_config(cfg)
    device = torch.device(device)
    if cfg.tune_allocator and device.type == "cpu":
        tune_cpu_allocator()
    t_start = time.perf_counter()
    relu_swap(model)
    names = mlp_blocks(fp_model) if blocks is None else list(blocks)
    gen = generator if generator is not None else torch.Generator().manual_seed(int(cfg.seed))
    modules_q = dict(model.named_modules())
    for name in names:
        mlp = modules_q[name].mlp
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            raise NotImplementedError(f"{name}.mlp has a hidden-layer norm; MR supports plain fc1-act-fc2 MLPs")

    # APH of every MLP output, from the FP GELU model, up front (always averaged; RMS-normalised).
    aph: dict[str, torch.Tensor | None] = {n: None for n in names}
    t0 = time.perf_counter()
    if cfg.metric == "hessian_perturb":
        raw = average_perturbation_hessian(fp_model, images, [f"{n}.mlp" for n in names], eps=cfg.eps,
                                           temp=cfg.temp, batch_size=cfg.aph_batch_size, mean=True,
                                           mode=cfg.aph_mode, device=device, progress=progress)
        for n in names:
            h = raw[f"{n}.mlp"].to(device)
            ss = h.square().sum()
            aph[n] = h * torch.sqrt(h.numel() / ss) if ss > 0 else torch.ones_like(h)
    aph_seconds = time.perf_counter() - t0

    stats: dict[str, dict] = {}
    units = model_units(fp_model)
    wanted = set(names)
    last = max(i for i, u in enumerate(units) if u.name in wanted)
    x_stream = images
    with strict_fp32(fp_model):
        for i, unit in enumerate(units[: last + 1]):
            with torch.no_grad():
                inp = torch.cat([unit.pre(b.to(device)) for b in x_stream.split(cfg.eval_batch_size)])
            if unit.name not in wanted:
                with torch.no_grad():
                    x_stream = torch.cat([unit.module(b) for b in inp.split(cfg.eval_batch_size)])
                continue
            x, y, pos, x_stream = _block_data(unit.module, inp, cfg.eval_batch_size)
            del inp
            ub = positive_quantile(pos, cfg.pct)
            del pos
            stats[unit.name] = _train_block(modules_q[unit.name].mlp, unit.name, x, y, aph[unit.name], ub, cfg,
                                            gen, tracker, device, progress)
            del x, y
    return {"blocks": stats, "aph_seconds": round(aph_seconds, 3), "seconds": round(time.perf_counter() - t_start, 3)}


def _train_block(mlp: nn.Module, name: str, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, ub: float,
                 cfg: MLPReconConfig, gen: torch.Generator, tracker, device: torch.device, progress: bool) -> dict:
    """Adam + cosine on fc1/fc2 of one MLP; returns its statistics."""
    params = [p for p in (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias) if p is not None]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    before = _objective(mlp, x, y, weight, ub, cfg)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iters, eta_min=0.0)
    n = x.shape[0]
    first = last = float("nan")
    t0 = time.perf_counter()
    bar = tqdm(range(1, cfg.iters + 1), desc=f"MR {name}", disable=not progress, mininterval=2.0)
    for t in bar:
        idx = torch.randperm(n, generator=gen)[: cfg.batch_size].to(device)
        y_hat, y_clip = _mlp_forward(mlp, x[idx], ub, cfg.sparse_clip)
        loss = _loss(y_hat, y_clip, y[idx], weight, cfg.clamp_weight, cfg.loss_div)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if t == 1 or t == cfg.iters or (cfg.log_every and t % cfg.log_every == 0):
            last = float(loss.detach())
            if t == 1:
                first = last
            if tracker is not None:
                tracker.log_curve(f"mr/{name}", t, loss=last)
    seconds = time.perf_counter() - t0
    for p, flag in zip(params, saved):
        p.requires_grad_(flag)
        p.grad = None
    after = _objective(mlp, x, y, weight, ub, cfg)
    return {"ub": ub, "loss_first": first, "loss_last": last, "objective_before": before, "objective_after": after,
            "seconds": round(seconds, 3), "sec_per_iter": seconds / max(cfg.iters, 1)}
