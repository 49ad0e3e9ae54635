"""The embedded demo model (`vit_digits`) and dataset (8x8 digits): fast checks (< 10 s)."""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest
import timm
import timm.data
import torch
from timm.models.vision_transformer import VisionTransformer

import common.data.digits as digits
import common.models.demo as demo


def test_split_disjoint_and_complete():
    idx = digits.digits_split_indices()
    assert {k: len(v) for k, v in idx.items()} == {"train": 1200, "calib_pool": 197, "test": 400}
    allidx = np.concatenate(list(idx.values()))
    assert len(np.unique(allidx)) == 1797
    assert sorted(allidx.tolist()) == list(range(1797))
    for a in idx:
        for b in idx:
            if a != b:
                assert not set(idx[a].tolist()) & set(idx[b].tolist())
    # fixed: independent of the run seed and of repeated calls
    again = digits.digits_split_indices()
    assert all(np.array_equal(idx[k], again[k]) for k in idx)


def test_split_tensors_match_indices():
    x, y = digits.load_digits_tensors()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min().item() == pytest.approx(-1.0) and x.max().item() == pytest.approx(1.0)
    idx = digits.digits_split_indices()
    s0, s7 = digits.digits_split(0), digits.digits_split(7)
    for name, (xs, ys) in s0.items():
        assert torch.equal(xs, x[torch.from_numpy(idx[name])])
        assert torch.equal(ys, y[torch.from_numpy(idx[name])])
        assert torch.equal(xs, s7[name][0]) and torch.equal(ys, s7[name][1])


def test_model_is_timm_vit_and_tiny():
    model = timm.create_model("vit_digits")
    assert isinstance(model, VisionTransformer)
    assert model.cls_token is not None and model.global_pool == "token"
    assert len(model.blocks) >= 3 and model.blocks[0].attn.num_heads >= 2
    assert sum(p.numel() for p in model.parameters()) < 300_000
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    # kwargs override the defaults
    assert len(timm.create_model("vit_digits", depth=3).blocks) == 3


def test_reimport_does_not_clash():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(demo)
    assert timm.models.is_model("vit_digits")


def test_resolve_model_data_config():
    cfg = timm.data.resolve_model_data_config(timm.create_model("vit_digits"))
    assert tuple(cfg["input_size"]) == (1, 8, 8)
    assert tuple(cfg["mean"]) == (0.5,) and tuple(cfg["std"]) == (0.5,)
    assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bilinear"
    assert digits.DIGITS_MEAN == 0.5 and digits.DIGITS_STD == 0.5


def test_committed_weights_load_strictly_and_are_accurate():
    from safetensors.torch import load_file

    assert demo.DEFAULT_WEIGHTS.is_file(), "run `python -m common.models.train_demo`"
    assert demo.DEFAULT_WEIGHTS.stat().st_size <= 1_500_000
    model = timm.create_model("vit_digits")
    model.load_state_dict(load_file(str(demo.DEFAULT_WEIGHTS)), strict=True)
    model.eval()
    x, y = digits.digits_split()["test"]
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    assert acc >= 0.95
    # pretrained=True loads the same file
    pre = timm.create_model("vit_digits", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(pre(x[:8]), model(x[:8]))
