"""Block reconstruction (spec §4.2, §4.5): objective decrease, input mixing, quantizer modes, resume."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from aphq.aph import average_perturbation_hessian, brecq_fisher_weights, fp_logits
from common.recon.adaround import AdaRoundQuantizer
from common.recon.block import BlockReconConfig, block_recon_config, reconstruct_model
from common.calib.capture import capture_io, reduce_minmax
from common.quant import UniformQuantizer
from common.quant.modules import QuantMatMul
from common.quant.primitives import qparams_from_range
from common.quant.quantizers import quant_state, quantizers_of
from common.quant.scheme import QuantScheme
from common.quant.wrap import quant_layers, wrap_model
from common.run.tracking import Tracker
from common.models.units import model_units

N, BS = 32, 8


from conftest import read_jsonl, tiny_vit  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@torch.no_grad()
def _minmax_calibrated(fp: nn.Module, images: torch.Tensor, bits: int = 3) -> nn.Module:
    """APHQ-like wrapping (per-row weights, per-tensor acts, per-head matmuls) with min/max ranges."""
    q = wrap_model(copy.deepcopy(fp), QuantScheme(w_bit=bits, a_bit=bits, matmul_granularity="head"))
    layers = dict(quant_layers(q))
    with quant_state(q, weight=False, act=False), capture_io(layers, arg=None) as io:
        q(images)
    for name, layer in layers.items():
        ins = [torch.cat(t) for t in zip(*io[name]["inputs"])]
        if isinstance(layer, QuantMatMul):
            pairs = [(layer.a_quantizer, ins[0]), (layer.b_quantizer, ins[1])]
        else:
            pairs = [(layer.input_quantizer, ins[0])]
            wq, w = layer.weight_quantizer, layer.weight
            if isinstance(wq, UniformQuantizer):
                lo, hi = reduce_minmax(w.reshape(w.shape[0], -1), wq.granularity)
                s, z = qparams_from_range(lo.clamp(max=0), hi.clamp(min=0), wq.bits)
                shape = (-1,) + (1,) * (w.dim() - 1)
                wq.set_qparams(s.reshape(shape), z.reshape(shape))
        for aq, x in pairs:
            if isinstance(aq, UniformQuantizer):
                lo, hi = reduce_minmax(x, aq.granularity)
                aq.set_qparams(*qparams_from_range(lo.clamp(max=0), hi.clamp(min=0), aq.bits))
    return q


@pytest.fixture(scope="module")
def setup():
    images = torch.randn(N, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    fp = tiny_vit()
    q = _minmax_calibrated(fp, images)
    return fp, q, images


def _cfg(**kw) -> BlockReconConfig:
    base = dict(iters=60, batch_size=BS, eval_batch_size=N, log_every=20, w_lr=1e-2, a_lr=1e-3, metric="mse")
    base.update(kw)
    return BlockReconConfig(**base)


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("metric", ["mse", "hessian_perturb"])
def test_each_unit_lowers_its_objective(setup, metric, tmp_path):
    fp, q0, images = setup
    q = copy.deepcopy(q0)
    training = {n: m.training for n, m in q.named_modules()}
    weights = None
    if metric == "hessian_perturb":
        names = [u.name for u in model_units(fp)]
        weights = average_perturbation_hessian(fp, images, names, batch_size=BS, progress=False)
    tracker = Tracker(tmp_path)
    res = reconstruct_model(q, fp, images, _cfg(iters=150, metric=metric), weights=weights, tracker=tracker,
                            progress=False)
    assert list(res["units"]) == ["patch_embed", "blocks.0", "blocks.1", "head"]
    for name, st in res["units"].items():
        assert st["objective_after"] < st["objective_before"], (name, st)
        assert st["sec_per_iter"] > 0
    # Finalised: plain quantizers back, no AdaRound, no training knobs; flags restored.
    assert not any(isinstance(m, AdaRoundQuantizer) for m in q.modules())
    for _, qz in quantizers_of(q):
        assert not getattr(qz, "ste", False) and getattr(qz, "drop_prob", 1.0) == 1.0
    assert {n: m.training for n, m in q.named_modules()} == training
    assert all(p.requires_grad for p in q.parameters())
    recs = read_jsonl(tracker.path)
    steps = [r["step"] for r in recs if r.get("curve") == "recon/blocks.0"]
    assert steps == [1, 20, 40, 60, 80, 100, 120, 140, 150]
    assert {"loss", "rec", "rec_raw", "round"} <= set(recs[-1])


def _record_training_inputs(module: nn.Module, store: list):
    """Forward pre-hook keeping inputs of training-size batches (evaluation passes use batch N)."""
    def hook(_m, args):
        if args[0].shape[0] == BS:
            store.append(args[0].detach().clone())
    return module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("mode", ["qdrop", "qinp", "rinp"])
def test_input_mixing_and_quantizer_modes(setup, mode):
    fp, q0, images = setup
    q = copy.deepcopy(q0)
    units_q, units_fp = model_units(q), model_units(fp)
    with torch.no_grad():
        fp_in = units_fp[1].pre(units_fp[0].module(images))
    refs = {}

    def done(name):
        if name == "patch_embed":  # quantized input of blocks.0 from the finalised patch_embed
            with torch.no_grad():
                refs["q_in"] = units_q[1].pre(units_q[0].module(images))

    seen, flags = [], []
    h1 = _record_training_inputs(q.blocks[0], seen)
    aq = q.blocks[0].attn.qkv.input_quantizer
    h2 = aq.register_forward_pre_hook(lambda m, a: flags.append((m.training, m.ste, m.drop_prob))
                                      if a[0].shape[0] == BS else None)
    drop = 0.5 if mode == "qdrop" else 1.0
    try:
        reconstruct_model(q, fp, images, _cfg(iters=12, mode=mode, drop_prob=drop, eval_stats=False),
                          on_unit_done=done, stop_unit=2, progress=False)
    finally:
        h1.remove()
        h2.remove()
    q_in = refs["q_in"]
    assert len(seen) == 12 and not torch.equal(q_in, fp_in)
    from_q = total = 0
    for x in seen:
        for row in x:
            j = int(((fp_in - row) ** 2).flatten(1).sum(1).argmin())
            if mode == "rinp":
                assert torch.equal(row, fp_in[j])
            elif mode == "qinp":
                j = int(((q_in - row) ** 2).flatten(1).sum(1).argmin())
                assert torch.equal(row, q_in[j])
            else:
                is_q, is_fp = row == q_in[j], row == fp_in[j]
                assert bool((is_q | is_fp).all())
                differ = q_in[j] != fp_in[j]
                from_q += int((is_q & differ).sum())
                total += int(differ.sum())
    if mode == "qdrop":
        assert 0.4 < from_q / total < 0.6  # elementwise, keep-quantized probability 0.5
    assert flags and all(f == (True, True, drop) for f in flags)
    assert not aq.ste and aq.drop_prob == 1.0


def test_resume_from_unit_matches_uninterrupted_run(setup):
    fp, q0, images = setup
    cfg = _cfg(iters=25, eval_stats=False)
    full = copy.deepcopy(q0)
    reconstruct_model(full, fp, images, cfg, generator=torch.Generator().manual_seed(11), progress=False)

    interrupted = copy.deepcopy(q0)
    saved = {}

    class Crash(RuntimeError):
        pass

    def checkpoint(name):
        saved[name] = copy.deepcopy(interrupted.state_dict())
        if name == "blocks.0":
            raise Crash

    with pytest.raises(Crash):
        reconstruct_model(interrupted, fp, images, cfg, generator=torch.Generator().manual_seed(11),
                          on_unit_done=checkpoint, progress=False)
    resumed = copy.deepcopy(q0)
    resumed.load_state_dict(saved["blocks.0"])
    assert not any(p.grad is not None for p in resumed.parameters())
    reconstruct_model(resumed, fp, images, cfg, generator=torch.Generator().manual_seed(11), start_unit=2,
                      progress=False)
    assert _states_equal(resumed, full)
    # Same with the quantized input handed over explicitly.
    again = copy.deepcopy(q0)
    again.load_state_dict(saved["blocks.0"])
    units = model_units(again)
    with torch.no_grad():
        x = images
        for u in units[:2]:
            x = u.module(u.pre(x))
        q_in = units[2].pre(x)
    reconstruct_model(again, fp, images, cfg, generator=torch.Generator().manual_seed(11), start_unit=2,
                      q_input=q_in, progress=False)
    assert _states_equal(again, full)
    # A different generator gives a different result.
    other = copy.deepcopy(q0)
    reconstruct_model(other, fp, images, cfg, generator=torch.Generator().manual_seed(12), progress=False)
    assert not _states_equal(other, full)


def test_per_sample_weights_and_brecq_fisher(setup):
    fp, q0, images = setup
    names = [u.name for u in model_units(fp)]
    per_sample = average_perturbation_hessian(fp, images, names, batch_size=BS, mean=False, progress=False)
    assert per_sample["blocks.0"].shape[0] == N
    q = copy.deepcopy(q0)
    res = reconstruct_model(q, fp, images, _cfg(iters=10, metric="hessian_perturb", use_mean_hessian=False),
                            weights=per_sample, stop_unit=2, progress=False)
    assert all(st["objective_after"] == st["objective_after"] for st in res["units"].values())  # finite
    q = copy.deepcopy(q0)
    calls = []
    fisher = brecq_fisher_weights(q, fp_logits(fp, images), batch_size=BS)

    def weights(name, q_in, fp_in):
        calls.append((name, q_in.shape[0], fp_in.shape[0]))
        return fisher(name, q_in, fp_in)

    # patch_embed: nothing is quantized yet, so its Fisher is fp rounding noise (or exactly 0, which
    # skips the first-step normalisation with a warning instead of the reference's NaN).
    res = reconstruct_model(q, fp, images, _cfg(iters=10, metric="hessian_brecq", use_mean_hessian=False),
                            weights=weights, progress=False)
    assert [c[0] for c in calls] == ["patch_embed", "blocks.0", "blocks.1"] and calls[0][1:] == (N, N)
    assert all(torch.isfinite(torch.tensor(st["rec_last"])) for st in res["units"].values())


def test_missing_weights_and_bad_config_are_errors(setup):
    fp, q0, images = setup
    with pytest.raises(ValueError, match="needs loss weights"):
        reconstruct_model(copy.deepcopy(q0), fp, images, _cfg(iters=1, metric="hessian_perturb"), progress=False)
    with pytest.raises(ValueError, match="mode"):
        BlockReconConfig(mode="qdrop+")
    assert block_recon_config({"iters": 3, "temp": 20}).iters == 3
    with pytest.warns(UserWarning, match="unknown"):
        block_recon_config({"iterz": 3})


def test_swin_units_reconstruct():
    torch.manual_seed(0)
    fp = timm.create_model("swin_tiny_patch4_window7_224", img_size=56, embed_dim=16, depths=(1, 1),
                           num_heads=(1, 2), num_classes=5).eval()
    images = torch.randn(16, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    q = _minmax_calibrated(fp, images)
    res = reconstruct_model(q, fp, images, _cfg(iters=30, eval_batch_size=16), progress=False)
    assert list(res["units"]) == ["patch_embed", "layers.0.blocks.0", "layers.1.downsample", "layers.1.blocks.0",
                                  "head"]
    assert sum(st["objective_after"] < st["objective_before"] for st in res["units"].values()) >= 4


def _reference_fake_quant(x, scale, zp, qmax, keep):
    """Autograd STE fake-quant with the clamp subgradient 1 at the grid ends (torch 1.10, the reference)."""
    v = x / scale
    c = v + (torch.round(v) - v).detach() + zp
    inside = (c >= 0) & (c <= qmax)
    y = (torch.where(inside, c, c.clamp(0, qmax).detach()) - zp) * scale
    return torch.where(keep.bool(), y, x) if keep is not None else y


@pytest.mark.parametrize("shape,sshape", [((4, 3, 9, 9), (1, 3, 1, 1)), ((4, 9, 16), (1,)), ((4, 9, 16), (1, 9, 1))])
@pytest.mark.parametrize("qdrop", [True, False])
def test_fused_fake_quant_matches_autograd_ste(shape, sshape, qdrop):
    from common.recon.block import _FakeQuantSTE, keep_mask

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g) * 3
    s0 = torch.rand(sshape, generator=g) * 0.3 + 0.1
    z = torch.round(torch.rand(sshape, generator=g) * 8)
    x0[0].flatten()[:4] = (torch.tensor([0.0, 15.0, -1.0, 16.0]) - z.flatten()[0]) * s0.flatten()[0]  # grid ends
    keep = keep_mask(x0, 0.5) if qdrop else None
    grad = torch.randn(shape, generator=g)
    outs = []
    for fn, dtype in ((_reference_fake_quant, torch.float64), (_FakeQuantSTE.apply, torch.float32)):
        x, s = x0.to(dtype).clone().requires_grad_(), s0.to(dtype).clone().requires_grad_()
        k = None if keep is None else keep.to(dtype)
        y = fn(x, s, z.to(dtype), 15.0, k)
        y.backward(grad.to(dtype))
        outs.append((y.detach(), x.grad, s.grad))
    (y64, gx64, gs64), (y32, gx32, gs32) = outs
    torch.testing.assert_close(y32, _reference_fake_quant(x0, s0, z, 15.0, keep), rtol=0, atol=0)  # bitwise
    torch.testing.assert_close(gx32.double(), gx64, rtol=0, atol=0)
    torch.testing.assert_close(gs32.double(), gs64, rtol=1e-4, atol=1e-5)


def test_keep_mask_is_bernoulli():
    from common.recon.block import keep_mask

    x = torch.empty(200_001)
    torch.manual_seed(0)
    m = keep_mask(x, 0.5)
    assert set(m.unique().tolist()) <= {0.0, 1.0} and m.dtype == x.dtype
    assert abs(m.mean().item() - 0.5) < 5 * 0.5 / 200_001 ** 0.5
    m2 = keep_mask(x, 0.8)
    assert abs(m2.mean().item() - 0.8) < 5 * 0.4 / 200_001 ** 0.5
    torch.manual_seed(0)
    assert torch.equal(keep_mask(x, 0.5), m)  # global RNG: reproducible


def test_unfused_path_still_reconstructs(setup):
    fp, q0, images = setup
    res = reconstruct_model(copy.deepcopy(q0), fp, images, _cfg(iters=40, fused_quant=False, tune_allocator=False),
                            stop_unit=2, progress=False)
    assert all(st["objective_after"] < st["objective_before"] for st in res["units"].values())


@pytest.mark.slow
def test_compiled_kernels_match_eager(setup):
    """compile='kernels' gives the same reconstruction as the eager fused path (up to summation order)."""
    fp, q0, images = setup
    cfg = _cfg(iters=6, eval_stats=False)
    a, b = copy.deepcopy(q0), copy.deepcopy(q0)
    reconstruct_model(a, fp, images, cfg, generator=torch.Generator().manual_seed(3), stop_unit=2, progress=False)
    reconstruct_model(b, fp, images, BlockReconConfig(**{**cfg.__dict__, "compile": "kernels"}),
                      generator=torch.Generator().manual_seed(3), stop_unit=2, progress=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=k)


def test_compile_auto_picks_kernels_for_long_runs_only():
    from common.recon.block import AUTO_COMPILE_ITERS, _compile_mode

    assert _compile_mode("auto", AUTO_COMPILE_ITERS - 1) is None
    assert _compile_mode("auto", AUTO_COMPILE_ITERS) == "kernels" == _compile_mode(True, 10)
    assert _compile_mode(False, 10 ** 6) is None and _compile_mode("unit", 1) == "unit"
    assert BlockReconConfig().compile == "auto"
    with pytest.raises(ValueError, match="compile must be"):
        BlockReconConfig(compile="fast")


def test_compiler_failure_falls_back_to_the_eager_kernels(setup, monkeypatch):
    """No working compiler: a warning, then exactly the eager reconstruction (same seeds, same numbers)."""
    import common.recon.block as B

    fp, q0, images = setup

    def broken():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(B, "_compiled_kernels", broken)
    monkeypatch.setattr(B, "_COMPILE_BROKEN", [])
    cfg = _cfg(iters=6, eval_stats=False)
    a, b = copy.deepcopy(q0), copy.deepcopy(q0)
    reconstruct_model(a, fp, images, cfg, generator=torch.Generator().manual_seed(3), stop_unit=2, progress=False)
    with pytest.warns(UserWarning, match="torch.compile of the fake-quant kernels failed.*no C\\+\\+ compiler"):
        reconstruct_model(b, fp, images, BlockReconConfig(**{**cfg.__dict__, "compile": "kernels"}),
                          generator=torch.Generator().manual_seed(3), stop_unit=2, progress=False)
    assert _states_equal(a, b)
    assert B._COMPILE_BROKEN and "no C++ compiler" in B._COMPILE_BROKEN[0]
