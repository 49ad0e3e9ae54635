"""MLP reconstruction (spec §3): ReLU swap, ub percentile, objective decrease, FP teacher untouched."""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from torch import nn

from aphq.mlp_recon import (MLPReconConfig, mlp_blocks, mlp_recon_config, positive_quantile, reconstruct_mlps,
                            relu_swap)
from common.run.tracking import Tracker


from conftest import tiny_vit  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_relu_swap_replaces_every_block_mlp_activation():
    m = relu_swap(tiny_vit())
    assert all(isinstance(b.mlp.act, nn.ReLU) for b in m.blocks)
    act = m.blocks[0].mlp.act
    relu_swap(m)
    assert m.blocks[0].mlp.act is act  # idempotent
    assert mlp_blocks(m) == ["blocks.0", "blocks.1"]


def test_relu_swap_swin():
    m = timm.create_model("swin_tiny_patch4_window7_224", img_size=56, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                          num_classes=5)
    relu_swap(m)
    assert mlp_blocks(m) == ["layers.0.blocks.0", "layers.1.blocks.0"]
    assert all(isinstance(m.get_submodule(f"{b}.mlp.act"), nn.ReLU) for b in mlp_blocks(m))


def test_positive_quantile_is_the_reference_rank():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(10007, generator=g)
    for pct in (0.5, 0.98, 0.99, 1.0):
        pos = torch.sort(v[v > 0]).values
        assert positive_quantile(v, pct) == pos[math.ceil(pos.numel() * pct) - 1].item()
    assert positive_quantile(-v.abs(), 0.99) == float("inf")


def test_config_from_mapping_warns_on_unknown_keys():
    cfg = mlp_recon_config({"iters": 5, "pct": 0.98, "enabled": True})
    assert cfg == MLPReconConfig(iters=5, pct=0.98)
    with pytest.warns(UserWarning, match="unknown"):
        mlp_recon_config({"iterz": 5})
    with pytest.raises(ValueError, match="mae"):
        MLPReconConfig(metric="mae")


@pytest.mark.parametrize("metric", ["hessian_perturb", "mse"])
def test_reconstruction_lowers_its_objective(images, metric, tmp_path):
    fp = tiny_vit()
    fp_state = copy.deepcopy(fp.state_dict())
    model = copy.deepcopy(fp)
    tracker = Tracker(tmp_path)
    cfg = {"iters": 120, "batch_size": 16, "lr": 1e-3, "pct": 0.98, "metric": metric, "log_every": 40,
           "eval_batch_size": 16, "aph_batch_size": 16}
    res = reconstruct_mlps(model, fp, images, cfg, tracker=tracker, progress=False)
    assert set(res["blocks"]) == {"blocks.0", "blocks.1"}
    for name, st in res["blocks"].items():
        assert st["objective_after"] < 0.5 * st["objective_before"], (name, st)
        assert 0 < st["ub"] < float("inf")
    assert isinstance(model.blocks[0].mlp.act, nn.ReLU)
    assert all(torch.equal(v, fp.state_dict()[k]) for k, v in fp_state.items())  # teacher unchanged
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    # Only fc1/fc2 of the MLPs change.
    for k, v in model.state_dict().items():
        if ".mlp.fc" not in k:
            assert torch.equal(v, fp_state[k]), k
    curves = [line for line in tracker.path.read_text().splitlines() if '"mr/blocks.0"' in line]
    assert len(curves) == 4  # steps 1, 40, 80, 120


def test_same_generator_same_result(images):
    fp = tiny_vit()
    cfg = {"iters": 20, "batch_size": 8, "metric": "mse", "eval_batch_size": 16}
    a, b = copy.deepcopy(fp), copy.deepcopy(fp)
    reconstruct_mlps(a, fp, images, cfg, generator=torch.Generator().manual_seed(5), progress=False)
    reconstruct_mlps(b, fp, images, cfg, generator=torch.Generator().manual_seed(5), progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _demo_weights_available() -> bool:
    try:
        from common.models.demo import DEFAULT_WEIGHTS
    except Exception:  # pragma: no cover
        return False
    return DEFAULT_WEIGHTS.is_file()


@pytest.mark.skipif(not _demo_weights_available(), reason="demo weights (common/models/assets/vit_digits.safetensors) "
                    "not trained yet")
def test_demo_accuracy_kept_within_two_points():
    from common.data.digits import digits_split

    split = digits_split()
    fp = timm.create_model("vit_digits", pretrained=True).eval()
    model = copy.deepcopy(fp)
    calib = split["calib_pool"][0][:128]
    reconstruct_mlps(model, fp, calib, {"iters": 400, "lr": 1e-3, "pct": 0.99}, progress=False)
    x, y = split["test"]
    with torch.no_grad():
        acc_fp = (fp(x).argmax(-1) == y).float().mean().item() * 100
        acc_mr = (model(x).argmax(-1) == y).float().mean().item() * 100
    assert acc_mr >= acc_fp - 2.0, (acc_fp, acc_mr)


def test_sparse_clamp_branch_equals_dense_fc2():
    """fc2(clamp(h, 0, ub)) = fc2(h) − relu(h − ub)·W2ᵀ: same loss and gradients as the dense branch."""
    from aphq.mlp_recon import _loss, _mlp_forward

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, 16, generator=g, dtype=torch.float64)
    y = torch.randn(6, 9, 16, generator=g, dtype=torch.float64)
    w = torch.rand(1, 9, 16, generator=g, dtype=torch.float64)
    base = nn.Module()
    base.fc1, base.fc2 = nn.Linear(16, 64).double(), nn.Linear(64, 16).double()
    results = []
    for sparse in (False, True):
        mlp = copy.deepcopy(base)
        y_hat, y_clip = _mlp_forward(mlp, x, 0.4, sparse_clip=sparse)
        loss = _loss(y_hat, y_clip, y, w, 2.0, 10.0)
        loss.backward()
        results.append((y_clip.detach(), loss.detach(), [p.grad for p in mlp.parameters()]))
    (c0, l0, g0), (c1, l1, g1) = results
    assert (torch.relu(base.fc1(x)) > 0.4).any()
    torch.testing.assert_close(c1, c0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
