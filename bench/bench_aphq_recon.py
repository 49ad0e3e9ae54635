"""Benchmark the APHQ reconstruction engine (MLP reconstruction, APH, block reconstruction) on CPU.

    python bench/bench_aphq_recon.py                        # deit_t and deit_s, random weights, batch 32
    python bench/bench_aphq_recon.py --models deit_t --threads 1 --block-iters 8 --mr-iters 8
    python bench/bench_aphq_recon.py --models deit_t --threads 2 --skip-aph   # the two steps only

For each model (random weights, random images; run time does not depend on either) it prints:

* FP capture: one walk over the images through all units (what the reference repeats per unit);
* APH: `average_perturbation_hessian` for every unit over `--aph-images` images, seconds per image and
  unit, against a reference-style emulation (per unit: +ε and −ε full-model forward + backward at
  batch 32 with parameter gradients, gradient captured at the unit, as `init_block_perturb_hessian`);
* MR step (batch 32, one block): ours (fc1 once, sparse clamp branch) vs a reference-style step
  (fc1 twice, two dense fc2 branches, `|H̄|` per term as the reference's loss);
* block-reconstruction step (batch 32, blocks.0, QDrop + APH loss, 20 % warm-up then rounding loss):
  ours (`reconstruct_model`, eager unless `--compile`) vs a reference-style step written after
  GoatWu/APHQ-ViT's `utils/block_recon.py`, `quantizers/uniform.py` and `quantizers/adaround.py`:
  AdaRound recomputing ⌊W/s⌋, every parameter requiring grad (weights, biases, LayerNorms, and, as
  there, the activation zero-points and the AdaRound scales and zero-points, which are nn.Parameters
  in the reference), the reference's autograd STE fake-quant (round(z) of a zero-point parameter),
  `rand_like` QDrop masks and `where` mixing, `|APH|` taken per step as its loss does. (Before issue
  #15 the emulation kept zero-points and AdaRound's s, z as buffers and skipped `.abs()`: it did less
  work than the reference, ~10 % of its step.)
* peak resident memory of the process.

Times are wall seconds and CPU seconds (process user + system): on a shared machine the CPU figure
is the steadier one; with one thread it is the wall time of an idle core. The reference figures
quoted by the issue (2-core CPU, DeiT-T): block step 0.64 s, MR step 0.19 s, APH 0.2 s per image
and unit. Calibration is benchmarked by bench/bench_aphq_calib.py.
"""
from __future__ import annotations

import argparse
import copy
import resource
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aphq.aph import average_perturbation_hessian  # noqa: E402
from aphq.mlp_recon import _loss, _mlp_forward, positive_quantile, reconstruct_mlps  # noqa: E402
from common.recon.adaround import AdaRoundQuantizer, attach_adaround, beta_schedule  # noqa: E402
from common.recon.block import reconstruct_model  # noqa: E402
from common.calib.capture import capture_io, reduce_minmax  # noqa: E402
from common.quant import UniformQuantizer  # noqa: E402
from common.quant.modules import QuantMatMul  # noqa: E402
from common.quant.primitives import qparams_from_range, round_ste  # noqa: E402
from common.quant.quantizers import quant_state, quantizers_of  # noqa: E402
from common.quant.scheme import QuantScheme  # noqa: E402
from common.quant.wrap import quant_layers, wrap_model  # noqa: E402
from common.models.units import model_units, run_units  # noqa: E402

TIMM = {"deit_t": "deit_tiny_patch16_224", "deit_s": "deit_small_patch16_224", "deit_b": "deit_base_patch16_224"}
REFERENCE = {"block_step": 0.64, "mr_step": 0.19, "aph_per_image_unit": 0.2}  # issue #4, 2-core CPU, DeiT-T


class Clock:
    """Wall and CPU (user + system of this process) seconds of a block."""

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w0, time.process_time() - self.c0


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def minmax_calibrated(fp: torch.nn.Module, images: torch.Tensor, bits: int = 4) -> torch.nn.Module:
    """APHQ-like wrapping with min/max ranges (step times do not depend on the ranges)."""
    q = wrap_model(copy.deepcopy(fp), QuantScheme(w_bit=bits, a_bit=bits, matmul_granularity="head"))
    layers = dict(quant_layers(q))
    with quant_state(q, weight=False, act=False), capture_io(layers, arg=None) as io:
        for xb in images.split(16):
            q(xb)
    for name, layer in layers.items():
        ins = [torch.cat(t) for t in zip(*io[name]["inputs"])]
        pairs = [(layer.a_quantizer, ins[0]), (layer.b_quantizer, ins[1])] if isinstance(layer, QuantMatMul) \
            else [(layer.input_quantizer, ins[0])]
        if not isinstance(layer, QuantMatMul) and isinstance(layer.weight_quantizer, UniformQuantizer):
            w = layer.weight
            lo, hi = reduce_minmax(w.reshape(w.shape[0], -1), layer.weight_quantizer.granularity)
            s, z = qparams_from_range(lo.clamp(max=0), hi.clamp(min=0), bits)
            shape = (-1,) + (1,) * (w.dim() - 1)
            layer.weight_quantizer.set_qparams(s.reshape(shape), z.reshape(shape))
        for aq, x in pairs:
            if isinstance(aq, UniformQuantizer):
                lo, hi = reduce_minmax(x, aq.granularity)
                aq.set_qparams(*qparams_from_range(lo.clamp(max=0), hi.clamp(min=0), bits))
        io[name] = {"inputs": [], "outputs": []}
    return q


# --------------------------------------------------------------------------- reference-style emulations


def reference_aph_seconds(fp: torch.nn.Module, images: torch.Tensor, unit_index: int, eps: float = 1e-6,
                          temp: float = 20.0) -> Clock:
    """Per unit, the reference's two sweeps: full forward with O ± ε at the unit, KL batchmean, full
    backward with parameter gradients (never zeroed), gradient of the unit output captured by a hook."""
    model = copy.deepcopy(fp).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    unit = model_units(model)[unit_index]
    store = {}
    sign = {"s": 1.0}
    h1 = unit.module.register_forward_hook(lambda m, a, o: o + sign["s"] * eps)
    h2 = unit.module.register_full_backward_hook(lambda m, gi, go: store.__setitem__("g", go[0].detach().cpu()))
    with torch.no_grad():
        p = [torch.softmax(model(b) / temp, -1) for b in images.split(32)]
    with Clock() as c:
        for s in (1.0, -1.0):
            sign["s"] = s
            for b, pb in zip(images.split(32), p):
                loss = F.kl_div(F.log_softmax(model(b) / temp, -1), pb, reduction="batchmean")
                loss.backward()
    h1.remove()
    h2.remove()
    return c


class _RecomputeFloorAdaRound(AdaRoundQuantizer):
    """AdaRound as in BRECQ/APHQ: ⌊W/s⌋ recomputed from the weight every forward; s and z are
    `nn.Parameter`s there (`quantizers/adaround.py`), so autograd also forms their (unused) gradients."""

    def fake_quant(self, w):
        r = self.h() if self.soft else self.hard_rounding()
        q = torch.clamp(torch.floor(w / self.scale) + r + self.zero_point, 0, self.qmax)
        return (q - self.zero_point) * self.scale


class _ReferenceActQuantizer(UniformQuantizer):
    """The reference's activation fake-quant in training (`quantizers/uniform.py`): STE rounding, round(z)
    taken from a zero-point Parameter (no detach, so autograd reduces a zero gradient for it), QDrop by
    `rand_like` + `where`."""

    def fake_quant(self, x):
        x_int = round_ste(x / self.scale)
        zp = torch.round(self.zero_point)
        x_dequant = ((x_int + zp).clamp(0, 2 ** self.bits - 1) - zp) * self.scale
        if self.training and self.drop_prob < 1.0:
            return torch.where(torch.rand_like(x) < self.drop_prob, x_dequant, x)
        return x_dequant


def reference_block_step(q: torch.nn.Module, fp_in, fp_out, q_in, aph, unit_index: int, iters: int) -> Clock:
    """The reference's `reconstruct_single_block` loop body on one unit (see module docstring)."""
    unit = model_units(q)[unit_index]
    adas = attach_adaround(unit.module)
    acts = [a for _, a in quantizers_of(unit.module, "act") if isinstance(a, UniformQuantizer) and a.active]
    for a in adas:
        a.__class__ = _RecomputeFloorAdaRound
    # The reference's zero-points (activation and AdaRound) and AdaRound scales are nn.Parameters with
    # requires_grad=True, like every weight, bias and LayerNorm parameter: their gradients are computed.
    for a in acts:
        a.__class__ = _ReferenceActQuantizer
    for m in adas + acts:
        names = ("scale", "zero_point") if isinstance(m, AdaRoundQuantizer) else ("zero_point",)
        for name in names:
            setattr(m, name, torch.nn.Parameter(getattr(m, name).detach().clone()))
    for p in q.parameters():
        p.requires_grad_(True)
    for a in acts:
        a.ste, a.drop_prob = True, 0.5
        a.train()
    w_opt = torch.optim.Adam([a.alpha for a in adas], lr=1e-3)
    a_opt = torch.optim.Adam([a.scale for a in acts], lr=4e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(a_opt, T_max=iters)
    n, rec0 = fp_in.shape[0], None
    with Clock() as c:
        for t in range(1, iters + 1):
            idx = torch.randperm(n)[:32]
            x_q, x_fp = q_in[idx], fp_in[idx]
            x = torch.where(torch.rand_like(x_q) < 0.5, x_q, x_fp)
            rec = ((unit.module(x) - fp_out[idx]).pow(2) * aph.abs()).mean()
            rec0 = rec.item() if rec0 is None else rec0
            rec = 2 * rec / rec0
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


def reference_mr_step(mlp, x, y, weight, ub: float, iters: int) -> Clock:
    """The reference's MR step: fc1 twice, two dense fc2 branches, norm2 in the optimizer (no grad)."""
    params = list(mlp.fc1.parameters()) + list(mlp.fc2.parameters())
    opt = torch.optim.Adam(params, lr=4e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters)
    n = x.shape[0]
    with Clock() as c:
        for _ in range(iters):
            idx = torch.randperm(n)[:32]
            xb, yb = x[idx], y[idx]
            out = mlp.fc2(F.relu(mlp.fc1(xb)))
            out_clip = mlp.fc2(torch.clamp(F.relu(mlp.fc1(xb)), max=ub))
            loss = ((out - yb).pow(2) * weight.abs()).sum(1).mean() / 10 \
                + 2 * ((out_clip - yb).pow(2) * weight.abs()).sum(1).mean() / 10
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return c


# --------------------------------------------------------------------------- GEMM floor


def _gemm_shapes(fp: torch.nn.Module, batch: int) -> dict[str, list[tuple[int, int, int, int, bool]]]:
    """The GEMMs of one MR step and one block step as (count, m, k, n, left transposed): the matrix
    products any implementation of the same maths in float32 must do (the unit input needs no grad)."""
    blk = fp.blocks[0]
    d, hidden = blk.mlp.fc1.in_features, blk.mlp.fc1.out_features
    heads = blk.attn.num_heads
    hd = d // heads
    t = fp.patch_embed.num_patches + getattr(fp, "num_prefix_tokens", 1)
    rows = batch * t
    bh = batch * heads
    mr = [(1, rows, d, hidden, False), (1, rows, hidden, d, False),  # fc1, fc2
          (1, d, rows, hidden, True), (1, rows, d, hidden, False),  # fc2: ∂W, ∂h
          (1, hidden, rows, d, True)]  # fc1: ∂W (∂x not needed)
    block = [(1, rows, d, 3 * d, False), (bh, t, hd, t, False), (bh, t, t, hd, False), (1, rows, d, d, False),
             (1, rows, d, hidden, False), (1, rows, hidden, d, False),  # forward
             (1, rows, d, hidden, False), (1, d, rows, hidden, True),  # fc2: ∂x, ∂W
             (1, rows, hidden, d, False), (1, hidden, rows, d, True),  # fc1
             (1, rows, d, d, False), (1, d, rows, d, True),  # proj
             (bh, t, hd, t, False), (bh, t, t, hd, False),  # attn·V: ∂attn, ∂V
             (bh, t, t, hd, False), (bh, t, t, hd, False),  # q·kᵀ: ∂q, ∂k
             (1, 3 * d, rows, d, True)]  # qkv: ∂W
    return {"mr": mr, "block": block}


def gemm_floor(shapes: list[tuple[int, int, int, int, bool]], reps: int = 10) -> tuple[float, float]:
    """(wall, CPU) seconds of one pass over `shapes` (float32 matmuls on random data, best of `reps`)."""
    gen = torch.Generator().manual_seed(0)
    ops = []
    for count, m, k, n, trans in shapes:
        a = torch.randn(count, k, m, generator=gen).transpose(1, 2) if trans else torch.randn(count, m, k, generator=gen)
        ops.append((a, torch.randn(count, k, n, generator=gen)))
    best = (float("inf"), float("inf"))
    for _ in range(reps):
        with Clock() as c:
            for a, b in ops:
                torch.matmul(a, b)
        best = min(best, (c.wall, c.cpu))
    return best


# --------------------------------------------------------------------------- benchmark


def _mlp_data(fp, units, images, block: str):
    """fc1 input and MLP output of one FP block over the images."""
    blk = fp.get_submodule(block)
    index = [u.name for u in units].index(block)
    store: dict[str, list] = {"x": [], "y": []}
    h1 = blk.mlp.fc1.register_forward_hook(lambda m, a, o: store["x"].append(a[0]))
    h2 = blk.mlp.register_forward_hook(lambda m, a, o: store["y"].append(o))
    with torch.no_grad():
        for b in images.split(64):
            run_units(units, b, 0, index + 1)
    h1.remove()
    h2.remove()
    return torch.cat(store["x"]), torch.cat(store["y"])


def _our_mr_steps(mlp, x, y, weight, ub: float, iters: int) -> Clock:
    opt = torch.optim.Adam(list(mlp.fc1.parameters()) + list(mlp.fc2.parameters()), lr=4e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters)
    with Clock() as c:
        for _ in range(iters):
            idx = torch.randperm(x.shape[0])[:32]
            yh, yc = _mlp_forward(mlp, x[idx], ub)
            loss = _loss(yh, yc, y[idx], weight, 2.0, 10.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return c


def bench_model(name: str, args) -> dict:
    torch.manual_seed(0)
    fp = timm.create_model(TIMM[name], pretrained=False).eval()
    images = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    units = model_units(fp)
    names = [u.name for u in units]
    out: dict[str, object] = {"model": name, "threads": torch.get_num_threads(), "images": args.images}

    # FP capture: one walk through all units (the reference: one full sweep per unit).
    shapes = {}
    with Clock() as c, torch.no_grad():
        x = images
        for u in units:
            x = torch.cat([u.module(u.pre(b)) for b in x.split(64)])
            shapes[u.name] = (1,) + tuple(x.shape[1:])
    out["fp_capture (all units)"] = (c.wall, c.cpu)

    if args.skip_aph:  # step times do not depend on the weights' values
        gen = torch.Generator().manual_seed(0)
        aph = {n: torch.rand(shapes[n], generator=gen) for n in names[:-1]}
    else:  # APH of every unit (head excluded) over `aph_images` images.
        aph_imgs = images[: args.aph_images]
        with Clock() as c:
            aph = average_perturbation_hessian(fp, aph_imgs, names, progress=False)
        per = len(aph) * len(aph_imgs)
        out["aph all units"] = (c.wall, c.cpu)
        out["aph per image and unit"] = (c.wall / per, c.cpu / per)
    if args.reference and not args.skip_aph:
        r = [reference_aph_seconds(fp, images[:32], i) for i in (1, len(units) // 2)]
        out["ref-style aph per image/unit"] = (sum(x.wall for x in r) / 64, sum(x.cpu for x in r) / 64)

    # MR of the last block: stage wall time (its APH pass is the short one), then per-step cost.
    last = names[-2]
    relu = copy.deepcopy(fp)
    with Clock() as c:
        mr = reconstruct_mlps(relu, fp, images, {"iters": args.mr_iters, "log_every": 0, "pct": 0.99},
                              blocks=[last], progress=False)
    out["mr one block (stage)"] = (c.wall, c.cpu)
    out["mr step (in stage)"] = (mr["blocks"][last]["sec_per_iter"], None)
    xs, ys = _mlp_data(fp, units, images, last)
    weight = torch.rand((1,) + tuple(ys.shape[1:]))
    mlp = relu.get_submodule(last).mlp
    with torch.no_grad():
        ub = positive_quantile(torch.relu(mlp.fc1(xs[:32])), 0.99)
    c = _our_mr_steps(copy.deepcopy(mlp), xs, ys, weight, ub, args.mr_iters)
    out["mr step"] = (c.wall / args.mr_iters, c.cpu / args.mr_iters)
    if args.reference:
        r = reference_mr_step(copy.deepcopy(mlp), xs, ys, weight, ub, args.mr_iters)
        out["ref-style mr step"] = (r.wall / args.mr_iters, r.cpu / args.mr_iters)

    # Block reconstruction of blocks.0: marginal cost per step = difference of two run lengths.
    q = minmax_calibrated(fp, images[:32])
    clocks = []
    for iters in (args.block_iters, 2 * args.block_iters):
        with Clock() as c:
            res = reconstruct_model(copy.deepcopy(q), fp, images, {"iters": iters, "log_every": 0,
                                                                    "eval_stats": False, "compile": args.compile},
                                    weights=aph, start_unit=1, stop_unit=2, progress=False)
        clocks.append(c)
    out["block unit, short run (stage)"] = (clocks[0].wall, clocks[0].cpu)
    out["block step (in stage)"] = (res["units"]["blocks.0"]["sec_per_iter"], None)
    k = args.block_iters
    out["block step"] = ((clocks[1].wall - clocks[0].wall) / k, (clocks[1].cpu - clocks[0].cpu) / k)
    if args.reference:
        with torch.no_grad():
            fp_in = units[1].pre(torch.cat([units[0].module(b) for b in images.split(64)]))
            fp_out = torch.cat([units[1].module(b) for b in fp_in.split(64)])
            q_in = fp_in + 0.01 * torch.randn_like(fp_in)
        r = reference_block_step(copy.deepcopy(q), fp_in, fp_out, q_in, aph["blocks.0"], 1, 2 * k)
        out["ref-style block step"] = (r.wall / (2 * k), r.cpu / (2 * k))
    floors = _gemm_shapes(fp, 32)
    out["mr step GEMMs alone"] = gemm_floor(floors["mr"])
    out["block step GEMMs alone"] = gemm_floor(floors["block"])
    out["peak RSS (MiB)"] = peak_rss_mib()
    return out


def _fmt(v) -> str:
    if isinstance(v, tuple):
        w, c = v
        return f"{w:8.4f} s wall" + (f"  {c:8.4f} s CPU" if c is not None else "")
    return f"{v:.0f}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["deit_t", "deit_s"], choices=sorted(TIMM))
    ap.add_argument("--images", type=int, default=64, help="images for captures and reconstruction data")
    ap.add_argument("--aph-images", type=int, default=32, help="images for the APH timing")
    ap.add_argument("--block-iters", type=int, default=10, help="steps (runs of k and 2k steps are timed)")
    ap.add_argument("--mr-iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-reference", dest="reference", action="store_false",
                    help="skip the reference-style emulations")
    ap.add_argument("--skip-aph", action="store_true",
                    help="random loss weights instead of the APH (no APH timings; the steps are unaffected)")
    ap.add_argument("--compile", default="false", help="method.recon.compile for our block step (default: eager)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; reference figures (2-core CPU, "
          f"DeiT-T): {REFERENCE}")
    for name in args.models:
        res = bench_model(name, args)
        print(f"\n== {name} ==")
        for k, v in res.items():
            print(f"  {k:32s} {_fmt(v)}")
        if args.reference:
            for ours, ref in (("block step", "ref-style block step"), ("mr step", "ref-style mr step"),
                              ("aph per image and unit", "ref-style aph per image/unit")):
                if ours not in res or ref not in res:
                    continue
                o, r = res[ours], res[ref]
                print(f"  speed-up {ours:23s} {r[0] / o[0]:5.2f}x wall  {r[1] / o[1]:5.2f}x CPU")
            for step in ("block step", "mr step"):  # the most any float32 implementation could gain
                r, f = res.get(f"ref-style {step}"), res[f"{step} GEMMs alone"]
                if r is not None:
                    print(f"  bound    {step:23s} {r[0] / f[0]:5.2f}x wall  {r[1] / f[1]:5.2f}x CPU"
                          "  (ref-style step / its GEMMs alone)")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
