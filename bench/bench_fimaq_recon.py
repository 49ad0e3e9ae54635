"""Benchmark FIMA-Q's reconstruction cost on CPU: the Fisher snapshot and the DPLR training step.

    python bench/bench_fimaq_recon.py                               # deit_t, random weights, 32 images
    python bench/bench_fimaq_recon.py --models deit_t deit_s --threads 2 --images 32 --block-iters 10

For each model (random weights, random images; run time does not depend on either) it prints:

* Fisher snapshot of blocks.0, a middle block and the last block over `--images` images, seconds per
  image and unit: ours (`fimaq.fisher.unit_fisher_snapshot`: the unit once without autograd on its
  cached FP input, then the FP tail forward + input-gradient backward with frozen parameters) against a
  reference-style emulation (`new_fisher_ro`, spec §4.3: the whole model with only that unit quantized,
  forward from the images at batch 32, KL 'batchmean', full backward with every parameter gradient, a
  forward hook and a full backward hook copying the unit output and ∂L/∂O to the CPU). The unit is in
  its training state in both (soft AdaRound, STE, QDrop 0.5). The mean over the three units is what a
  ViT/DeiT run pays per snapshot on average (13 units; tails get shorter along the model).
* block-reconstruction step of blocks.0 (batch 32, QDrop, 20 % warm-up then the rounding loss): ours
  (`reconstruct_model` with a rank-5 DPLR loss on fixed random G, Δ: the snapshots are timed above; marginal
  cost from two run lengths) against our MSE step (the loss overhead) and a reference-style
  DPLR step (AdaRound recomputing ⌊W/s⌋, every parameter requiring grad, autograd STE fake-quant,
  `rand_like` QDrop masks, `where` mixing, a = e Gᵀ and a B⁻¹ aᵀ as the reference writes them).
* peak resident memory of the process.

Times are wall and CPU seconds (process user + system); on a shared machine the CPU figure is steadier.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_aphq_recon import TIMM, Clock, _RecomputeFloorAdaRound, minmax_calibrated, peak_rss_mib  # noqa: E402
from common.models.units import model_units  # noqa: E402
from common.quant import UniformQuantizer  # noqa: E402
from common.quant.quantizers import quantizers_of  # noqa: E402
from common.recon.adaround import attach_adaround, beta_schedule, finalize_adaround  # noqa: E402
from common.recon.block import reconstruct_model  # noqa: E402
from fimaq.fisher import teacher_probs, unit_fisher_snapshot  # noqa: E402
from fimaq.loss import FisherState  # noqa: E402
from fimaq.method import engine_config  # noqa: E402


def _training_state(module: torch.nn.Module):
    """Put a quantized unit into the reconstruction training state (soft AdaRound, STE, QDrop 0.5)."""
    adas = attach_adaround(module)
    acts = [a for _, a in quantizers_of(module, "act") if isinstance(a, UniformQuantizer) and a.active]
    for a in acts:
        a.ste, a.drop_prob = True, 0.5
        a.train()
    return adas, acts


def _undo(module, acts) -> None:
    finalize_adaround(module)
    for a in acts:
        a.ste, a.drop_prob = False, 1.0
        a.eval()


def reference_snapshot(fp: torch.nn.Module, q_unit: torch.nn.Module, unit_index: int, images: torch.Tensor,
                       probs: torch.Tensor, temp: float = 20.0) -> Clock:
    """`new_fisher_ro` of the reference: whole model, only the unit quantized, full backward, CPU copies."""
    model = copy.deepcopy(fp).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    site = model_units(model)[unit_index].module
    outs, grads = [], []
    site.forward = q_unit.forward  # the unit runs quantized (its FP forward is not computed)
    keep = site.register_forward_hook(lambda m, a, o: outs.append(o.detach().cpu()))
    back = site.register_full_backward_hook(lambda m, gi, go: grads.append(go[0].detach().cpu()))
    with Clock() as c:
        for b, pb in zip(images.split(32), probs.split(32)):
            model.zero_grad()
            loss = F.kl_div(F.log_softmax(model(b) / temp, -1), pb, reduction="batchmean")
            loss.backward()
        g = torch.cat(grads).flatten(1).abs().mean(0)
        o = torch.cat(outs).flatten(1)
    for h in (keep, back):
        h.remove()
    del g, o
    return c


def reference_dplr_step(q: torch.nn.Module, fp_in, fp_out, q_in, G, binv, unit_index: int, iters: int) -> Clock:
    """The reference's `reconstruct_single_block` loop with `fisher_dplr` (no snapshots inside)."""
    unit = model_units(q)[unit_index]
    adas = attach_adaround(unit.module)
    for a in adas:
        a.__class__ = _RecomputeFloorAdaRound
    for p in q.parameters():
        p.requires_grad_(True)
    acts = [a for _, a in quantizers_of(unit.module, "act") if isinstance(a, UniformQuantizer) and a.active]
    for a in acts:
        a.ste, a.drop_prob = True, 0.5
        a.train()
    w_opt = torch.optim.Adam([a.alpha for a in adas], lr=1e-3)
    a_opt = torch.optim.Adam([a.scale for a in acts], lr=4e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(a_opt, T_max=iters)
    n, l1_0, l2_0 = fp_in.shape[0], None, None
    with Clock() as c:
        for t in range(1, iters + 1):
            idx = torch.randperm(n)[:32]
            x_q, x_fp = q_in[idx], fp_in[idx]
            x = torch.where(torch.rand_like(x_q) < 0.5, x_q, x_fp)
            e = (unit.module(x) - fp_out[idx]).abs().reshape(x.shape[0], -1)
            a_ = e.unsqueeze(1) @ G.abs().transpose(0, 1)  # (B, 1, j), as the reference's LossFunction
            l1 = (a_ @ binv @ a_.transpose(1, 2)).mean()
            l2 = (e.pow(2) * G.abs().mean(dim=0)).mean()
            if l1_0 is None:
                l1_0, l2_0 = l1.detach(), l2.detach()
            rec = l1 / l1_0 + l2 / l2_0
            if t < 0.2 * iters:
                loss = rec
            else:
                loss = rec + 0.01 * sum(a.round_loss(beta_schedule(t, iters)) for a in adas)
            w_opt.zero_grad()
            a_opt.zero_grad()
            loss.backward()
            w_opt.step()
            a_opt.step()
            sched.step()
    return c


def bench_model(name: str, args) -> dict:
    torch.manual_seed(0)
    fp = timm.create_model(TIMM[name], pretrained=False).eval()
    for p in fp.parameters():
        p.requires_grad_(False)
    images = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    units = model_units(fp)
    out: dict[str, object] = {"model": name, "threads": torch.get_num_threads(), "images": args.images}
    q = minmax_calibrated(fp, images[:32])
    q_units = model_units(q)
    probs = teacher_probs(fp, images)

    # FP inputs / outputs of every unit (one walk)
    fp_io = []
    with torch.no_grad():
        x = images
        for u in units:
            xin = torch.cat([u.pre(b) for b in x.split(64)])
            x = torch.cat([u.module(b) for b in xin.split(64)])
            fp_io.append((xin, x))

    picks = [1, (len(units) - 1) // 2, len(units) - 2]  # blocks.0, a middle block, the last block
    ours_w = ours_c = ref_w = ref_c = 0.0
    for i in picks:
        mod = q_units[i].module
        _, acts = _training_state(mod)
        with Clock() as c:
            unit_fisher_snapshot(mod, units, i, fp_io[i][0], fp_io[i][1], probs, fp_model=fp)
        per = args.images
        out[f"snapshot {units[i].name}"] = (c.wall / per, c.cpu / per)
        ours_w, ours_c = ours_w + c.wall / per, ours_c + c.cpu / per
        if args.reference:
            r = reference_snapshot(fp, mod, i, images, probs)
            out[f"ref-style snapshot {units[i].name}"] = (r.wall / per, r.cpu / per)
            ref_w, ref_c = ref_w + r.wall / per, ref_c + r.cpu / per
        _undo(mod, acts)
    out["snapshot per image/unit (mean)"] = (ours_w / len(picks), ours_c / len(picks))
    if args.reference:
        out["ref-style snapshot per image/unit"] = (ref_w / len(picks), ref_c / len(picks))

    # Block-reconstruction step of blocks.0: DPLR (rank 5, a fixed G / Δ, so no snapshot is timed) vs MSE,
    # marginal cost of k steps (difference of two run lengths).
    k = args.block_iters
    d = fp_io[1][1][0].numel()
    gen = torch.Generator().manual_seed(1)
    fs = FisherState("fisher_dplr")
    for _ in range(5):
        fs.add(torch.rand(d, generator=gen) * 1e-6, torch.rand(d, generator=gen) * 0.05 + 0.01)
    for label, metric in (("dplr", "fisher_dplr"), ("mse", "mse")):
        clocks = []
        for iters in (k, 2 * k):
            rcfg = engine_config({"iters": iters, "log_every": 0, "eval_stats": False, "metric": metric,
                                  "head_norm": None, "compile": False})
            loss = (lambda unit, i: fs.terms) if metric == "fisher_dplr" else None
            with Clock() as c:
                reconstruct_model(copy.deepcopy(q), fp, images, rcfg, start_unit=1, stop_unit=2, progress=False,
                                  unit_loss=loss)
            clocks.append(c)
        out[f"block step ({label})"] = ((clocks[1].wall - clocks[0].wall) / k, (clocks[1].cpu - clocks[0].cpu) / k)
    if args.reference:
        fp_in, fp_out = fp_io[1]
        q_in = fp_in + 0.01 * torch.randn_like(fp_in)
        r = reference_dplr_step(copy.deepcopy(q), fp_in, fp_out, q_in, fs.G, fs.binv, 1, 2 * k)
        out["ref-style block step (dplr)"] = (r.wall / (2 * k), r.cpu / (2 * k))
    out["peak RSS (MiB)"] = peak_rss_mib()
    return out


def _fmt(v) -> str:
    if isinstance(v, tuple):
        w, c = v
        return f"{w:8.4f} s wall" + (f"  {c:8.4f} s CPU" if c is not None else "")
    return f"{v:.0f}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["deit_t"], choices=sorted(TIMM))
    ap.add_argument("--images", type=int, default=32, help="images of the snapshot passes and the step data")
    ap.add_argument("--block-iters", type=int, default=10, help="steps (runs of k and 2k steps are timed)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-reference", dest="reference", action="store_false",
                    help="skip the reference-style emulations")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.models:
        res = bench_model(name, args)
        print(f"\n== {name} ==")
        for key, v in res.items():
            print(f"  {key:36s} {_fmt(v)}")
        if args.reference:
            for ours, ref in (("snapshot per image/unit (mean)", "ref-style snapshot per image/unit"),
                              ("block step (dplr)", "ref-style block step (dplr)")):
                o, r = res[ours], res[ref]
                print(f"  speed-up {ours:31s} {r[0] / o[0]:5.2f}x wall  {r[1] / o[1]:5.2f}x CPU")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
