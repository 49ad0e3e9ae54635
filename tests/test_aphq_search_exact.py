"""The integer-code calibration search (`common.calib.intsearch`) makes the float32 search's choices.

* Per site kind, on random data: the chosen candidate indices of `IntDirectSearch` + `exact_argmin`
  equal those of a straightforward implementation of the float32 search kept here (`reference_errors`:
  fake-quantize, multiply, sum the float32 squared residuals in float64, first index among equal minima)
  — attention·V (matmul2 attn and v searches), q·kᵀ (matmul1 q and k, shapes the calibration runs in Gram
  form), linear inputs (proj / fc2), linear weights (one group per row) and the patch-embed conv weight
  (as a linear of its patches); at 2, 3, 4 and 8 bits; with candidate zero-points that force the
  shifted-code path; with exact ties (first index).
* The exact errors agree with the float32 ones to ≪ the shortlist window, and their own argmin equals
  the float32 one on this data (the re-scoring only matters on near-ties).
* Whole calibrations with `int_search` on and off (the float32 search of today) give bit-identical
  state dicts: a tiny ViT at 2/3/4/8 bits and the trained demo model on real digits at W4A4 / W3A3.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch

from common.calib.calibrate import CalibConfig, calibrate_model
from common.calib.grids import activation_grid, matmul_bounds, pair_qparams, weight_grid
from common.calib.intsearch import IntDirectSearch, exact_argmin
from common.calib.search import LeftOperandSearch
from common.quant.primitives import fake_quant_affine
from common.quant.scheme import QuantScheme
from common.quant.wrap import wrap_model

from conftest import DEMO_WEIGHTS


@pytest.fixture(autouse=True)
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def reference_errors(left, right_q, target, scale, zp, bits):
    """The float32 search's objective, written out: per candidate and group, Σ over samples and rows of
    the float32 row sums of squared float32 residuals of fake_quant(L) @ R − Y, accumulated in float64.

    left (S, G, n, k), right_q (S|1, G|1, k, m) already quantized, target (S, G, n, m), scale / zp (C, G).
    """
    out = []
    for c in range(scale.shape[0]):
        q = fake_quant_affine(left, scale[c].view(1, -1, 1, 1), zp[c].view(1, -1, 1, 1), bits)
        o = q @ right_q - target
        out.append(torch.linalg.vecdot(o, o).sum((0, 2), dtype=torch.float64))
    return torch.stack(out)


def first_argmin(err):
    err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    return (err == err.min(0, keepdim=True).values).to(torch.int8).argmax(0)


def new_choice(left, right, s_r, z_r, bits_r, target, scale, zp, bits):
    """The new search: exact integer errors, shortlist re-scored by the float32 search."""
    right_q = fake_quant_affine(right, s_r, z_r, bits_r)
    fast = IntDirectSearch(left, right, s_r, z_r, target, bits, bits_r)
    exact = fast.errors(scale, zp, 0, left.shape[0])
    f32 = LeftOperandSearch(left, right_q, target, bits)
    choice, info = exact_argmin(exact, lambda idx: f32.errors(scale[idx], zp[idx], 0, left.shape[0]))
    return choice, exact, right_q, info


def _check(left, right, s_r, z_r, target, scale, zp, bits, bits_r=None):
    bits_r = bits if bits_r is None else bits_r
    choice, exact, right_q, info = new_choice(left, right, s_r, z_r, bits_r, target, scale, zp, bits)
    ref = reference_errors(left, right_q, target, scale, zp, bits)
    assert torch.equal(choice, first_argmin(ref))
    rel = ((exact - ref).abs() / ref).max().item()
    # the float32 rounding of EVERY candidate is far inside the shortlist window (what the choice relies on)
    assert rel < 1e-5 and rel * 4 <= info["window"], (rel, info)
    assert torch.equal(first_argmin(exact), first_argmin(ref))  # and does not even decide on this data
    # the chosen (scale, zero-point) pairs are the reference's
    g = torch.arange(scale.shape[1])
    assert torch.equal(scale[choice, g], scale[first_argmin(ref), g]) and torch.equal(zp[choice, g], zp[first_argmin(ref), g])
    return info


def _attention(S, G, n, d, seed, temp=8.0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(S, G, n, d, generator=gen) for _ in range(3))
    return q, k, v, (q @ k.transpose(-1, -2) / temp).softmax(-1)


def _head_candidates(x, bits, eq_n=128):
    u, lo = matmul_bounds(x, eq_n)
    return pair_qparams(u[:eq_n], lo[:eq_n], bits)  # joint candidates (C, G)


def _head_qparams(x, bits):
    u, lo = matmul_bounds(x)
    s, z = pair_qparams(u[127], lo[127], bits)
    return s.view(1, -1, 1, 1), z.view(1, -1, 1, 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matmul2_attn_and_v_searches(bits):
    _, _, v, attn = _attention(6, 3, 23, 8, bits)
    y = attn @ v
    s_v, z_v = _head_qparams(v, bits)
    s, z = _head_candidates(attn, bits)
    _check(attn, v, s_v, z_v, y, s, z, bits)  # attn (left) with v quantized
    s_a, z_a = _head_qparams(attn, bits)
    s, z = _head_candidates(v, bits)
    _check(v.transpose(-1, -2), attn.transpose(-1, -2), s_a, z_a, y.transpose(-1, -2), s, z, bits)  # v


def test_int_errors_identical_on_any_thread_count():
    """With 2 torch threads the (group, sample range) pieces run on a Python thread pool (each op
    single-threaded); the pieces and the order of their sums do not depend on the thread count, so the
    errors are bit-identical to one thread's, and equal the float64 evaluation of the codes' errors."""
    _, _, v, attn = _attention(9, 3, 23, 8, 7)
    y = attn @ v
    s_v, z_v = _head_qparams(v, 4)
    s, z = _head_candidates(attn, 4)
    search = IntDirectSearch(attn, v, s_v, z_v, y, 4, 4)
    one = search.errors(s, z, 0, 9)
    torch.set_num_threads(2)
    two = search.errors(s, z, 0, 9)
    torch.set_num_threads(1)
    assert torch.equal(one, two)
    assert torch.get_num_threads() == 1  # the pool restored the caller's thread count
    q = fake_quant_affine(attn.double(), s.double()[:, None, :, None, None], z.double()[:, None, :, None, None], 4)
    vq = fake_quant_affine(v.double(), s_v.double(), z_v.double(), 4)
    ref = ((q @ vq - y.double()) ** 2).sum((1, 3, 4))  # (C, G) in float64 (codes as the search forms them)
    assert torch.allclose(one, ref, rtol=1e-6, atol=0)


def test_float32_search_in_pieces_equals_the_batched_call(monkeypatch):
    """The float32 search on the thread pool (group x sample-range pieces) against its one batched call
    (`THREADED_GRAM=False`, the pre-pool code path) on q·kᵀ (Gram form), 2 threads: float64 sums of the
    same float32 terms in another order, and the same first argmin."""
    import common.calib.search as search_mod

    q, k, _, _ = _attention(9, 3, 19, 8, 21)
    kt = k.transpose(-1, -2)
    s_k, z_k = _head_qparams(kt, 4)
    right = fake_quant_affine(kt, s_k, z_k, 4)
    s, z = _head_candidates(q, 4)
    search = LeftOperandSearch(q, right, q @ kt, 4)
    assert search.gram
    torch.set_num_threads(2)
    pieces = search.errors(s, z, 0, 9)
    monkeypatch.setattr(search_mod, "THREADED_GRAM", False)
    batched = search.errors(s, z, 0, 9)
    torch.set_num_threads(1)
    assert torch.allclose(pieces, batched, rtol=1e-12, atol=0)
    assert torch.equal(first_argmin(pieces), first_argmin(batched))


@pytest.mark.parametrize("bits", [3, 4])
def test_matmul1_q_and_k_searches(bits):
    q, k, _, _ = _attention(5, 2, 19, 8, 10 + bits)
    y = q @ k.transpose(-1, -2)
    kt = k.transpose(-1, -2)
    s_k, z_k = _head_qparams(kt, bits)
    s, z = _head_candidates(q, bits)
    _check(q, kt, s_k, z_k, y, s, z, bits)
    s_q, z_q = _head_qparams(q, bits)
    s, z = _head_candidates(k, bits)
    _check(k, q.transpose(-1, -2), s_q, z_q, y.transpose(-1, -2), s, z, bits)


def _linear(S, T, k, m, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(S, T, k, generator=gen) * torch.rand(k, generator=gen)
    w = torch.randn(m, k, generator=gen) / k ** 0.5
    return x, w, x @ w.T


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k,m", [(24, 24), (48, 12)])  # proj-like and fc2-like inputs
def test_linear_input_search(bits, k, m):
    x, w, y = _linear(4, 9, k, m, bits + k)
    wg = weight_grid(w, bits)
    s_w, z_w = wg.select(torch.full((m,), 37))
    ag = activation_grid(x, bits)
    s, z = ag.params(torch.arange(len(ag)))
    _check(x[:, None], w.T[None, None], s_w.view(1, 1, 1, -1), z_w.view(1, 1, 1, -1), y[:, None], s, z, bits)


@pytest.mark.parametrize("bits", [3, 4])
def test_weight_search_one_group_per_row(bits):
    """Weights: each row is a group whose left operand is the row and whose right operand is X̂ᵀ."""
    x, w, y = _linear(1, 40, 16, 6, bits)
    ag = activation_grid(x, bits)
    s_x, z_x = ag.select(torch.tensor([50]))
    wg = weight_grid(w, bits)
    s, z = wg.params(torch.arange(len(wg)))  # (C, rows)
    xt = x[0].T[None, None]  # (1, 1, in, T)
    _check(w[None, :, None, :], xt, s_x.view(1, 1, 1, 1), z_x.view(1, 1, 1, 1), y[0].T[None, :, None, :], s, z, bits)


def test_conv_weight_as_linear_of_patches():
    conv = torch.nn.Conv2d(3, 5, 4, 4)
    img = torch.randn(2, 3, 12, 12)
    cols = torch.nn.functional.unfold(img, 4, stride=4).transpose(1, 2).reshape(-1, 48)  # (tokens, 48)
    w = conv.weight.detach().reshape(5, -1)
    y = cols @ w.T
    from common.calib.grids import conv_percentiles

    u, lo = conv_percentiles(w)
    s, z = pair_qparams(u, lo, 4)
    xt = cols.T[None, None]
    # the image input is FP: a right operand at 8 bits whose grid is fine enough stands in for it
    ag = activation_grid(cols, 8)
    s_x, z_x = ag.select(torch.tensor([127]))
    _check(w[None, :, None, :], xt, s_x.view(1, 1, 1, 1), z_x.view(1, 1, 1, 1), y.T[None, :, None, :], s, z, 4, 8)


def test_shifted_codes_and_offsets():
    """Zero-points far outside [0, 2^b − 1] (narrow positive ranges): the codes do not fit int8 signed,
    so the shifted codes with zero-point corrections are used; same choices."""
    _, _, v, attn = _attention(3, 2, 17, 8, 5, temp=200.0)  # near-uniform attention: l/s ≈ 100s
    y = attn @ v
    for bits in (4, 8):
        s_a, z_a = _head_qparams(attn, bits)
        assert float(z_a.abs().max()) > 127
        s, z = _head_candidates(v, bits)
        _check(v.transpose(-1, -2), attn.transpose(-1, -2), s_a, z_a, y.transpose(-1, -2), s, z, bits)
        s_v, z_v = _head_qparams(v, bits)
        s, z = _head_candidates(attn, bits)
        _check(attn, v, s_v, z_v, y, s, z, bits)


def test_ties_go_to_the_first_index():
    _, _, v, attn = _attention(4, 2, 11, 8, 3)
    y = attn @ v
    s_v, z_v = _head_qparams(v, 4)
    s, z = _head_candidates(attn, 4)
    ref = reference_errors(attn, fake_quant_affine(v, s_v, z_v, 4), y, s, z, 4)
    best = first_argmin(ref)
    # duplicate every group's best candidate at an earlier and a later index: equal errors, first wins
    order = torch.arange(s.shape[0])
    dup = torch.cat([order[:3], best[:1], order[3:], best[:1]])
    s2, z2 = s[dup], z[dup]
    choice, *_ = new_choice(attn, v, s_v, z_v, 4, y, s2, z2, 4)
    ref2 = reference_errors(attn, fake_quant_affine(v, s_v, z_v, 4), y, s2, z2, 4)
    assert torch.equal(choice, first_argmin(ref2))
    assert int(choice[0]) == int((dup == best[0]).nonzero()[0, 0])  # the earlier copy of group 0's best


def test_exact_argmin_widens_its_window_on_large_deviations():
    err = torch.tensor([[1.0], [1.0 + 1e-3], [2.0]], dtype=torch.float64)
    f32 = torch.tensor([[1.0 + 2e-3], [1.0 + 1e-3], [2.0]], dtype=torch.float64)  # a (fake) large deviation
    choice, info = exact_argmin(err, lambda idx: f32[idx])
    assert int(choice[0]) == 1 and info["window"] > 1e-3


# --------------------------------------------------------------------------- whole calibrations


def _scheme(bits):
    return QuantScheme(w_bit=bits, a_bit=bits, matmul_granularity="head", ln_act_granularity="channel",
                       ln_sites=("qkv", "fc1", "reduction"))


def _same_calibration(fp, x, bits):
    states, recs = [], []
    for flag in (False, True):
        m = wrap_model(copy.deepcopy(fp), _scheme(bits))
        recs.append(calibrate_model(m, x, CalibConfig(int_search=flag), bits, bits, progress=False))
        states.append(m.state_dict())
    assert states[0].keys() == states[1].keys()
    bad = [k for k in states[0] if not torch.equal(states[0][k], states[1][k])]
    assert not bad, bad
    int_searches = sum(r.get("int_searches", 0) for r in recs[1]["modules"].values())
    assert int_searches > 0  # the new path did run
    return recs[1]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_tiny_vit_calibration_identical(bits):
    torch.manual_seed(0)
    fp = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8,
                           embed_dim=32, num_heads=2).eval()
    with torch.no_grad():
        for name, p in fp.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    _same_calibration(fp, torch.randn(6, 3, 32, 32), bits)


@pytest.mark.parametrize("bits", [4, 3])
def test_demo_model_calibration_identical(bits):
    from safetensors.torch import load_file

    import common.models.demo  # noqa: F401  (registers vit_digits with timm)
    from common.data.digits import load_digits_tensors

    if not DEMO_WEIGHTS.is_file():
        pytest.fail(f"the demo weights {DEMO_WEIGHTS} are missing")
    fp = timm.create_model("vit_digits").eval()
    fp.load_state_dict(load_file(str(DEMO_WEIGHTS)))
    x, _ = load_digits_tensors()
    _same_calibration(fp, x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:32]], bits)
