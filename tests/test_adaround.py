"""AdaRound quantizer: initialisation, hard rounding, regulariser, β schedule, finalisation (spec §4.5)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from common.recon.adaround import AdaRoundQuantizer, attach_adaround, beta_schedule, finalize_adaround
from common.quant import PerChannel, QuantConv2d, QuantLinear, UniformQuantizer
from common.quant.modules import IdentityQuantizer
from common.quant.primitives import qparams_from_range


def _calibrated(weight: torch.Tensor, bits: int = 3, shape: tuple[int, ...] | None = None) -> UniformQuantizer:
    """Per-row min/max asymmetric weight quantizer (rounded zero-point), scale reshaped to `shape`."""
    rows = weight.reshape(weight.shape[0], -1)
    s, z = qparams_from_range(rows.amin(1).clamp(max=0), rows.amax(1).clamp(min=0), bits)
    shape = shape or (weight.shape[0],) + (1,) * (weight.dim() - 1)
    q = UniformQuantizer(bits, granularity=PerChannel(0), role="weight")
    q.set_qparams(s.reshape(shape), z.reshape(shape))
    return q


@pytest.fixture
def linear() -> QuantLinear:
    torch.manual_seed(0)
    lin = nn.Linear(24, 12)
    return QuantLinear.from_float(lin, IdentityQuantizer("act"), _calibrated(lin.weight.detach()))


def test_h_of_initial_alpha_is_the_fractional_part(linear):
    ada = AdaRoundQuantizer(linear.weight_quantizer, linear.weight)
    w_div = linear.weight.detach() / linear.weight_quantizer.scale.detach()
    frac = w_div - torch.floor(w_div)
    torch.testing.assert_close(ada.h().detach(), frac, atol=2e-6, rtol=0)
    torch.testing.assert_close(ada.w_floor, torch.floor(w_div), atol=0, rtol=0)


def test_initial_hard_rounding_is_round_to_nearest(linear):
    base = linear.weight_quantizer
    ada = AdaRoundQuantizer(base, linear.weight)
    w_div = linear.weight.detach() / base.scale.detach()
    away_from_ties = ((w_div - torch.floor(w_div)) - 0.5).abs() > 1e-4
    assert away_from_ties.float().mean() > 0.99
    hard_int = ada.w_floor + ada.hard_rounding()
    assert torch.equal(hard_int[away_from_ties], torch.round(w_div)[away_from_ties])
    rtn = base.fake_quant(linear.weight.detach())
    assert torch.equal(ada.hard_weight()[away_from_ties], rtn[away_from_ties])
    ada.soft = False
    assert torch.equal(ada(linear.weight)[away_from_ties], rtn[away_from_ties])


def test_soft_forward_at_init_reproduces_unclamped_weights(linear):
    ada = AdaRoundQuantizer(linear.weight_quantizer, linear.weight)
    w = linear.weight.detach()
    q = torch.floor(w / ada.scale) + ada.zero_point
    inside = (q >= 0) & (q <= 2 ** ada.bits - 2)  # no clamp even after adding h(α₀) < 1
    torch.testing.assert_close(ada(w).detach()[inside], w[inside], atol=1e-6, rtol=1e-5)


def test_round_loss_matches_closed_form(linear):
    ada = AdaRoundQuantizer(linear.weight_quantizer, linear.weight)
    torch.manual_seed(1)
    with torch.no_grad():
        ada.alpha.copy_(torch.randn_like(ada.alpha) * 3)
    zeta, gamma = 1.1, -0.1
    for beta in (20.0, 11.0, 2.0):
        expected = 0.0
        for a in ada.alpha.detach().double().flatten().tolist():
            h = min(max(1 / (1 + math.exp(-a)) * (zeta - gamma) + gamma, 0.0), 1.0)
            expected += 1 - abs(2 * h - 1) ** beta
        assert ada.round_loss(beta).item() == pytest.approx(expected, rel=1e-5)
    # Saturated α give no regularisation, α with h = 0.5 the maximal 1 per weight.
    with torch.no_grad():
        ada.alpha.fill_(50.0)
    assert ada.round_loss(20.0).item() == 0.0
    with torch.no_grad():
        ada.alpha.fill_(0.0)
    assert ada.round_loss(2.0).item() == pytest.approx(ada.alpha.numel())


@pytest.mark.parametrize("step,expected", [(0, 20.0), (1, 20.0), (3999, 20.0), (4000, 20.0), (12000, 11.0),
                                           (19999, 2.0 + 18.0 / 16000), (20000, 2.0)])
def test_beta_schedule_reference_values(step, expected):
    # Spec §4.5: β(t) = 20 if t < 4000 else 2 + 18·max(0, 1 − (t − 4000)/16000).
    closed = 20.0 if step < 4000 else 2 + 18 * max(0.0, 1 - (step - 4000) / 16000)
    assert beta_schedule(step, 20000) == pytest.approx(closed, abs=1e-12)
    assert beta_schedule(step, 20000) == pytest.approx(expected, abs=1e-12)


def test_beta_schedule_scales_with_iterations():
    assert beta_schedule(39, 200) == 20.0
    assert beta_schedule(40, 200) == 20.0
    assert beta_schedule(120, 200) == pytest.approx(11.0)
    assert beta_schedule(200, 200) == pytest.approx(2.0)


def _trained_like(ada: AdaRoundQuantizer, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ada.alpha.add_(torch.randn(ada.alpha.shape, generator=g) * 2)


def test_finalize_reproduces_hard_adaround_linear(linear):
    x = torch.randn(5, 7, 24)
    (ada,) = attach_adaround(linear)
    assert linear.weight_quantizer is ada and ada.soft
    _trained_like(ada)
    ada.soft = False
    expected = linear(x).detach()
    hard_w = ada.hard_weight()
    assert finalize_adaround(linear) == 1
    assert isinstance(linear.weight_quantizer, UniformQuantizer)
    assert torch.equal(linear.weight.detach(), hard_w)
    assert torch.equal(linear(x).detach(), expected)
    assert tuple(linear.weight_quantizer.scale.shape) == (12, 1)


def test_finalize_conv_with_frozen_cache():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 4, stride=4)
    w = conv.weight.detach()
    qc = QuantConv2d.from_float(conv, IdentityQuantizer("act"), _calibrated(w, bits=2))
    qc.freeze_weight()
    x = torch.randn(2, 3, 16, 16)
    (ada,) = attach_adaround(qc)
    assert qc.cached_weight is None  # training must see the AdaRound weight
    assert ada.scale.shape == (16, 1, 1, 1)
    _trained_like(ada)
    ada.soft = False
    expected = qc(x).detach()
    finalize_adaround(qc)
    assert qc.cached_weight is not None  # the frozen cache is restored
    assert torch.equal(qc(x).detach(), expected)
    assert tuple(qc.weight_quantizer.scale.shape) == (16, 1, 1, 1)


def test_attach_skips_fp_and_uncalibrated_quantizers():
    lin = nn.Linear(4, 3)
    fp = QuantLinear.from_float(lin, IdentityQuantizer("act"), IdentityQuantizer("weight"))
    uncal = QuantLinear.from_float(nn.Linear(4, 3), IdentityQuantizer("act"),
                                   UniformQuantizer(4, granularity=PerChannel(0), role="weight"))
    assert attach_adaround(nn.Sequential(fp, uncal)) == []
    with pytest.raises(ValueError, match="calibrated"):
        AdaRoundQuantizer(uncal.weight_quantizer, uncal.weight)


def test_alpha_gets_gradients_and_weights_do_not(linear):
    (ada,) = attach_adaround(linear)
    linear.weight.requires_grad_(False)
    out = linear(torch.randn(3, 24)).square().sum() + ada.round_loss(10.0)
    out.backward()
    assert ada.alpha.grad is not None and ada.alpha.grad.abs().sum() > 0
    assert linear.weight.grad is None
