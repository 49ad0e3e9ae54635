"""Fake-quant primitives and quantizer modules against brute-force float64 enumeration of the grid."""
from __future__ import annotations

import math

import pytest
import torch

from common.quant import (LogQuantizer, PerChannel, PerHead, PerTensor, PerToken, UniformQuantizer,
                          fake_quant_affine, fake_quant_log2, fake_quant_log_sqrt2, fake_quant_symmetric,
                          qparams_from_range, quant_state, round_ste)
from common.quant.granularity import PerAxis


def brute_affine(x: torch.Tensor, s: float, z: float, bits: int) -> torch.Tensor:
    """Nearest grid point (q - z)·s over every integer level q in [0, 2^b-1], in float64."""
    levels = (torch.arange(2 ** bits, dtype=torch.float64) - z) * s
    idx = (x.double()[..., None] - levels).abs().argmin(-1)
    return levels[idx]


def brute_symmetric(x: torch.Tensor, s: float, bits: int) -> torch.Tensor:
    levels = torch.arange(-2 ** (bits - 1), 2 ** (bits - 1), dtype=torch.float64) * s
    return levels[(x.double()[..., None] - levels).abs().argmin(-1)]


def brute_log(x: torch.Tensor, s: float, bits: int, per_octave: int) -> torch.Tensor:
    """Nearest level in the log domain; levels past the last one underflow to 0 (x=0 -> 0)."""
    out = torch.zeros_like(x, dtype=torch.float64)
    for i, v in enumerate(x.double().tolist()):
        if v <= 0:
            continue
        t = -per_octave * math.log2(v / s)
        q = min(range(-64, 2 ** bits + 64), key=lambda k: abs(t - k))  # nearest integer level
        if q >= 2 ** bits:
            continue
        out[i] = s * 2.0 ** (-max(q, 0) / per_octave)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_affine_matches_brute_force(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(4000, generator=g) * 3
    s, z = 0.37, float(2 ** (bits - 1) - 1)
    got = fake_quant_affine(x, torch.tensor(s), torch.tensor(z), bits).double()
    assert torch.allclose(got, brute_affine(x, s, z, bits), atol=1e-6)


def test_affine_fractional_zero_point_matches_float64_rederivation():
    """With a fractional z (RepQ/ERQ after reparameterization) in-range values sit on k·s and the
    clamp ends on (0 - z)·s and (2^b - 1 - z)·s: re-derived here by enumerating integers k."""
    x = torch.rand(3000, generator=torch.Generator().manual_seed(5)) * 5 - 2  # no exact .5 ties
    s, z, bits = 0.3, 5.4, 4
    got = fake_quant_affine(x, torch.tensor(s), torch.tensor(z), bits, round_zero_point=False).double()
    ks = torch.arange(-100, 101, dtype=torch.float64)
    k = ks[(x.double()[:, None] / s - ks).abs().argmin(1)]
    want = ((k + z).clamp(0, 2 ** bits - 1) - z) * s
    assert torch.allclose(got, want, atol=1e-6)
    assert got.min() == pytest.approx(-z * s) and got.max() == pytest.approx((2 ** bits - 1 - z) * s)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric_matches_brute_force(bits):
    x = torch.randn(3000, generator=torch.Generator().manual_seed(1)) * 2
    got = fake_quant_symmetric(x, torch.tensor(0.21), bits).double()
    assert torch.allclose(got, brute_symmetric(x, 0.21, bits), atol=1e-6)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("base", ["2", "sqrt2"])
def test_log_quantizers_match_brute_force(bits, base):
    x = torch.cat([torch.rand(400, generator=torch.Generator().manual_seed(2)) ** 3, torch.tensor([0.0, 1.0, 1.7])])
    s = 0.9
    fn = fake_quant_log2 if base == "2" else fake_quant_log_sqrt2
    got = fn(x, torch.tensor(s), bits).double()
    want = brute_log(x, s, bits, 1 if base == "2" else 2)
    assert torch.allclose(got, want, atol=1e-6)


def test_qparams_from_range_maps_endpoints_to_grid_ends():
    lo, hi = torch.tensor([-1.3]), torch.tensor([2.1])
    for bits in (2, 4, 8):
        s, z = qparams_from_range(lo, hi, bits, round_zero_point=False)
        assert torch.allclose(lo / s + z, torch.zeros(1), atol=1e-5)
        assert torch.allclose(hi / s + z, torch.full((1,), 2.0 ** bits - 1), atol=1e-4)


def test_round_ste_forward_rounds_backward_is_identity():
    x = torch.tensor([0.2, 1.7, -2.4], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


@pytest.mark.parametrize("gran,shape", [(PerTensor(), (1, 1, 1)), (PerChannel(-1), (1, 1, 6)),
                                        (PerToken(), (1, 5, 1)), (PerAxis((1, 2)), (1, 5, 6))])
def test_granularity_param_shapes(gran, shape):
    assert gran.param_shape((3, 5, 6)) == shape


def test_per_head_quantizer_equals_per_slice_brute_force():
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(3))
    s = torch.tensor([0.1, 0.2, 0.3]).reshape(1, 3, 1, 1)
    z = torch.tensor([7.0, 8.0, 6.0]).reshape(1, 3, 1, 1)
    q = UniformQuantizer(4, granularity=PerHead())
    q.set_qparams(s, z)
    got = q(x).double()
    for h in range(3):
        want = brute_affine(x[:, h], float(s.flatten()[h]), float(z.flatten()[h]), 4)
        assert torch.allclose(got[:, h], want, atol=1e-6)


def test_quantizer_identity_when_disabled_uncalibrated_or_32_bit():
    x = torch.randn(10)
    q = UniformQuantizer(4)
    assert torch.equal(q(x), x)  # not calibrated yet
    q.set_qparams(torch.tensor([0.1]), torch.tensor([8.0]))
    assert not torch.equal(q(x), x)
    with quant_state(q, act=False):
        assert torch.equal(q(x), x)
    assert q.enabled  # restored
    q32 = UniformQuantizer(32)
    q32.set_qparams(torch.tensor([0.1]), torch.tensor([0.0]))
    assert torch.equal(q32(x), x)


def test_qdrop_probability_extremes_and_ste_scale_gradient():
    x = torch.randn(1000)
    q = UniformQuantizer(3)
    q.set_qparams(torch.tensor([0.3]), torch.tensor([4.0]))
    q.train()
    q.drop_prob = 0.0
    assert torch.equal(q(x), x)  # every element keeps its FP value
    q.drop_prob = 1.0
    q.ste = True
    q(x).sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0


def test_state_dict_round_trip_with_new_scale_shape():
    q = UniformQuantizer(4, granularity=PerToken())
    q.set_qparams(torch.rand(1, 7, 1) + 0.1, torch.full((1, 7, 1), 3.0))
    fresh = UniformQuantizer(4, granularity=PerToken())
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(2, 7, 4)
    assert torch.equal(fresh(x), q(x))


def test_log_quantizer_module_and_bad_arguments():
    q = LogQuantizer(4, base="sqrt2")
    q.set_qparams(torch.tensor([1.0]))
    x = torch.rand(50)
    assert torch.equal(q(x), fake_quant_log_sqrt2(x, torch.tensor([1.0]), 4))
    with pytest.raises(ValueError):
        LogQuantizer(4, base="e")
    with pytest.raises(ValueError, match="bit-width"):
        UniformQuantizer(33)
