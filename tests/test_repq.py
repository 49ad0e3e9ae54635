"""RepQ-ViT building blocks: the percentile searches, the dual-uniform vote, lazy init, reparameterization."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf

from common.calib.percentile import group_quantiles, search_log_sqrt2_percentile, search_uniform_percentile
from common.quant.granularity import PerChannel, PerTensor
from common.quant.modules import QuantLinear
from common.quant.primitives import fake_quant_affine, fake_quant_log_sqrt2
from common.quant.quantizers import LogQuantizer, UniformQuantizer, quant_state, quantizers_of
from common.quant.wrap import wrap_model
from erq.dual_uniform import DualUniformQuantizer, outlier_columns
from erq.repq import apply_reparam, build_scheme, lazy_init, reparam_pairs

ACT_GRID = [0.999, 0.9999, 0.99999]
WEIGHT_GRID = [0.97, 0.98, 0.99, 0.995, 0.9995, 0.9997, 0.9999, 0.99995, 0.99999, 1.0]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


# --------------------------------------------------------------------------- searches

@pytest.mark.parametrize("n", [2, 97, 5000, 40000])
def test_group_quantiles_match_torch_quantile(n):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n))
    probs = WEIGHT_GRID + [1 - p for p in WEIGHT_GRID]
    ref = torch.stack([torch.quantile(x, p, dim=1) for p in probs], 1)
    assert torch.equal(group_quantiles(x, probs), ref)


def _naive_uniform_search(x: torch.Tensor, bits: int, grid):
    """RepQ-ViT's loop: quantile pair per p, quantize, MSE, keep the first strictly better one."""
    best, out = 1e10, None
    for p in grid:
        hi, lo = torch.quantile(x, p), torch.quantile(x, 1 - p)
        delta = (hi - lo) / (2 ** bits - 1)
        zp = torch.round(-lo / delta)
        score = (x - fake_quant_affine(x, delta, zp, bits)).pow(2).mean()
        if score < best:
            best, out = score, (delta, zp)
    return out


def test_uniform_search_matches_per_row_loop():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 64, generator=g) * torch.rand(12, 1, generator=g)
    w[3, 5] = 4.0  # an outlier row
    s, z = search_uniform_percentile(w, 4, WEIGHT_GRID)
    for i in range(w.shape[0]):
        rs, rz = _naive_uniform_search(w[i], 4, WEIGHT_GRID)
        torch.testing.assert_close(s[i], rs, rtol=1e-6, atol=0)
        assert z[i] == rz


def test_log_sqrt2_search_matches_loop():
    attn = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(1)).mul(3).softmax(-1)
    s = search_log_sqrt2_percentile(attn, 4, ACT_GRID)
    best, ref = 1e10, attn.max()
    for p in ACT_GRID:
        c = torch.quantile(attn.reshape(-1), p)
        score = (attn - fake_quant_log_sqrt2(attn, c, 4)).pow(2).mean()
        if score < best:
            best, ref = score, c
    assert torch.equal(s, ref.reshape(1))


# --------------------------------------------------------------------------- dual uniform

def test_outlier_vote_matches_numpy_counter():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 30, generator=g) * (0.2 + 3 * torch.rand(1, 30, generator=g))
    w[7] = -w[7].abs()  # a row without positive entries
    counts = Counter()
    for row in w.numpy():
        pos, neg = row[row > 0], row[row < 0]
        p = np.percentile(pos, 99) if pos.size else np.nan
        q = np.percentile(neg, 1) if neg.size else np.nan
        counts.update(np.where((row > p) | (row < q))[0].tolist())
    for k in (2, 5, 40):
        assert outlier_columns(w, k).tolist() == [c for c, _ in counts.most_common(k)]


def _integer_rank_rows(rows: int = 24, seed: int = 5) -> torch.Tensor:
    """Rows of 101 negative and 101 positive float32 entries, so both percentile ranks are integers:
    (101 − 1)·0.01 = 1 and (101 − 1)·0.99 = 99. The second- and third-most negative entries are far
    apart, so a level off by one ulp (1 − 0.99 = 0.010000000000000009) moves the threshold past the
    second one and flags it too."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        small = torch.rand(99, generator=g) * 1e-3 + 1e-5
        neg = -torch.cat([torch.tensor([2.0, 1.0]) * (1 + torch.rand(2, generator=g)), small])
        pos = torch.cat([torch.tensor([2.0, 1.0]) * (1 + torch.rand(2, generator=g)),
                         torch.rand(99, generator=g) * 0.5])
        row = torch.cat([neg, pos])
        out.append(row[torch.randperm(row.numel(), generator=g)])
    return torch.stack(out).float()


def _numpy_vote(w: torch.Tensor, neg_level: float) -> Counter:
    """The reference's vote, with numpy in float64: np.percentile(pos, 99), np.percentile(neg, neg_level)."""
    counts = Counter()
    for row in w.double().numpy():
        pos, neg = row[row > 0], row[row < 0]
        p = np.percentile(pos, 99) if pos.size else np.nan
        q = np.percentile(neg, neg_level) if neg.size else np.nan
        counts.update(np.where((row > p) | (row < q))[0].tolist())
    return counts


def test_outlier_vote_levels_are_exact_at_integer_ranks():
    """The negative threshold is np.percentile(neg, 100 − 99) = the 1st percentile exactly (reference),
    not the (1 − 0.99)·100 = 1.0000000000000009th: at an integer rank the latter flags one more weight."""
    from erq.dual_uniform import row_percentile_of_sign

    w = _integer_rank_rows()
    w64 = w.double().numpy()
    neg_ref = np.array([np.percentile(r[r < 0], 100 - 99) for r in w64])
    pos_ref = np.array([np.percentile(r[r > 0], 99) for r in w64])
    assert np.array_equal(row_percentile_of_sign(w, 1.0, positive=False).numpy(), neg_ref)
    assert np.array_equal(row_percentile_of_sign(w, 99.0, positive=True).numpy(), pos_ref)
    # the rank is an integer: the threshold is the second-smallest negative itself, so one weight per row is flagged
    assert np.array_equal(neg_ref, np.sort(w64, 1)[:, 1])
    exact, off = _numpy_vote(w, 100 - 99), _numpy_vote(w, (1 - 0.99) * 100)
    assert sum(off.values()) == sum(exact.values()) + w.shape[0]  # the inexact level bites on every row
    k = 10
    assert outlier_columns(w, k).tolist() == [c for c, _ in exact.most_common(k)]
    assert outlier_columns(w, k).tolist() != [c for c, _ in off.most_common(k)]


def test_dual_uniform_quantizer_uses_two_grids():
    w = torch.randn(40, 16, generator=torch.Generator().manual_seed(3)) * 0.1
    w[:, 3] *= 20  # an inflated column (what reparameterization produces)
    q = DualUniformQuantizer(4, 40, 16)
    q.fit(w, WEIGHT_GRID, k=40 // 20)
    assert q.outlier[3] and int(q.outlier.sum()) == 2
    assert q.scale1.mean() > 5 * q.scale2.mean()
    plain = UniformQuantizer(4, granularity=PerChannel(0), round_zero_point=False, role="weight")
    s, z = search_uniform_percentile(w, 4, WEIGHT_GRID)
    plain.set_qparams(s[:, None], z[:, None])
    normal = ~q.outlier
    err_dual = (q.fake_quant(w) - w)[:, normal].pow(2).sum()
    err_plain = (plain.fake_quant(w) - w)[:, normal].pow(2).sum()
    assert err_dual < err_plain


# --------------------------------------------------------------------------- reparameterization

def _method_cfg(sites):
    return OmegaConf.create({"reparam": {"enabled": True, "sites": sites, "round_mean_zero_point": False},
                             "patch_embed_a_bit": None})


def _bits():
    return OmegaConf.create({"w_bit": 4, "a_bit": 4, "patch_embed_a_bit": 32, "head_a_bit": 4, "head_w_bit": 4})


def _tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "vit":
        model = timm.create_model("deit_tiny_patch16_224", depth=2, img_size=64)
        size = 64
    else:
        model = timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1), embed_dim=32,
                                  num_heads=(1, 2, 2, 4), img_size=64, window_size=4)
        size = 64
    with torch.no_grad():  # non-trivial LayerNorm affines and channel-wise activation ranges
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.5 * torch.randn_like(m.weight) * torch.rand_like(m.weight) * 4)
                m.bias.copy_(0.5 * torch.randn_like(m.bias))
    model.eval()
    model.input_size = size
    return model


@pytest.mark.parametrize("family,sites", [("vit", ["norm1", "norm2"]), ("swin", ["norm1", "norm2"]),
                                          ("swin", ["norm1", "norm2", "downsample"])])
def test_reparam_keeps_fp_logits(family, sites):
    model = _tiny(family)
    images = torch.randn(4, 3, model.input_size, model.input_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(images)
    cfg = _method_cfg(sites)
    wrap_model(model, build_scheme(_bits(), cfg))
    with torch.no_grad(), quant_state(model, weight=False, act=True), lazy_init(model, ACT_GRID, WEIGHT_GRID):
        model(images)
    pairs = reparam_pairs(model, sites)
    expected = {"vit": 2 * 2, "swin": 2 * 4 + (3 if "downsample" in sites else 0)}[family]
    assert len(pairs) == expected
    before = [lin.input_quantizer.scale.numel() for _, _, lin in pairs]
    assert all(n > 1 for n in before), "qkv/fc1 inputs are per channel before reparameterization"
    names = apply_reparam(pairs)
    assert len(names) == expected
    for _, _, lin in pairs:
        assert lin.input_quantizer.scale.numel() == 1 and isinstance(lin.input_quantizer.granularity, PerTensor)
        assert not bool(lin.weight_quantizer.calibrated)
    with torch.no_grad(), quant_state(model, weight=False, act=False):
        out = model(images)
    assert (out - ref).abs().max() < 1e-4


def test_lazy_init_fits_every_quantizer_once():
    model = _tiny("vit")
    cfg = _method_cfg(["norm1", "norm2"])
    wrap_model(model, build_scheme(_bits(), cfg))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), quant_state(model, weight=True, act=True), lazy_init(model, ACT_GRID, WEIGHT_GRID):
        model(images)
        snapshot = {n: q.scale.detach().clone() for n, q in quantizers_of(model) if hasattr(q, "scale")}
        model(images * 3)  # a second forward must not refit
    for n, q in quantizers_of(model):
        if isinstance(q, (UniformQuantizer, LogQuantizer)):
            assert bool(q.calibrated), n
            assert torch.equal(q.scale, snapshot[n]), n
    assert all(isinstance(m.matmul2.a_quantizer, LogQuantizer) for m in model.modules() if hasattr(m, "matmul2"))
    assert isinstance(model.blocks[0].attn.qkv, QuantLinear)
