"""Average Perturbation Hessian: the ±ε estimate against an independent float64 H·𝟙 (spec §4.3).

The reference estimate |g(O+ε𝟙) − g(O−ε𝟙)| ≈ 2ε|H𝟙| (H: Hessian of the batchmean temperature KL w.r.t.
the unit output O). Checked against H·𝟙 from double backward in float64, written independently here.

Note (a property of the models, not of the code): with LayerNorm, adding the same constant to every
channel of a token of the residual stream leaves the network output unchanged, so H𝟙 ≡ 0 for every
APHQ site of a ViT/DeiT/Swin; the reference's fp32 estimate is then fp32 rounding residue. The
comparison is therefore made on the same tiny ViT with RMSNorm (no shift invariance), and a separate
test pins the LayerNorm identity.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import RmsNorm
from torch import nn

from aphq.aph import average_perturbation_hessian, brecq_fisher, kl_batchmean
from common.models.units import model_units, run_units

TEMP = 20.0
BS = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _tiny_vit(norm_layer=RmsNorm, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                          num_classes=5, norm_layer=norm_layer).eval()
    with torch.no_grad():
        m.head.weight.normal_(0, 1.0)  # confident logits, like a trained model
    return m


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _reference_h1(model: nn.Module, x: torch.Tensor, site: str) -> torch.Tensor:
    """Per-sample H·𝟙 by double backward, explicit KL Σ p (log p − log q) / B per batch of BS."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False  # SDPA has no double backward on CPU
    units = model_units(model)
    i = [u.name for u in units].index(site)
    out = []
    for xb in x.split(BS):
        with torch.no_grad():
            o = run_units(units, xb, 0, i + 1)
            p = torch.softmax(run_units(units, o, i + 1) / TEMP, -1)
        o = o.clone().requires_grad_(True)
        log_q = torch.log_softmax(run_units(units, o, i + 1) / TEMP, -1)
        loss = (p * (torch.log(p) - log_q)).sum() / xb.shape[0]
        (g,) = torch.autograd.grad(loss, o, create_graph=True)
        (h1,) = torch.autograd.grad(g, o, grad_outputs=torch.ones_like(g))
        out.append(h1.detach())
    return torch.cat(out)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def rms64():
    return _tiny_vit().double()


@pytest.mark.parametrize("site", ["patch_embed", "blocks.0", "blocks.1"])
def test_float64_perturbation_matches_double_backward(rms64, images, site):
    ref = _reference_h1(copy.deepcopy(rms64), images.double(), site).abs()
    assert ref.norm() > 0
    eps = 1e-5
    g = average_perturbation_hessian(rms64, images.double(), [site], eps=eps, temp=TEMP, batch_size=BS, mean=False,
                                     progress=False)[site]
    assert g.shape == ref.shape and g.dtype == torch.float64
    assert _rel(g / (2 * eps), ref) < 1e-5
    mean = average_perturbation_hessian(rms64, images.double(), [site], eps=eps, temp=TEMP, batch_size=BS,
                                        progress=False)[site]
    assert mean.shape == (1,) + tuple(ref.shape[1:])
    assert _rel(mean / (2 * eps), ref.mean(0, keepdim=True)) < 1e-5
    hvp = average_perturbation_hessian(rms64, images.double(), [site], eps=eps, temp=TEMP, batch_size=BS, mean=False,
                                       mode="hvp", progress=False)[site]
    assert _rel(hvp / (2 * eps), ref) < 1e-10


@pytest.mark.parametrize("site", ["blocks.0", "blocks.1"])
def test_fp32_faithful_estimate_is_close_in_relative_norm(rms64, images, site):
    """The reference setting (fp32, ε = 1e-6, stacked ±ε batch) is within a few % of the exact H𝟙."""
    ref = _reference_h1(copy.deepcopy(rms64), images.double(), site).abs()
    fp32 = _tiny_vit()
    eps = 1e-6
    g = average_perturbation_hessian(fp32, images, [site], eps=eps, temp=TEMP, batch_size=BS, mean=False,
                                     progress=False)[site]
    assert g.dtype == torch.float32
    assert _rel(g / (2 * eps), ref) < 0.05
    unstacked = average_perturbation_hessian(fp32, images, [site], eps=eps, temp=TEMP, batch_size=BS, mean=False,
                                             stack_signs=False, progress=False)[site]
    assert _rel(unstacked / (2 * eps), ref) < 0.05


def test_layernorm_models_have_zero_h1_but_fp32_estimate_is_rounding_residue(images):
    ln = _tiny_vit(nn.LayerNorm).double()
    h1 = _reference_h1(copy.deepcopy(ln), images.double(), "blocks.0")
    rms_scale = _reference_h1(_tiny_vit().double(), images.double(), "blocks.0").norm()
    assert h1.norm() < 1e-9 * rms_scale  # shift invariance of LayerNorm: H𝟙 = 0 exactly
    g32 = average_perturbation_hessian(_tiny_vit(nn.LayerNorm), images, ["blocks.0"], batch_size=BS,
                                       progress=False)["blocks.0"]
    assert g32.abs().sum() > 0  # ... while fp32 (O ± ε) is not an exact shift: the reference's APH


def test_submodule_site_and_head_and_errors(rms64, images):
    x = images.double()
    res = average_perturbation_hessian(rms64, x, ["blocks.1", "blocks.1.mlp", "head"], batch_size=BS, mode="hvp",
                                       progress=False)
    assert "head" not in res  # no APH for the head (the reference's is ~0 and unused)
    # The last block's output is its residual stream plus the MLP output: identical curvature.
    assert _rel(res["blocks.1.mlp"], res["blocks.1"]) < 1e-10
    with pytest.raises(ValueError, match="neither a unit"):
        average_perturbation_hessian(rms64, x, ["blocks.7"], progress=False)
    with pytest.raises(ValueError, match="mode"):
        average_perturbation_hessian(rms64, x, ["blocks.0"], mode="diag", progress=False)


def test_parameters_and_flags_are_restored(images):
    m = _tiny_vit()
    m.train()
    average_perturbation_hessian(m, images[:8], ["blocks.0"], batch_size=BS, progress=False)
    assert m.training and all(p.requires_grad for p in m.parameters())
    assert all(p.grad is None for p in m.parameters())


def test_brecq_fisher_is_squared_gradient_per_sample(rms64, images):
    x = images.double()
    model = copy.deepcopy(rms64)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    units = model_units(model)
    with torch.no_grad():
        q_in = units[1].pre(units[0].module(x))  # input of blocks.0 (nothing quantized: FP prefix)
        logits = model(x)
        noisy_logits = logits + 0.3 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1),
                                                  dtype=logits.dtype)
    g2 = brecq_fisher(units, 1, q_in, noisy_logits, temp=TEMP, batch_size=BS)
    expected = []
    for xb, lb in zip(q_in.split(BS), noisy_logits.split(BS)):
        o = units[1].module(xb).detach().requires_grad_(True)
        loss = kl_batchmean(run_units(units, o, 2), torch.softmax(lb / TEMP, -1), TEMP)
        expected.append(torch.autograd.grad(loss, o)[0] ** 2)
    torch.testing.assert_close(g2, torch.cat(expected))
    assert g2.shape[0] == x.shape[0]
