"""AdaLog: the quantizer against brute-force float64 formulas, its integer form, FPCS, the candidate grids,
the post-GELU bias fold, the engine learning AdaLog scales, and `method=adalog(_retrain)` end to end.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from adalog.calibrate import (AdaLogCalibConfig, adalog_output_errors, calibrate_model, calibrate_post_gelu,
                              softmax_base_errors)
from adalog.fpcs import best_k, fpcs, refine_offsets
from common.calib.calibrate import load_quant_state
from adalog.grids import (channel_candidates, conv_candidates, head_candidates, input_candidates,
                          positive_percentiles, weight_candidates)
from common.quant import PerChannel, QuantLinear, UniformQuantizer, quant_state
from common.quant.adalog import (GELU_SHIFT, AdaLogQuantizer, adalog_codes, adalog_fixed_point, adalog_integer_form,
                                 adalog_levels, adalog_lut, fake_quant_adalog, fold_gelu_shift)
from common.quant.scheme import QuantScheme
from common.quant.wrap import wrap_model
from common.recon.block import _act_quantizers, learned_scales, reconstruct_model
from common.run.pipeline import run
from conftest import DEMO_WEIGHTS, compose_cfg, point_at, read_jsonl, run_py, run_py_many, tiny_vit

R = 37
BASES = (10, 23, 37, 50, 111, 137)
BITS = (3, 4, 6)


# --------------------------------------------------------------------------- brute force (pure Python float64)


def _brute(x: float, s: float, q: int, bits: int, exact: bool) -> float:
    """The spec's formulas element by element (adalog spec §2.2.1)."""
    xt = min(max(x / s, 1e-15), 1.0)
    i = round(-math.log2(xt) * R / q)  # Python rounds half to even, as torch.round
    if i >= 2 ** bits:
        return 0.0
    i = max(0, min(i, 2 ** bits - 1))
    if exact:
        return s * 2.0 ** (-i * q / R)
    den = 2 ** (bits + 1) - 2
    return s * 2.0 ** (-((i * q) // R)) * (round(2.0 ** (-((i * q) % R) / R) * den) / den)


def _inputs(n: int = 400, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=g, dtype=torch.float64) ** 6 * 1.5  # dense near 0, some above s
    x[:5] = 0.0
    x[5:10] = torch.tensor([1e-30, 1e-16, 1e-9, 2.0, 0.37], dtype=torch.float64)
    return x


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("exact", [False, True])
def test_fake_quant_matches_bruteforce_float64(bits, exact):
    x = _inputs(seed=bits)
    for q in BASES:
        for s in (1.0, 0.37):
            got = fake_quant_adalog(x, torch.tensor(s, dtype=torch.float64), q, bits, exact=exact)
            want = torch.tensor([_brute(float(v), s, q, bits, exact) for v in x], dtype=torch.float64)
            torch.testing.assert_close(got, want, rtol=1e-13, atol=0.0, msg=f"q={q} s={s}")


@pytest.mark.parametrize("bits", BITS)
def test_quantizer_module_forms_and_shift(bits):
    x = (_inputs(300, seed=7).float() - 0.12)  # post-GELU-like: down to −0.12 (> −c)
    q = AdaLogQuantizer(bits, shift=GELU_SHIFT)
    assert torch.equal(q(x), x)  # uncalibrated: identity
    q.set_qparams(0.9, 50)
    # table form (eval): AdaLog(x + c) − c, compared in float32 against the float64 brute force
    xs = (x + torch.tensor(GELU_SHIFT, dtype=torch.float32)).double()
    want_table = torch.tensor([_brute(float(v), 0.9, 50, bits, False) for v in xs], dtype=torch.float64) - GELU_SHIFT
    torch.testing.assert_close(q(x).double(), want_table, rtol=1e-6, atol=1e-6)
    # exact form in training (ste): the exact base
    q.ste = True
    want_exact = torch.tensor([_brute(float(v), 0.9, 50, bits, True) for v in xs], dtype=torch.float64) - GELU_SHIFT
    torch.testing.assert_close(q(x).double(), want_exact, rtol=1e-6, atol=1e-6)
    q.ste = False
    # folded: the −c moved into the consumer's bias; disabled after the fold: x + c (FP function kept)
    q.mark_folded()
    torch.testing.assert_close(q(x).double(), want_table + GELU_SHIFT, rtol=1e-6, atol=1e-6)
    with quant_state(q, act=False):
        torch.testing.assert_close(q(x), x + GELU_SHIFT)


def test_exact_zero_keeps_the_clamp_level():
    # B = 4, q = 137: a zero is x̃ = 1e-15 → u = 49.83·37/137 → code 13 < 16: a tiny non-zero level (spec §2.2.1)
    z = torch.zeros(1, dtype=torch.float64)
    y = fake_quant_adalog(z, 1.0, 137, 4)
    assert 0 < float(y) < 1e-13 and float(y) == pytest.approx(float(adalog_levels(137, 4, torch.float64)[13]))
    assert float(fake_quant_adalog(z, 1.0, 37, 4)) == 0.0  # base 2: 49.8 ≥ 16 → underflow zero
    # the post-softmax base search has no clamp: −log2(0) = ∞ is masked to 0
    codes, mask = adalog_codes(z, 1.0, 137, 4, clamp_min=None)
    assert not bool(mask[0])


@pytest.mark.parametrize("bits", BITS)
def test_table_form_equals_integer_shift_plus_lookup(bits):
    den = 2 ** (bits + 1) - 2
    lut = adalog_lut(bits)
    assert len(lut) == R and max(lut) == den and min(lut) >= den // 2 and all(v < 2 ** (bits + 1) for v in lut)
    codes = torch.arange(2 ** bits)
    for q in range(10, 138):
        table = adalog_levels(q, bits, torch.float64)
        mant, shift = adalog_integer_form(codes, q, bits)
        assert torch.equal(shift, (codes * q) // R)
        # the table value IS the looked-up mantissa shifted right by `shift` bits (T2 = LUT / den)
        assert torch.equal(table, torch.ldexp(mant.double() / den, -shift))
        max_shift = int(shift.max())
        if max_shift + bits + 1 < 63:  # fixed point with enough fractional bits: exact, no bit lost
            fixed = adalog_fixed_point(codes, q, bits, max_shift)
            assert torch.equal(fixed, mant << (max_shift - shift))
            torch.testing.assert_close(fixed.double() / (den * 2.0 ** max_shift), table, rtol=1e-15, atol=0)
    # the quantizer's output is s / den · LUT[j] · 2^(−shift) on the integer codes
    x = _inputs(500, seed=3).float()
    qz = AdaLogQuantizer(bits)
    qz.set_qparams(0.8, 61)
    i, m = adalog_codes(x, qz.scale.detach(), qz.q, bits)
    mant, shift = adalog_integer_form(i.long(), 61, bits)
    rebuilt = 0.8 / den * mant.double() * torch.pow(2.0, -shift.double()) * m
    torch.testing.assert_close(qz(x).double(), rebuilt, rtol=1e-6, atol=0)


def test_ste_gradient_of_the_scale_comes_from_saturated_elements():
    q = AdaLogQuantizer(4)
    q.set_qparams(1.0, 37)
    q.ste = True
    q.train()
    x = torch.tensor([0.01, 0.2, 0.5, 0.9, 1.5, 3.0], requires_grad=True)
    q(x).sum().backward()
    # in-range: s·2^(−u·q/r) with u = −log2(x/s)·r/q cancels (∂/∂s = 0 up to float residue); saturated: ∂/∂s = 1
    assert float(q.scale.grad) == pytest.approx(2.0, abs=1e-5)
    assert torch.all(x.grad[:4] > 0)  # straight-through to the input where not saturated


# --------------------------------------------------------------------------- FPCS


def test_best_k_is_stable_and_ignores_nan():
    err = torch.tensor([[3.0], [1.0], [float("nan")], [1.0], [0.5]])
    assert best_k(err, 3)[:, 0].tolist() == [4, 1, 3]


def _tree(scales0: torch.Tensor, delta: float, n_new: int, steps: int) -> torch.Tensor:
    """Every scale FPCS can reach at its last step (for one group), by explicit enumeration."""
    level, d = scales0.tolist(), torch.tensor([delta], dtype=torch.float32)
    for _ in range(steps - 1):
        off = refine_offsets(d, n_new)[:, 0]
        d = d / (n_new - 0.5)
        level = [float(torch.tensor(s, dtype=torch.float32) + o) for s in level for o in off]
    return torch.tensor(level)


@pytest.mark.parametrize("n_new,steps", [(3, 3), (4, 2), (8, 3)])
def test_fpcs_finds_the_bruteforce_optimum_of_its_candidate_tree(n_new, steps):
    """With a beam as wide as the tree, FPCS evaluates every reachable candidate and returns the brute-force
    optimum (a bumpy objective with several local minima)."""
    g = torch.Generator().manual_seed(n_new)
    s0 = torch.linspace(0.1, 1.0, 6)
    target = torch.rand(40, generator=g)

    def objective(s: torch.Tensor) -> torch.Tensor:  # quantization error of uniform data, scale s, zp 0
        q = torch.clamp(torch.round(target[None] / s[:, None]), 0, 7) * s[:, None]
        return (q - target[None]).square().sum(1).double()

    tree = _tree(s0, float(s0[1] - s0[0]), n_new, steps)
    res = fpcs(lambda s, z: objective(s[:, 0])[:, None], s0[:, None], torch.zeros(6, 1), width=tree.numel(),
               steps=steps, n_new=n_new)
    assert res.evaluated == 6 + sum(6 * n_new ** t for t in range(1, steps))
    assert float(res.error[0]) == pytest.approx(float(objective(tree).min()), rel=0, abs=0)
    assert float(res.scale[0]) == float(tree[objective(tree).argmin()])


def test_fpcs_groups_are_independent_and_steps_one_is_the_grid_argmin():
    s0 = torch.linspace(0.1, 1.0, 8)[:, None].repeat(1, 3)
    best = torch.tensor([0.33, 0.71, 0.12])
    score = lambda s, z: (s - best[None]).abs().double()  # noqa: E731
    res = fpcs(score, s0, torch.zeros_like(s0), width=2, steps=6, n_new=4)
    torch.testing.assert_close(res.scale, best, atol=0.02, rtol=0)  # converges per group to its own optimum
    one = fpcs(score, s0, torch.zeros_like(s0), steps=1)
    assert torch.equal(one.scale, s0[(s0 - best).abs().argmin(0), torch.arange(3)])


def test_joint_base_scale_search_matches_bruteforce_on_a_small_grid():
    """The post-GELU (q, s) objective: FPCS with a full-width beam picks the best pair of its candidate set."""
    torch.manual_seed(0)
    x = torch.nn.functional.gelu(torch.randn(64, 12))
    w = torch.randn(5, 12) * 0.3
    target = x @ w.T
    qs = torch.tensor([20, 37, 55])
    s = torch.linspace(0.8, 2.6, 4)
    s0, q0 = s.repeat(3)[:, None], qs.repeat_interleave(4)[:, None]

    def errors(sc, qq):
        return adalog_output_errors(x, w, target, sc.reshape(-1), qq.reshape(-1), 4, GELU_SHIFT).reshape(sc.shape)

    res = fpcs(errors, s0, q0, width=12 * 9, steps=3, n_new=3, delta=(s[1] - s[0]).reshape(1))
    tree_s = _tree(s, float(s[1] - s[0]), 3, 3)
    brute = min((float(errors(tree_s[:, None], torch.full((tree_s.numel(), 1), int(q)))[:, 0].min()), int(q))
                for q in qs)
    assert float(res.error[0]) == brute[0] and int(res.aux[0]) == brute[1]
    # the objective itself is the brute-force quantize-then-GEMM error
    one = adalog_output_errors(x, w, target, torch.tensor([1.1]), torch.tensor([55]), 4, GELU_SHIFT)
    xq = fake_quant_adalog(x + GELU_SHIFT, 1.1, 55, 4) - GELU_SHIFT
    assert float(one[0]) == pytest.approx(float((xq @ w.T - target).double().square().sum()), rel=1e-5)


def test_softmax_base_errors_match_bruteforce():
    torch.manual_seed(1)
    a = torch.softmax(torch.randn(2, 2, 5, 5) * 3, -1)
    a[0, 0, 0, 0] = 0.0
    b = torch.randn(2, 2, 5, 3)
    y = a @ b
    qs = torch.tensor([10, 37, 90])
    got = softmax_base_errors(a, b, y, qs, 3)
    for k, q in enumerate(qs.tolist()):
        i = torch.round(-torch.log2(a) * R / q)
        lv = torch.where(i >= 8, torch.zeros_like(a), adalog_levels(q, 3)[i.clamp(0, 7).long()])
        assert float(got[k]) == pytest.approx(float((lv @ b - y).double().square().sum()), rel=1e-5)


# --------------------------------------------------------------------------- candidate grids (spec §3.8)


def _zps(cand) -> list[int]:
    return sorted({int(v) for v in cand[1][:, 0]})


@pytest.mark.parametrize("bits,wz,iz", [(3, [2, 3, 4, 5], list(range(8))), (4, list(range(4, 12)), list(range(16))),
                                        (6, list(range(24, 40)), list(range(24, 40)))])
def test_candidate_grids(bits, wz, iz):
    torch.manual_seed(0)
    w, x = torch.randn(6, 20), torch.randn(4, 7, 10)
    for cand, zps in ((weight_candidates(w, bits), wz), (input_candidates(x, bits), iz),
                      (channel_candidates(x, bits), iz), (head_candidates(torch.randn(2, 3, 5, 4), bits), wz)):
        assert cand[0].shape[0] == 128 and _zps(cand) == zps
        n_s = 128 // len(zps)
        assert torch.equal(cand[1][:, 0], torch.tensor(zps, dtype=torch.float32).repeat_interleave(n_s))
        assert torch.equal(cand[0][:n_s], cand[0][n_s:2 * n_s])  # scale is the fast index
    conv = conv_candidates(torch.randn(8, 3, 2, 2), bits)
    assert _zps(conv) == list(range(2 ** (bits - 1) - 2 ** (bits - 2), 2 ** (bits - 1) + 2 ** (bits - 2)))
    # weight scales run from (q.9 − q.1) to (max − min) over 2^b − 1 levels
    q = torch.quantile(w[0], torch.tensor([0.9, 1.0, 0.1, 0.0]))
    s = weight_candidates(w, bits)[0][:, 0]
    assert float(s[0]) == pytest.approx(float(q[0] - q[2]) / (2 ** bits - 1), rel=1e-5)
    assert float(s.max()) == pytest.approx(float(q[1] - q[3]) / (2 ** bits - 1), rel=1e-5)


def test_positive_percentile_rank_rule():
    x = torch.tensor([-1.0, 0.0, 0.5, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0])  # 10 positives
    p = positive_percentiles(x)
    assert p.tolist() == pytest.approx([0.9, 1.0])  # rank ceil(10·0.9) − 1 = 8 → 0.9; max
    assert positive_percentiles(-torch.ones(3)).tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------- model: placement, fold, engine


def _scheme(bits: int = 4) -> QuantScheme:
    return QuantScheme(w_bit=bits, a_bit=bits, matmul_granularity="head", ln_act_granularity="channel",
                       ln_sites=("qkv", "fc1", "reduction"), softmax_quantizer="adalog", post_gelu_quantizer="adalog")


@pytest.fixture(scope="module")
def calibrated():
    """A tiny ViT wrapped with AdaLog's placement and calibrated (short FPCS), plus its FP copy and data."""
    torch.manual_seed(0)
    fp = tiny_vit()
    images = torch.randn(12, 3, 16, 16)
    model = wrap_model(tiny_vit(), _scheme())
    cfg = AdaLogCalibConfig(steps=3, search_rounds=2)
    rec = calibrate_model(model, images, cfg, 4, 4, progress=False)
    return fp, model, images, rec


def test_placement_and_calibration(calibrated):
    fp, model, images, rec = calibrated
    fc2 = model.blocks[0].mlp.fc2
    mm2 = model.blocks[0].attn.matmul2
    assert isinstance(fc2.input_quantizer, AdaLogQuantizer) and float(fc2.input_quantizer.shift) == GELU_SHIFT
    assert isinstance(mm2.a_quantizer, AdaLogQuantizer) and float(mm2.a_quantizer.shift) == 0.0
    assert float(mm2.a_quantizer.scale.detach()) == 1.0  # post-softmax: scale fixed at 1, one base per layer
    assert 10 <= int(mm2.a_quantizer.q) <= 137 and rec["reparam"]
    assert rec["modules"]["blocks.0.mlp.fc2"]["ud"][0] > GELU_SHIFT
    with torch.no_grad():
        y_fp, y_q = fp(images), model(images)
    assert torch.isfinite(y_q).all() and not torch.allclose(y_fp, y_q)
    with quant_state(model, weight=False, act=False), torch.no_grad():  # reparam kept the FP function
        torch.testing.assert_close(model(images), y_fp, rtol=1e-4, atol=1e-4)


def test_post_gelu_search_beats_the_initial_scale():
    """The joint search's pick has a lower output MSE than its starting point (grid[−2], q = 37)."""
    torch.manual_seed(0)
    lin = nn.Linear(24, 6)
    layer = QuantLinear.from_float(lin, AdaLogQuantizer(4, GELU_SHIFT),
                                   UniformQuantizer(4, granularity=PerChannel(0), role="weight"))
    x = torch.nn.functional.gelu(torch.randn(8, 5, 24) * 1.5)
    with torch.no_grad():
        y = lin(x)
    info = calibrate_post_gelu(layer, x, y, AdaLogCalibConfig(steps=4, search_rounds=1))
    lo, hi = info["ud"]
    init = torch.tensor([lo + (hi - lo) * 126 / 127])
    w_hat = layer.weight_quantizer.fake_quant(layer.weight).detach()
    tok, tgt = x.reshape(-1, 24), (y - lin.bias).detach().reshape(-1, 6)
    aq = layer.input_quantizer
    e_pick = adalog_output_errors(tok, w_hat, tgt, aq.scale.detach(), aq.q, 4, GELU_SHIFT)
    e_init = adalog_output_errors(tok, w_hat, tgt, init, torch.tensor([37]), 4, GELU_SHIFT)
    assert float(e_pick) < float(e_init)
    assert info["q"] == int(aq.q) and 10 <= info["q"] <= 137


def test_bias_fold_keeps_the_function(calibrated):
    _, model, images, _ = calibrated
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        before = m(images)
        assert fold_gelu_shift(m) == 2 and fold_gelu_shift(m) == 0  # once per fc2
        after = m(images)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    fc2 = m.blocks[0].mlp.fc2
    assert bool(fc2.input_quantizer.bias_folded)
    fresh = wrap_model(tiny_vit(), _scheme())  # a saved folded model loads folded
    load_quant_state(fresh, m.state_dict())
    assert fresh.blocks[0].mlp.fc2.input_quantizer.folded
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), after)
    w_hat = fc2.weight_quantizer(fc2.weight)
    torch.testing.assert_close(fc2.bias, model.blocks[0].mlp.fc2.bias - GELU_SHIFT * w_hat.sum(1))


def test_engine_collects_and_learns_adalog_scales(calibrated):
    import copy

    fp, model, images, _ = calibrated
    blk = model.blocks[0]
    qs = _act_quantizers(blk)
    scales = learned_scales(qs)
    for ada in (blk.mlp.fc2.input_quantizer, blk.attn.matmul2.a_quantizer):
        assert ada in qs and any(p is ada.scale for p in scales)  # every family, through the protocol
    # a gradient reaches the post-GELU AdaLog scale inside the unit's training forward
    ada = blk.mlp.fc2.input_quantizer
    for q in qs:
        q.ste = True
    x = torch.randn(4, 5, 16)
    blk(x).square().sum().backward()
    for q in qs:
        q.ste = False
    assert ada.scale.grad is not None and float(ada.scale.grad.abs()) > 0
    for p in blk.parameters():
        p.grad = None
    # the engine moves it when activation scales are learned, and leaves it when they are not
    for learn in (True, False):
        m = copy.deepcopy(model)
        s0 = [float(m.blocks[i].mlp.fc2.input_quantizer.scale.detach()) for i in range(2)]
        reconstruct_model(m, fp, images, dict(iters=20, batch_size=4, mode="rinp", drop_prob=1.0, metric="mse",
                                              init_loss_norm=False, loss_div=10.0, learn_act_scale=learn,
                                              eval_stats=False, compile=False, log_every=0), progress=False)
        s1 = [float(m.blocks[i].mlp.fc2.input_quantizer.scale.detach()) for i in range(2)]
        assert (s1 != s0) == learn
        assert not any(q.ste for q in _act_quantizers(m))  # back to the table form


def test_swin_calibrates_and_reconstructs():
    """Swin: windowed attention (masked softmax → AdaLog), the reduction reparam (creates its bias), all units."""
    import copy

    import timm

    torch.manual_seed(0)
    fp = timm.create_model("swin_tiny_patch4_window7_224", img_size=56, embed_dim=16, depths=(1, 2),
                           num_heads=(1, 2), num_classes=5).eval()
    images = torch.randn(8, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    model = wrap_model(copy.deepcopy(fp), _scheme(4))
    assert model.layers[1].downsample.reduction.bias is None
    rec = calibrate_model(model, images, AdaLogCalibConfig(steps=2, search_rounds=1), 4, 4, progress=False)
    assert rec["modules"]["layers.1.downsample.reduction"]["reparam"]
    assert model.layers[1].downsample.reduction.bias is not None
    assert isinstance(model.layers[1].blocks[1].attn.matmul2.a_quantizer, AdaLogQuantizer)
    res = reconstruct_model(model, fp, images, dict(iters=5, batch_size=4, mode="rinp", drop_prob=1.0, metric="mse",
                                                    init_loss_norm=False, loss_div=10.0, compile=False),
                            progress=False)
    assert "layers.1.downsample" in res["units"]
    assert fold_gelu_shift(model) == 3
    with torch.no_grad():
        assert torch.isfinite(model(images)).all()


# --------------------------------------------------------------------------- end to end on the demo


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_run_py_adalog_demo(tmp_path):
    if not DEMO_WEIGHTS.is_file():
        pytest.fail(f"the demo weights {DEMO_WEIGHTS} are missing")
    out = tmp_path / "run"
    r = run_py(["model=demo", "method=adalog", "bits=w4a4", "method.calib.steps=3", "method.calib.n_images=16",
                f"hydra.run.dir={out}", f"stages.shared_dir={tmp_path / 'cache'}"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "adalog" and res["n_calib"] == 16
    assert res["quant_top1"] > 80.0 and res["kl_to_fp"] < 0.5  # W4A4 on the 97.75% demo
    events = read_jsonl(out / "metrics.jsonl")
    assert any(e.get("event") == "adalog_bias_fold" and e["layers"] == 4 for e in events)


def test_adalog_retrain_demo_pipeline(tmp_path):
    cfg = point_at(compose_cfg(["model=demo", "method=adalog_retrain", "bits=w4a4", "num_threads=1",
                                "method.calib.steps=2", "method.calib.search_rounds=1", "method.calib.n_images=16",
                                "method.recon.iters=20", "method.recon.n_images=32", "method.recon.log_every=10"]),
                   tmp_path / "run", tmp_path / "cache")
    res = run(cfg)
    assert res["method"] == "adalog_retrain" and math.isfinite(res["kl_to_fp"])
    events = read_jsonl(Path(tmp_path / "run" / "metrics.jsonl"))
    names = {e.get("event") for e in events}
    assert {"adalog_calibrate_summary", "adalog_reconstruct_summary", "adalog_bias_fold"} <= names
    assert any(e.get("curve") == "recon/blocks.0" for e in events)
    summary = next(e for e in events if e.get("event") == "adalog_calibrate_summary")
    assert "calib_top1" in summary  # the "Calibrate" column


def test_configs_compose():
    m = compose_cfg(["method=adalog_retrain", "model=deit_s", "bits=w3a3"]).method
    assert m.calib.n_images == 32 and m.recon.enabled and m.recon.mode == "rinp" and m.recon.drop_prob == 1.0
    assert m.recon.loss_div == 10.0 and not m.recon.init_loss_norm and m.recon.iters == 20000
    e = compose_cfg(["experiment=adalog_w4a4", "model=deit_s"])
    assert e.seed == 5 and e.method.name == "adalog" and not e.method.recon.enabled


# The reference's Retrain recipe (utils/block_recon.py at 75a57d2), key by key; docs/adalog.md "Why adalog_retrain
# does not beat qdrop on the demo" explains why no demo preset changes it (a lambda rescale measured worse there).
RETRAIN_RECIPE = {"mode": "rinp", "drop_prob": 1.0, "metric": "mse", "loss_div": 10.0, "init_loss_norm": False,
                  "round_lambda": 0.01, "beta_start": 20.0, "beta_end": 2.0, "warmup": 0.2, "w_lr": 1e-3,
                  "a_lr": 4e-5, "batch_size": 32, "learn_act_scale": True}


@pytest.mark.parametrize("model,bits,iters,n_images", [("deit_s", "w4a4", 20000, 1024), ("swin_t", "w3a3", 20000, 1024),
                                                        ("demo", "w3a3", 2000, 197), ("demo", "w4a4", 2000, 197)])
def test_retrain_recipe_is_the_references_for_real_models_and_the_demo(model, bits, iters, n_images):
    r = compose_cfg(["method=adalog_retrain", f"model={model}", f"bits={bits}"]).method.recon
    assert {k: r[k] for k in RETRAIN_RECIPE} == RETRAIN_RECIPE
    assert (r.iters, r.n_images) == (iters, n_images)  # the demo preset changes the counts only


# KL(fp‖q) on the demo at the tuned presets (2000 steps per unit, 197 images), seeds 0 / 1 / 2 (docs/adalog.md):
#   W4A4  qdrop 0.0299 / 0.0328 / 0.0235   adalog_retrain 0.0479 / 0.0510 / 0.0579   ratio 0.62 / 0.64 / 0.41
#   W3A3  qdrop 0.1218 / 0.0867 / 0.0890   adalog_retrain 0.1048 / 0.1044 / 0.1628   (ordering not stable: not tested)
# At W4A4 every seed is separated (max qdrop 0.0328 < min adalog_retrain 0.0479); asserted with a 20 % margin.
# The reason is the Retrain recipe (FP block inputs, no QDrop), not the quantizer: docs/adalog.md, "Demo comparison".
@pytest.mark.slow  # 2 demo runs with the demo presets (~3-5 min each on one core)
def test_qdrop_beats_adalog_retrain_at_w4a4_on_demo(tmp_path):
    jobs = [[f"method={m}", "model=demo", "bits=w4a4", "seed=0", "logger=jsonl", f"hydra.run.dir={tmp_path / m}",
             f"stages.shared_dir={tmp_path / 'cache'}"] for m in ("qdrop", "adalog_retrain")]
    for proc in run_py_many(jobs, workers=2):
        assert proc.returncode == 0, proc.stderr[-3000:]
    kl = {m: json.loads((tmp_path / m / "results.json").read_text())["kl_to_fp"] for m in ("qdrop", "adalog_retrain")}
    assert kl["qdrop"] < 0.8 * kl["adalog_retrain"] and kl["adalog_retrain"] < 0.08, kl
