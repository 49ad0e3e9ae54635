"""APHQ calibration search (aphq spec §2.4, §2.5): grids, quantile semantics, exact fast argmins.

Tiny tensors and models only; torch runs single-threaded here (small ops are dominated by thread
synchronisation on a shared 2-core machine, and results do not depend on it).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch

import common.calib.grids as G
import common.calib.search as S
from common.calib.calibrate import CalibConfig, calibrate_linear, calibrate_matmul, calibrate_model, expand_token_wise
from common.quant import QuantLinear, QuantMatMul, UniformQuantizer, quant_state
from common.quant.granularity import PerTensor
from common.quant.primitives import fake_quant_affine
from common.quant.scheme import QuantScheme
from common.quant.wrap import quant_layers, wrap_model


@pytest.fixture(autouse=True)
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _aphq_scheme(bits: int = 4) -> QuantScheme:
    return QuantScheme(w_bit=bits, a_bit=bits, matmul_granularity="head", ln_act_granularity="channel",
                       ln_sites=("qkv", "fc1", "reduction"))


def _tiny_vit(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8,
                          embed_dim=32, num_heads=2, **kw).eval()
    with torch.no_grad():  # non-trivial LayerNorm affines and biases, so reparam has work to do
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return m


# --------------------------------------------------------------------------- grids and quantiles


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_weight_grid_matches_float64_enumeration(bits):
    torch.manual_seed(bits)
    w = torch.randn(5, 40) * torch.rand(5, 1)
    grid = G.weight_grid(w, bits)
    s, z = grid.params(torch.arange(128))  # (128, rows)
    w64 = w.double().numpy()
    num_zp = min(16, 2 ** bits)
    num_scale = 128 // num_zp
    for r in range(5):
        q9, q1, q0 = np.quantile(w64[r], 0.9), np.quantile(w64[r], 0.1), w64[r].min()
        dmin, dmax = q9 - q1, w64[r].max() - q0
        for k in range(128):
            j, zi = k % num_scale, k // num_scale
            s_ref = (dmin + j / (num_scale - 1) * (dmax - dmin)) / (2 ** bits - 1)
            z_ref = 2 ** (bits - 1) - num_zp // 2 + zi
            assert float(s[k, r]) == pytest.approx(s_ref, rel=1e-5)
            assert float(z[k, r]) == z_ref
    # the weight self-search picks the float64 argmin of the row MSE
    best = G.pruned_argmin(128, 5, [(0, 1)], lambda idx, lo, hi: S.self_errors(w[None], *grid.params(idx), bits))
    for r in range(5):
        w64 = w[r].double()
        errs = [float(((fake_quant_affine(w64, s[k, r].double(), z[k, r].double(), bits) - w64) ** 2).sum())
                for k in range(128)]
        assert errs[int(best[r])] == pytest.approx(min(errs), rel=1e-6)


@pytest.mark.parametrize("n", [7, 1000, 70_001, 300_000])
def test_quantiles_equal_torch_quantile(n):
    torch.manual_seed(n)
    x = torch.randn(2, n) ** 3  # heavy tails: uneven histogram bins
    probs = [0.9, 1.0, 0.1, 0.0, 0.99, 0.99999, 0.01, 0.00001]
    ours = S.quantiles(x, probs)
    ref = torch.quantile(x, torch.tensor(probs), dim=1).T
    assert torch.equal(ours, ref)


def test_lower_levels_are_the_references_float32_one_minus_pct():
    """The reference takes torch.quantile(x, 1 - pct) of a float32 tensor pct: 1 − float32(0.9) =
    0.10000002384…, not float32(0.1); 1 − float32(0.99999) = 1.00136e-5, not 1e-5. Every grid must start
    from exactly those quantiles (computed here independently, the reference's way)."""
    assert S.reference_levels([0.9, 1.0])[2] == 1 - np.float32(0.9) != np.float32(0.1)
    torch.manual_seed(3)
    bits = 4
    levels = 2 ** bits - 1
    # linear weight rows (11 entries: rank 10·0.1 is near an integer, so the level matters)
    w = torch.randn(6, 11)
    pct = torch.tensor([0.9, 1.0])
    up, lo = torch.quantile(w, pct, dim=-1), torch.quantile(w, 1 - pct, dim=-1)
    assert torch.equal(G.weight_grid(w, bits).scales[:, 0], ((up[0] - lo[0]) / levels).clamp_min(1e-8))
    assert not torch.equal(lo[0], torch.quantile(w, 0.1, dim=-1))  # the inexact level would differ here
    # per-tensor activation
    x = torch.randn(3, 7, 11)
    up, lo = torch.quantile(x.reshape(-1), pct), torch.quantile(x.reshape(-1), 1 - pct)
    assert torch.equal(G.activation_grid(x, bits).scales[0, 0], ((up[0] - lo[0]) / levels).clamp_min(1e-4))
    # attention operand, per head: u_0 = u.99, l_0 = l(1 − 0.99999)
    a = torch.randn(4, 2, 9, 9).softmax(-1)
    pct = torch.tensor([0.99, 0.99999])
    rows = a.transpose(0, 1).reshape(2, -1)
    u, l_ = G.matmul_bounds(a)
    assert torch.equal(u[0], torch.quantile(rows, pct, dim=-1)[0])
    assert torch.equal(l_[0], torch.quantile(rows, 1 - pct, dim=-1)[1])
    # patch-embed conv rows: pct_i = 0.99 + (0.9999 − 0.99)(i/(n−1))^0.5
    cw = torch.randn(5, 3, 4, 4)
    n = 16
    pct = torch.tensor([0.99 + (0.9999 - 0.99) * (i / (n - 1)) ** 0.5 for i in range(n)])
    u, l_ = G.conv_percentiles(cw, n)
    assert torch.equal(u, torch.quantile(cw.reshape(5, -1), pct, dim=-1))
    assert torch.equal(l_, torch.quantile(cw.reshape(5, -1), 1 - pct, dim=-1))


def test_chunk_averaged_quantile_definition(monkeypatch):
    """Rows longer than the limit are split into m contiguous chunks (m the smallest working power of two)
    and the chunk quantiles averaged: the reference's workaround for torch.quantile's 2^24 limit."""
    assert S.chunk_count(2 ** 24) == 1 and S.chunk_count(2 ** 24 + 2) == 2
    assert S.chunk_count(128 * 197 * 768) == 2 and S.chunk_count(128 * 197 * 3072) == 8
    monkeypatch.setattr(S, "QUANTILE_MAX", 1000)
    torch.manual_seed(0)
    x = torch.randn(1, 3000) * torch.linspace(0.1, 3, 3000)
    m = S.chunk_count(3000)
    assert m == 4  # 3000/2 = 1500 > 1000; 3000/4 = 750
    probs = [0.9, 1.0, 0.1, 0.0]
    ref = torch.stack([torch.quantile(c, torch.tensor(probs)) for c in x.view(m, -1)]).mean(0)
    assert torch.allclose(S.quantiles(x, probs)[0], ref, atol=0, rtol=1e-6)
    exact = torch.quantile(x[0], torch.tensor(probs))
    assert torch.equal(S.quantiles(x, probs, chunk_average=False)[0], exact)
    assert not torch.allclose(S.quantiles(x, probs)[0], exact)  # the quirk is visible


# --------------------------------------------------------------------------- argmin engines


def test_pruned_argmin_equals_exhaustive():
    torch.manual_seed(0)
    per_sample = torch.rand(40, 64, 3).double() * torch.linspace(0.5, 2.0, 40)[:, None, None]  # (cand, sample, group)
    per_sample[17] *= 0.2  # a clear winner for every group
    per_sample[5, :, 1] = per_sample[17, :, 1]  # an exact tie with a smaller index in group 1

    def evaluate(idx, lo, hi):
        return per_sample[idx, lo:hi].sum(1)

    full = per_sample.sum(1)
    best = G.pruned_argmin(40, 3, G.sample_chunks(64, 1, min_elems=1, min_total=1), evaluate)
    assert best.tolist() == [17, 5, 17]
    assert torch.equal(best, G._first_argmin(full))


@pytest.mark.parametrize("samples", [1, 6])  # one sample: the reference's calib_size 1
@pytest.mark.parametrize("k,m", [(8, 20), (20, 8)])
def test_left_operand_gram_form_equals_direct(k, m, samples):
    torch.manual_seed(k)
    left, right = torch.randn(samples, 2, 5, k), torch.randn(samples, 2, k, m)
    target = left @ right + 0.1 * torch.randn(samples, 2, 5, m)
    s = torch.rand(9, 2) * 0.5 + 0.05
    z = torch.randint(0, 16, (9, 2)).float()
    search = S.LeftOperandSearch(left, right, target, 4)
    assert search.gram == (k < m)
    got = search.errors(s, z, 0, samples)
    ref = torch.stack([((fake_quant_affine(left, s[c].view(1, 2, 1, 1), z[c].view(1, 2, 1, 1), 4) @ right - target)
                        .double() ** 2).sum((0, 2, 3)) for c in range(9)])
    assert torch.allclose(got, ref, rtol=1e-4)


def test_weight_output_errors_rank_like_direct():
    torch.manual_seed(1)
    w, b = torch.randn(7, 12), torch.randn(7)
    x = torch.randn(50, 12)
    y = x @ w.T + b + 0.05 * torch.randn(50, 7)
    grid = G.weight_grid(w, 3)
    s, z = grid.params(torch.arange(128))
    got = S.weight_output_errors(w, b, x, y, s, z, 3)
    direct = torch.stack([((x.double() @ fake_quant_affine(w, s[c][:, None], z[c][:, None], 3).double().T
                            + b.double() - y.double()) ** 2).sum(0) for c in range(128)])
    # equal up to a per-row constant (fp32 Gram: relative precision ~1e-7 of the error scale)
    diff = (got - got[:1]) - (direct - direct[:1])
    assert float(diff.abs().max()) <= 1e-5 * float(direct.abs().max())
    assert torch.equal(G._first_argmin(got), G._first_argmin(direct))


# --------------------------------------------------------------------------- module searches


def test_matmul_search_picks_argmin_of_its_objective():
    torch.manual_seed(0)
    a, b = torch.randn(8, 2, 6, 4), torch.randn(8, 2, 4, 6)
    y = a @ b
    mm = QuantMatMul(UniformQuantizer(4, granularity=PerTensor()), UniformQuantizer(4, granularity=PerTensor()),
                     num_heads=2)
    calibrate_matmul(mm, a, b, y, CalibConfig(search_rounds=0))
    # B's joint search ran last: its choice is the argmin over (u_i, l_i) given the final A
    u, lo = G.matmul_bounds(b)
    a_hat = mm.a_quantizer.fake_quant(a).detach().double()
    for h in range(2):
        errs = []
        for i in range(128):
            s, z = G.pair_qparams(u[i, h], lo[i, h], 4)
            errs.append(float(((a_hat[:, h] @ fake_quant_affine(b[:, h], s, z, 4).double() - y[:, h].double()) ** 2)
                              .sum()))
        chosen = G.pair_qparams(u[:, h], lo[:, h], 4)[0]
        idx = int((chosen == mm.b_quantizer.scale.view(-1)[h]).nonzero()[0])
        assert errs[idx] == pytest.approx(min(errs), rel=1e-6)


def test_linear_reparam_keeps_function_and_researches_per_tensor():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.2, 3.0)
        norm.bias.normal_(0, 1)
    lin = torch.nn.Linear(16, 24)
    x = torch.randn(10, 5, 16)
    h = norm(x)
    y = lin(h).detach()
    q = QuantLinear.from_float(lin, *_aphq_scheme().layer_quantizers("qkv"))
    ref_w = lin.weight.detach().clone()
    info = calibrate_linear(q, h.detach(), y, CalibConfig(), norm)
    assert info["reparam"]
    assert q.input_quantizer.scale.numel() == 1 and float(q.input_quantizer.zero_point) == round(
        float(q.input_quantizer.zero_point))
    assert not torch.equal(q.weight, ref_w)
    with quant_state(q, weight=False, act=False):
        assert torch.allclose(q(norm(x)), y, atol=1e-5)


def test_calibrated_model_keeps_fp_logits_and_quantizes_everything():
    fp = _tiny_vit()
    m = wrap_model(copy.deepcopy(fp), _aphq_scheme(3))
    x = torch.randn(12, 3, 32, 32)
    rec = calibrate_model(m, x, CalibConfig(n_images=12), 3, 3, progress=False)
    assert rec["reparam"]
    for name, layer in quant_layers(m):
        qs = [layer.a_quantizer, layer.b_quantizer] if isinstance(layer, QuantMatMul) else \
            [layer.weight_quantizer] + ([layer.input_quantizer] if layer.site != "patch_embed" else [])
        assert all(bool(q.calibrated) for q in qs), name
    with torch.no_grad():
        with quant_state(m, weight=False, act=False):
            assert torch.allclose(m(x), fp(x), atol=1e-4)
        assert torch.isfinite(m(x)).all()


@pytest.mark.parametrize("n_images", [1, 2])
def test_calibration_runs_with_one_or_two_images(n_images):
    """The reference calibrates with calib_size 1 too; a single sample must not break the batched
    searches (it used to: a `view` of a non-contiguous quantized operand)."""
    fp = _tiny_vit()
    x = torch.randn(n_images, 3, 32, 32, generator=torch.Generator().manual_seed(n_images))
    m = wrap_model(copy.deepcopy(fp), _aphq_scheme(4))
    calibrate_model(m, x, CalibConfig(n_images=n_images), 4, 4, progress=False)
    for name, layer in quant_layers(m):
        qs = [layer.a_quantizer, layer.b_quantizer] if isinstance(layer, QuantMatMul) else \
            [layer.weight_quantizer] + ([layer.input_quantizer] if layer.site != "patch_embed" else [])
        assert all(bool(q.calibrated) for q in qs), name
    with torch.no_grad():
        assert torch.isfinite(m(x)).all()
        with quant_state(m, weight=False, act=False):
            assert torch.allclose(m(x), fp(x), atol=1e-4)


def test_calibration_exact_speedups_do_not_change_results(monkeypatch):
    import common.calib.calibrate as C

    # force branch and bound even on tiny problems (by default it only splits large ones)
    monkeypatch.setattr(C, "sample_chunks", lambda n, per=1: G.sample_chunks(n, per, min_elems=1, min_total=1))
    fp = _tiny_vit()
    x = torch.randn(8, 3, 32, 32)
    states = []
    for prune, memo in [(True, True), (False, False)]:
        m = wrap_model(copy.deepcopy(fp), _aphq_scheme(4))
        calibrate_model(m, x, CalibConfig(prune=prune, memo=memo), 4, 4, progress=False)
        states.append(m.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_reparam_quirk_and_token_wise():
    fp = _tiny_vit()
    x = torch.randn(4, 3, 32, 32)
    m = wrap_model(copy.deepcopy(fp), QuantScheme(w_bit=4, a_bit=8, matmul_granularity="head"))
    assert not calibrate_model(m, x, CalibConfig(), 4, 8, progress=False)["reparam"]  # a_bit != w_bit: no reparam
    m = wrap_model(copy.deepcopy(fp), _aphq_scheme(2))
    calibrate_model(m, x, CalibConfig(token_wise=True), 2, 2, progress=False)
    n_tok = 1 + (32 // 8) ** 2
    blk = m.blocks[0]
    assert tuple(blk.attn.qkv.input_quantizer.scale.shape) == (1, n_tok, 1)
    assert tuple(blk.attn.qkv.input_quantizer.zero_point.shape) == (1,)
    assert tuple(blk.attn.matmul1.a_quantizer.scale.shape) == (1, 2, n_tok, 1)
    assert tuple(blk.attn.matmul1.b_quantizer.scale.shape) == (1, 2, 1, n_tok)
    assert tuple(blk.attn.matmul2.b_quantizer.scale.shape) == (1, 2, 1, 16)  # per head-channel of v
    assert m.head.input_quantizer.scale.numel() == 1  # 2-D input: never token-wise
    with torch.no_grad():
        assert torch.isfinite(m(x)).all()
    assert not expand_token_wise(m.patch_embed.proj, (x,))


def test_swin_reduction_gets_reparam_bias():
    torch.manual_seed(0)
    fp = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1), embed_dim=16,
                           num_heads=(1, 1), img_size=56, window_size=7).eval()
    m = wrap_model(copy.deepcopy(fp), _aphq_scheme(4))
    x = torch.randn(2, 3, 56, 56)
    calibrate_model(m, x, CalibConfig(), 4, 4, progress=False)
    red = m.layers[1].downsample.reduction
    assert red.bias is not None and red.input_quantizer.scale.numel() == 1
    with torch.no_grad(), quant_state(m, weight=False, act=False):
        assert torch.allclose(m(x), fp(x), atol=1e-4)


def test_calibrated_state_loads_into_a_fresh_wrap():
    """A saved calibration (token-wise scales, reparam'd norms, per-tensor LN inputs) loads into a freshly
    wrapped model and reproduces its outputs (what the stage cache does)."""
    from aphq.method import load_quant_state

    fp = _tiny_vit()
    x = torch.randn(4, 3, 32, 32)
    m = wrap_model(copy.deepcopy(fp), _aphq_scheme(2))
    calibrate_model(m, x, CalibConfig(token_wise=True), 2, 2, progress=False)
    fresh = wrap_model(copy.deepcopy(fp), _aphq_scheme(2))
    load_quant_state(fresh, {k: v.clone() for k, v in m.state_dict().items()})
    from common.quant.granularity import PerToken

    assert isinstance(fresh.blocks[0].attn.qkv.input_quantizer.granularity, PerToken)
    assert isinstance(fresh.head.input_quantizer.granularity, PerTensor)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))
