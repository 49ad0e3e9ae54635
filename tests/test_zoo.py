"""Tests of `common.models.zoo`: every checkpoint format round-trips exactly; every bad input is a UserError."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf

from common.models import zoo
from common.errors import UserError
from common.models.zoo import build_model, data_config
from common.run.config import group_options, model_node

from conftest import perturbed_timm

REPO = Path(__file__).resolve().parents[1]
TINY = {"depth": 1}  # one block: the real architecture at test speed


def _cfg(name: str = "deit_t", checkpoint: str | Path | None = None, pretrained: bool = False, kwargs=None) -> dict:
    """A model config node as Hydra would give it."""
    spec = model_node(name)
    return {
        "name": name,
        "timm_name": spec["timm_name"],
        "family": spec["family"],
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "pretrained": pretrained,
        "kwargs": dict(TINY if kwargs is None else kwargs),
    }


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    """A randomly initialised one-block DeiT-Tiny whose weights the checkpoints carry."""
    return perturbed_timm("deit_tiny_patch16_224", depth=1)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 224, 224)


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def vit_to_npz(model: torch.nn.Module, path: Path, big_vision: bool) -> None:
    """Write a timm ViT as an original JAX ViT (`big_vision=False`) or big_vision (`params/...`) npz.

    This inverts the layout conversions of timm's `_load_weights`: conv kernels are HWIO, dense
    kernels are (in, out), attention q/k/v kernels are (dim, heads, head_dim) and the attention
    output kernel is (heads, head_dim, dim).
    """
    sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    dim = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    hd = dim // heads
    pre = "params/" if big_vision else ""
    mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
    out = {
        f"{pre}embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        f"{pre}embedding/bias": sd["patch_embed.proj.bias"],
        f"{pre}cls": sd["cls_token"],
        (f"{pre}pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"): sd["pos_embed"],
        f"{pre}Transformer/encoder_norm/scale": sd["norm.weight"],
        f"{pre}Transformer/encoder_norm/bias": sd["norm.bias"],
        f"{pre}head/kernel": sd["head.weight"].T,
        f"{pre}head/bias": sd["head.bias"],
    }
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"{pre}Transformer/encoderblock_{i}/"
        out[p + "LayerNorm_0/scale"], out[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        out[p + f"LayerNorm_{ln2}/scale"], out[p + f"LayerNorm_{ln2}/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w = np.split(sd[b + "attn.qkv.weight"], 3, axis=0)
        qkv_b = np.split(sd[b + "attn.qkv.bias"], 3, axis=0)
        for n, w, bias in zip(("query", "key", "value"), qkv_w, qkv_b):
            out[p + f"MultiHeadDotProductAttention_{mha}/{n}/kernel"] = w.T.reshape(dim, heads, hd)
            out[p + f"MultiHeadDotProductAttention_{mha}/{n}/bias"] = bias.reshape(heads, hd)
        out[p + f"MultiHeadDotProductAttention_{mha}/out/kernel"] = (
            sd[b + "attn.proj.weight"].reshape(dim, heads, hd).transpose(1, 2, 0)
        )
        out[p + f"MultiHeadDotProductAttention_{mha}/out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            out[p + f"MlpBlock_{mlp}/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            out[p + f"MlpBlock_{mlp}/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **{k: np.ascontiguousarray(v) for k, v in out.items()})


def _write(fmt: str, model: torch.nn.Module, tmp_path: Path) -> Path:
    """Save `model` in checkpoint format `fmt`; returns the file."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if fmt == "deit_release":  # {'model': state_dict}, like dl.fbaipublicfiles .pth
        path = tmp_path / "deit.pth"
        torch.save({"model": sd}, path)
    elif fmt == "deit_training":  # training checkpoint with args Namespace and optimizer state
        path = tmp_path / "checkpoint.pth"
        torch.save({"model": sd, "optimizer": {"state": {}}, "epoch": 3, "args": argparse.Namespace(lr=1e-3)}, path)
    elif fmt == "state_dict_key":
        path = tmp_path / "lightning.ckpt"
        torch.save({"state_dict": sd, "epoch": 1}, path)
    elif fmt in ("plain_pth", "plain_pt", "plain_bin"):
        path = tmp_path / f"weights.{fmt.split('_')[1]}"
        torch.save(sd, path)
    elif fmt == "ddp_prefix":
        path = tmp_path / "ddp.pth"
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt in ("npz_jax", "npz_big_vision"):
        path = tmp_path / f"{fmt}.npz"
        vit_to_npz(model, path, big_vision=fmt == "npz_big_vision")
    else:  # pragma: no cover
        raise ValueError(fmt)
    return path


FORMATS = [
    "deit_release",
    "deit_training",
    "state_dict_key",
    "plain_pth",
    "plain_pt",
    "plain_bin",
    "ddp_prefix",
    "safetensors",
    "npz_jax",
    "npz_big_vision",
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpoint_round_trip_exact(fmt: str, source, images, tmp_path) -> None:
    path = _write(fmt, source, tmp_path)
    model = build_model(_cfg(checkpoint=path))
    assert not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(_logits(model, images), _logits(source, images))


def test_dictconfig_and_npz_helper_sanity(source, images, tmp_path) -> None:
    """A Hydra DictConfig works as well as a dict; the npz really differs from a random init."""
    path = _write("npz_jax", source, tmp_path)
    model = build_model(OmegaConf.create(_cfg(checkpoint=path)))
    fresh = build_model(_cfg())
    assert torch.equal(_logits(model, images), _logits(source, images))
    assert not torch.equal(_logits(fresh, images), _logits(source, images))


def _swin_old_layout(sd: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """timm Swin state dict -> original Microsoft release layout (downsample at stage end, `head.`)."""
    import re

    out = {}
    for k, v in sd.items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v
    for i, layer in enumerate(model.layers):  # buffers timm 0.9 / the original code saved
        for j, _ in enumerate(layer.blocks):
            out[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = torch.zeros(49 * 49, dtype=torch.long)
    return out


@pytest.mark.parametrize("layout", ["timm09_buffers", "original_release"])
def test_swin_checkpoints_from_older_layouts(layout: str, tmp_path) -> None:
    """Swin files saved by timm 0.9 (extra buffers) or the Swin release load via timm's converter."""
    kwargs = {"depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "embed_dim": 16}
    torch.manual_seed(0)
    src = timm.create_model("swin_tiny_patch4_window7_224", **kwargs).eval()
    sd = src.state_dict()
    if layout == "timm09_buffers":
        sd = dict(sd)
        sd["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49 * 49, dtype=torch.long)
        sd["layers.0.blocks.0.attn_mask"] = torch.zeros(1)
    else:
        sd = _swin_old_layout(sd, src)
    torch.save(sd, tmp_path / "swin.pth")
    model = build_model(_cfg("swin_t", tmp_path / "swin.pth", kwargs=kwargs))
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(_logits(model, x), _logits(src, x))


def test_random_init_without_weights() -> None:
    model = build_model(_cfg(pretrained=False))
    assert isinstance(model, torch.nn.Module) and not model.training
    assert next(model.parameters()).dtype == torch.float32


# --------------------------------------------------------------------------- errors


def test_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(UserError, match=r"does not exist.*model\.checkpoint="):
        build_model(_cfg(checkpoint=tmp_path / "nope.pth"))


@pytest.mark.parametrize("kind", ["random_pth", "truncated_pth", "random_safetensors", "truncated_npz", "not_a_state_dict"])
def test_corrupt_checkpoint(kind: str, source, tmp_path) -> None:
    rng = np.random.default_rng(0)
    if kind == "random_pth":
        path = tmp_path / "w.pth"
        path.write_bytes(rng.bytes(4096))
    elif kind == "truncated_pth":
        path = _write("plain_pth", source, tmp_path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random_safetensors":
        path = tmp_path / "w.safetensors"
        path.write_bytes(rng.bytes(4096))
    elif kind == "truncated_npz":
        path = _write("npz_jax", source, tmp_path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path = tmp_path / "w.pth"
        torch.save([1, 2, 3], path)
    with pytest.raises(UserError) as info:
        build_model(_cfg(checkpoint=path))
    msg = str(info.value)
    assert "\n" not in msg and "model.checkpoint=" in msg
    assert ("cannot read" in msg) or ("no state dict" in msg)


class _Opaque:
    """A class that weights_only loading refuses."""


def test_pickled_objects_are_refused(source, tmp_path) -> None:
    torch.save({"model": source.state_dict(), "extra": _Opaque()}, tmp_path / "w.pth")
    with pytest.raises(UserError, match=r"pickled Python objects .*_Opaque.*re-save just the state dict"):
        build_model(_cfg(checkpoint=tmp_path / "w.pth"))


@pytest.mark.parametrize("fmt", ["plain_pth", "safetensors", "npz_jax"])
def test_checkpoint_for_another_model(fmt: str, source, tmp_path) -> None:
    """A DeiT-Tiny file given to `model=deit_s` names the counts, an example and the fix."""
    path = _write(fmt, source, tmp_path)
    with pytest.raises(UserError) as info:
        build_model(_cfg("deit_s", checkpoint=path))
    msg = str(info.value)
    assert "\n" not in msg
    assert "is this checkpoint for model deit_s?" in msg and "`model=`" in msg
    if fmt != "npz_jax":
        assert "with other shapes" in msg and "e.g." in msg


def test_checkpoint_with_missing_and_unexpected_keys(source, tmp_path) -> None:
    sd = dict(source.state_dict())
    sd.pop("head.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(UserError, match=r"1 keys missing, 1 unexpected, 0 with other shapes \(e\.g\. head\.bias\)"):
        build_model(_cfg(checkpoint=tmp_path / "w.pth"))


def test_npz_checks_depth_and_classes(source, tmp_path) -> None:
    path = _write("npz_jax", source, tmp_path)
    with pytest.raises(UserError, match=r"1 transformer blocks, model 'deit_t' has 2"):
        build_model(_cfg(checkpoint=path, kwargs={"depth": 2}))
    with pytest.raises(UserError, match=r"has 1000 classes, model 'deit_t' has 10"):
        build_model(_cfg(checkpoint=path, kwargs={"depth": 1, "num_classes": 10}))


def test_npz_for_swin_is_refused(source, tmp_path) -> None:
    path = _write("npz_jax", source, tmp_path)
    with pytest.raises(UserError, match=r"only supported for ViT/DeiT"):
        build_model(_cfg("swin_t", checkpoint=path, kwargs={"depths": (1,) * 4, "num_heads": (1,) * 4, "embed_dim": 16}))


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(UserError) as info:
        build_model({"name": "resnet50"})
    msg = str(info.value)
    assert "conf/model/" in msg


def test_bad_kwargs() -> None:
    with pytest.raises(UserError, match=r"model\.kwargs"):
        build_model(_cfg(kwargs={"no_such_argument": 3}))


def test_hub_unreachable_fails_fast_in_process(monkeypatch, tmp_path) -> None:
    """With no network (probe fails) and an empty cache: a quick UserError, offline flag restored."""
    from huggingface_hub import constants

    monkeypatch.setattr(zoo, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    before = constants.HF_HUB_OFFLINE
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        build_model(_cfg(pretrained=True))
    assert time.monotonic() - start < 20
    msg = str(info.value)
    assert "model.checkpoint=/path/to/deit_tiny_patch16_224.pth" in msg and "HF_HOME" in msg and "\n" not in msg
    assert constants.HF_HUB_OFFLINE == before


def test_hub_offline_env_in_process(monkeypatch, tmp_path) -> None:
    """`HF_HUB_OFFLINE=1` as huggingface_hub reads it at import; the network probe is not even tried."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))

    def no_probe(timeout: float = 3.0) -> bool:
        raise AssertionError("offline mode must not probe the network")

    monkeypatch.setattr(zoo, "_hub_reachable", no_probe)
    start = time.monotonic()
    with pytest.raises(UserError, match=r"model\.checkpoint=/path/to/vit_small_patch16_224\.pth"):
        build_model(_cfg("vit_s", pretrained=True))
    assert time.monotonic() - start < 20


@pytest.mark.slow
def test_hub_offline_env_subprocess(tmp_path) -> None:
    """The user's own `HF_HUB_OFFLINE=1` with an empty HF_HOME: the error names `model.checkpoint=`."""
    code = textwrap.dedent(
        """
        from common.errors import UserError
        from common.models.zoo import build_model
        from common.run.config import model_node
        try:
            build_model(model_node("deit_t", checkpoint=None, pretrained=True, kwargs={"depth": 1}))
        except UserError as e:
            print("USERERROR:", e)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO))
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 60
    assert "USERERROR:" in out.stdout, out.stderr[-2000:]
    assert "model.checkpoint=" in out.stdout


# --------------------------------------------------------------------------- zoo table and data configs


def test_zoo_table() -> None:
    """The model list is conf/model/ (the one source of names, timm names and families)."""
    names = group_options("model")
    assert {"deit_t", "deit_s", "deit_b", "vit_s", "vit_b", "swin_t", "swin_s", "swin_b", "demo"} <= set(names)
    specs = {n: model_node(n) for n in names}
    specs = {n: s for n, s in specs.items() if s.get("task", "classification") == "classification"}  # timm models
    assert specs["vit_b"]["timm_name"].split(".")[0] == "vit_base_patch16_224" and specs["vit_b"]["family"] == "vit"
    assert {s["family"] for s in specs.values()} <= {"vit", "swin"}
    import common.models.demo  # noqa: F401

    assert all(timm.is_model(s["timm_name"]) for s in specs.values())


IMAGENET_MEAN = (0.485, 0.456, 0.406)


@pytest.mark.parametrize(
    "name,kwargs,mean,crop_pct",
    [
        # timm 1.0.x reports crop_pct 0.9 for DeiT (the DeiT repo / RepQ-ViT evaluate at 0.875, see data.py)
        ("deit_t", {"depth": 1}, IMAGENET_MEAN, 0.9),
        ("vit_s", {"depth": 1}, (0.5, 0.5, 0.5), 0.9),  # default tag augreg_in21k_ft_in1k
        ("swin_t", {"depths": (1, 1, 1, 1)}, IMAGENET_MEAN, 0.9),
    ],
)
def test_data_config(name: str, kwargs: dict, mean: tuple, crop_pct: float) -> None:
    cfg = data_config(build_model(_cfg(name, kwargs=kwargs)))
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["interpolation"] == "bicubic"
    assert tuple(cfg["mean"]) == pytest.approx(mean)
    assert cfg["crop_pct"] == pytest.approx(crop_pct)
