"""Average Perturbation Hessian (APHQ-ViT, Wu et al. 2025; aphq spec §4.3, §4.4, §7 item 2).

For a site O (a unit output, or a sub-module output such as an MLP's) of the FP model and sample i,

    g±_i = ∂/∂O  KL( p ‖ softmax(f(O ± ε·𝟙) / T) )          (KL 'batchmean' over the reference's batch of 32)
    G_i  = | g+_i − g−_i |  ≈ 2ε |H_i 𝟙|                       (row sums of the Hessian, not diag(H))
    APH  = mean_i G_i  (shape (1, *out))   or   G (N, *out) without averaging,

where f is the rest of the network after O, p = softmax(f(O)/T) the clean prediction, T = 20 and
ε = 1e-6. At ε = 0 the KL has zero gradient, so the finite difference measures curvature.

Speed-ups over the reference with the same arithmetic (spec §7 item 2): one FP pass per batch
captures every requested site for all units at once, each site's pass starts at that site (earlier
units are never re-run, no prefix backward), the +ε and −ε copies are stacked into one batch of
2×32, parameters are frozen (no weight-gradient GEMMs) and `torch.autograd.grad` asks for ∂L/∂O only.
The pass runs in strict fp32 (TF32 off, no autocast), because the finite difference lives at the
fp32 rounding level: fl(x ± 1e-6) = x for |x| ≥ 32, so large residual channels are not perturbed,
exactly as in the reference. Attention runs unfused (explicit q·kᵀ, softmax, ·v) like the reference's
torch 1.10 code; that also makes the double-differentiable `mode="hvp"` possible.

`mode="hvp"` is the non-faithful alternative: the exact forward-over-reverse Hessian-vector product
H𝟙 (`torch.func.jvp` of the gradient), returned as 2ε·|H𝟙| so it is interchangeable in scale.

What the faithful value is on real models (measured, see docs/aphq_engine.md): every APHQ site of a
pre-LayerNorm ViT/DeiT/Swin feeds the rest of the network only through LayerNorms (directly or via the
residual stream), and a LayerNorm ignores a constant added to all channels of a token. So the network
output is invariant to O + c𝟙 and H𝟙 = 0 exactly (`mode="hvp"` returns zeros, float64 ≈ 1e-40). The
reference's fp32 |g₊ − g₋| is therefore not curvature but what fp32 rounding leaves: a perturbation
that is not exactly ε𝟙 (fl(x ± 1e-6) ≠ x ± 1e-6) plus the rounding of the forward/backward pass
itself (the larger part, ~10x |H·(fl(O+ε) − fl(O−ε))| on the demo model). It is deterministic for
given data and kernels (identical with stacked or separate ±ε passes and with batch 16 or 32 up to
the 'batchmean' factor, on this CPU) and nonzero, so the faithful mode reproduces the reference's
weighting; `hvp` cannot be used as a loss weight for such models (the first-step normalisation has
nothing to divide by).

`brecq_fisher` is the `hessian_brecq` ablation (spec §4.4): (∂L/∂O)² per sample, on the quantized
model whose earlier units are quantized and whose current and later units run in FP.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from common.quant.quantizers import quantizers_of
from common.models.units import Unit, model_units, run_units
from common.recon.teacher import _device_of, fp_logits, kl_batchmean, strict_fp32

__all__ = ["average_perturbation_hessian", "brecq_fisher", "brecq_fisher_weights", "fp_logits", "strict_fp32",
           "kl_batchmean"]


# --------------------------------------------------------------------------- numerics helpers
# strict_fp32, kl_batchmean, fp_logits live in common.recon.teacher (shared with FIMA-Q); re-exported here.


# --------------------------------------------------------------------------- sites


@dataclass
class _Site:
    """Where a perturbation is applied: the output of unit `index` or of `sub`, a module inside it."""

    name: str
    index: int
    sub: nn.Module | None = None


def _resolve_sites(model: nn.Module, units: Sequence[Unit], names: Sequence[str]) -> list[_Site]:
    modules = dict(model.named_modules())
    by_name = {u.name: i for i, u in enumerate(units)}
    sites = []
    for name in names:
        if name in by_name:
            if units[by_name[name]].kind == "head":
                continue  # the reference's head APH is ~0 and unused (head trains on KL)
            sites.append(_Site(name, by_name[name]))
            continue
        owner = [i for i, u in enumerate(units) if name.startswith(u.name + ".")]
        if not owner or name not in modules:
            raise ValueError(f"APH site {name!r} is neither a unit ({', '.join(by_name)}) nor a module inside one")
        sites.append(_Site(name, owner[-1], modules[name]))
    return sites


@contextlib.contextmanager
def _replace_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Forward hook returning fn(output) in place of the module's output."""
    handle = module.register_forward_hook(lambda _m, _a, out: fn(out))
    try:
        yield
    finally:
        handle.remove()


def _tail_from_site(units: Sequence[Unit], site: _Site, unit_input: torch.Tensor | None,
                    value: torch.Tensor) -> torch.Tensor:
    """Logits when the site's output is replaced by `value` (batch size of `value`)."""
    if site.sub is None:
        return run_units(units, value, site.index + 1)
    reps = value.shape[0] // unit_input.shape[0]
    inp = unit_input.repeat((reps,) + (1,) * (unit_input.dim() - 1)) if reps > 1 else unit_input
    with _replace_output(site.sub, lambda _out: value):
        out = units[site.index].module(inp)
    return run_units(units, out, site.index + 1)


def _site_grad_faithful(units, site, unit_input, out, p, eps, temp, stack) -> torch.Tensor:
    """|g+ − g−| per sample for one batch (reference arithmetic: fp32, O ± ε, KL batchmean / B)."""
    b = out.shape[0]
    if stack:
        o = torch.cat([out + eps, out - eps]).requires_grad_(True)
        loss = kl_batchmean(_tail_from_site(units, site, unit_input, o), torch.cat([p, p]), temp, divisor=b)
        g = torch.autograd.grad(loss, o)[0]
        return (g[:b] - g[b:]).abs()
    grads = []
    for sign in (1.0, -1.0):
        o = (out + sign * eps).requires_grad_(True)
        loss = kl_batchmean(_tail_from_site(units, site, unit_input, o), p, temp)
        grads.append(torch.autograd.grad(loss, o)[0])
    return (grads[0] - grads[1]).abs()


def _site_grad_hvp(units, site, unit_input, out, p, eps, temp) -> torch.Tensor:
    """2ε·|H𝟙| per sample, H the Hessian of the same batchmean KL w.r.t. the site output (exact HVP)."""
    from torch.func import grad, jvp

    def loss_fn(o: torch.Tensor) -> torch.Tensor:
        return kl_batchmean(_tail_from_site(units, site, unit_input, o), p, temp)

    _, h1 = jvp(grad(loss_fn), (out,), (torch.ones_like(out),))
    return (2 * eps) * h1.abs()


@torch.no_grad()
def _capture_batch(units: Sequence[Unit], x: torch.Tensor, want_in: set[int], want_out: set[int]):
    ins, outs = {}, {}
    for i, unit in enumerate(units):
        inp = unit.pre(x)
        if i in want_in:
            ins[i] = inp
        x = unit.module(inp)
        if i in want_out:
            outs[i] = x
    return ins, outs, x


@torch.no_grad()
def _sub_output(units: Sequence[Unit], site: _Site, unit_input: torch.Tensor) -> torch.Tensor:
    store = {}

    def keep(out):
        store["out"] = out
        return out

    with _replace_output(site.sub, keep):
        units[site.index].module(unit_input)
    return store["out"]


# --------------------------------------------------------------------------- public API


def average_perturbation_hessian(fp_model: nn.Module, images: torch.Tensor, unit_names: Sequence[str],
                                 eps: float = 1e-6, temp: float = 20.0, batch_size: int = 32, mean: bool = True,
                                 mode: str = "faithful", device: torch.device | str | None = None,
                                 stack_signs: bool = True, progress: bool = True) -> dict[str, torch.Tensor]:
    """APH of every requested site, from the FP (GELU) model alone.

    Args:
        fp_model: the FP teacher (a timm ViT/DeiT/Swin, not wrapped); left unchanged.
        images: the calibration images (N, C, H, W), in the order batches are formed.
        unit_names: unit names (see `common.models.units.model_units`; `head` is skipped, the reference's head
            APH is ≈0 and unused) and/or names of modules inside a unit (e.g. ``blocks.3.mlp`` for MLP
            reconstruction): the perturbation is added to that module's output.
        eps, temp: perturbation size and KL temperature (1e-6, 20).
        batch_size: batch of the reference (32); the KL 'batchmean' divisor is this batch's size.
        mean: average over samples → (1, *out); else per-sample (N, *out) (`use_mean_hessian=False`).
        mode: "faithful" (±ε finite difference, reference arithmetic) or "hvp" (exact 2ε·|H𝟙|).
        device: where to compute (default: the model's device); results stay there.
        stack_signs: stack +ε and −ε into one batch of 2×batch (False: two passes, half the memory).

    Returns:
        {site name: APH tensor} in the model's dtype, for every requested site except `head`.
    """
    if mode not in ("faithful", "hvp"):
        raise ValueError(f"APH mode must be 'faithful' or 'hvp', got {mode!r}")
    device = _device_of(fp_model) if device is None else torch.device(device)
    dtype = next(fp_model.parameters()).dtype  # float32 (strict) in practice; float64 in tests
    units = model_units(fp_model)
    sites = _resolve_sites(fp_model, units, unit_names)
    want_in = {s.index for s in sites if s.sub is not None}
    want_out = {s.index for s in sites if s.sub is None}
    sums: dict[str, torch.Tensor] = {}
    per_sample: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    with strict_fp32(fp_model):
        batches = images.split(batch_size)
        for xb in tqdm(batches, desc="APH", disable=not progress, mininterval=2.0):
            xb = xb.to(device=device, dtype=dtype)
            ins, outs, logits = _capture_batch(units, xb, want_in, want_out)
            p = torch.softmax(logits / temp, dim=-1)
            for site in sites:
                unit_input = ins.get(site.index)
                out = outs[site.index] if site.sub is None else _sub_output(units, site, unit_input)
                if mode == "faithful":
                    g = _site_grad_faithful(units, site, unit_input, out, p, eps, temp, stack_signs)
                else:
                    g = _site_grad_hvp(units, site, unit_input, out, p, eps, temp)
                g = g.detach()
                if mean:
                    s = g.sum(0, keepdim=True, dtype=torch.float64)
                    sums[site.name] = s if site.name not in sums else sums[site.name] + s
                else:
                    per_sample[site.name].append(g)
    n = images.shape[0]
    if mean:
        return {name: (s / n).to(dtype) for name, s in sums.items()}
    return {name: torch.cat(gs) for name, gs in per_sample.items()}


def brecq_fisher(units: Sequence[Unit], unit_index: int, q_input: torch.Tensor, fp_logits: torch.Tensor,
                 temp: float = 20.0, batch_size: int = 32) -> torch.Tensor:
    """BRECQ's Fisher diagonal (∂L/∂O)² per sample for unit `unit_index` of a quantized model (spec §4.4).

    Args:
        units: `model_units(qmodel)` of the wrapped model; units before `unit_index` are already quantized
            (their effect is in `q_input`); this unit and all later ones run with quantizers disabled.
        unit_index: the unit whose output O is differentiated.
        q_input: the unit module's input over all N samples, computed through the quantized prefix.
        fp_logits: FP (GELU teacher) logits over the same samples; p = softmax(fp_logits / T).
        temp, batch_size: KL temperature and the batch of the 'batchmean' divisor (20, 32).

    Returns:
        (N, *out) tensor of squared gradients (no averaging, as the reference's ablation).
    """
    later = [u.module for u in units[unit_index:]]
    model_like = nn.ModuleList(later)
    saved_q = [(q, q.enabled) for m in later for _, q in quantizers_of(m)]
    out_list = []
    try:
        for q, _ in saved_q:
            q.enabled = False
        with strict_fp32(model_like):
            for xb, lb in zip(q_input.split(batch_size), fp_logits.split(batch_size)):
                with torch.no_grad():
                    o = units[unit_index].module(xb)
                o = o.detach().requires_grad_(True)
                p = torch.softmax(lb.to(o.device) / temp, dim=-1)
                loss = kl_batchmean(run_units(units, o, unit_index + 1), p, temp)
                out_list.append(torch.autograd.grad(loss, o)[0].pow(2))
    finally:
        for q, flag in saved_q:
            q.enabled = flag
    return torch.cat(out_list)


def brecq_fisher_weights(qmodel: nn.Module, fp_logits_all: torch.Tensor, temp: float = 20.0,
                         batch_size: int = 32) -> Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """A `weights` callable for `common.recon.block.reconstruct_model` with metric `hessian_brecq`.

    It is called as weights(unit_name, quantized_input, fp_input) right before a unit is trained and
    returns `brecq_fisher` for that unit (None for `head`, which trains on KL).
    """
    units = model_units(qmodel)
    index = {u.name: i for i, u in enumerate(units)}

    def weights(name: str, q_input: torch.Tensor, fp_input: torch.Tensor) -> torch.Tensor | None:
        if units[index[name]].kind == "head":
            return None
        return brecq_fisher(units, index[name], q_input, fp_logits_all, temp=temp, batch_size=batch_size)

    return weights
