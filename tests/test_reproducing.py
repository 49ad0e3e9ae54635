"""The papers' settings are the defaults (docs/reproducing.md): weights, transforms, calibration draws, image counts.

Golden values are written out by hand from the specs and timm's results CSV, not read from the code; the draws
are checked against independent computations (a real torch DataLoader over a torchvision ImageFolder, and
APHQ's `np.random.seed(3407); np.random.permutation(len(train))[:n]`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

from common.data import build_data
from common.data.datasets import IMAGENET_SAMPLE_ROOT, calibration_order
from common.errors import UserError
from common.models import zoo
from common.models.zoo import build_model, weights_source
from common.run.config import model_node, resolve_dataset
from common.run.pipeline import run
from conftest import compose_cfg, perturbed_timm

ADALOG = "https://github.com/GoatWu/AdaLog/releases/download/v1.0/"
# model: (timm name, pretrained tag, series); tags = the papers' FP column in timm's results-imagenet.csv
PAPER_WEIGHTS = {
    "vit_t": ("vit_tiny_patch16_224", "augreg_in21k_ft_in1k", "vit"),
    "vit_s": ("vit_small_patch16_224", "augreg_in21k_ft_in1k", "vit"),      # 81.40 (paper 81.39)
    "vit_b": ("vit_base_patch16_224", "augreg_in21k_ft_in1k", "vit"),       # 84.53 (84.54), not augreg2 (85.11)
    "deit_t": ("deit_tiny_patch16_224", "fb_in1k", "deit"),
    "deit_s": ("deit_small_patch16_224", "fb_in1k", "deit"),
    "deit_b": ("deit_base_patch16_224", "fb_in1k", "deit"),
    "swin_t": ("swin_tiny_patch4_window7_224", "ms_in1k", "swin"),          # 81.39 (RepQ-ViT 81.35)
    "swin_s": ("swin_small_patch4_window7_224", "ms_in1k", "swin"),         # 83.23, not ms_in22k_ft_in1k (83.33)
    "swin_b": ("swin_base_patch4_window7_224", "ms_in22k_ft_in1k", "swin"),  # 85.28 (85.27)
}
TINY = {"depth": 1}


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("name", sorted(PAPER_WEIGHTS))
def test_model_configs_name_the_paper_weights(name: str) -> None:
    timm_name, tag, series = PAPER_WEIGHTS[name]
    node = model_node(name)
    assert (node["timm_name"], node["pretrained_tag"], node["series"]) == (timm_name, tag, series)
    assert node["checkpoint_url"] == f"{ADALOG}{timm_name}.bin" and node["pretrained"] is True
    assert f"{timm_name}.{tag}" in timm.list_pretrained(f"{timm_name}.*")
    assert weights_source(node) == {"source": "checkpoint_url", "url": node["checkpoint_url"],
                                    "file": str(Path(torch.hub.get_dir()) / "checkpoints" / f"{timm_name}.bin"),
                                    "timm": f"{timm_name}.{tag}"}
    # without the URL the hub tag is what timm would download; random init keeps the tag's data config
    assert weights_source({**node, "checkpoint_url": None})["source"] == "timm_hub"


def test_tagged_model_and_bad_tag() -> None:
    model = build_model(model_node("vit_b", pretrained=False, kwargs=TINY))
    assert model.pretrained_cfg["tag"] == "augreg_in21k_ft_in1k"  # timm 1.0's default would be augreg2_in21k_ft_in1k
    with pytest.raises(UserError, match=r"no pretrained tag 'nope'.*augreg_in21k_ft_in1k.*model\.pretrained_tag="):
        build_model(model_node("vit_b", pretrained=False, pretrained_tag="nope", kwargs=TINY))


def test_hub_download_asks_for_the_tag(monkeypatch) -> None:
    """`model.checkpoint_url=null`: timm is asked for name.tag (vit_b: augreg, not timm 1.0's default augreg2)."""
    asked = []

    def fake_create(name, pretrained=False, **kwargs):
        asked.append((name, pretrained))
        raise RuntimeError("no hub in tests")

    monkeypatch.setattr(zoo, "_hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(timm, "create_model", fake_create)
    with pytest.raises(UserError, match="could not get pretrained weights"):
        build_model(model_node("vit_b", checkpoint_url=None, kwargs=TINY))
    assert asked == [("vit_base_patch16_224.augreg_in21k_ft_in1k", True)]


def test_checkpoint_url_is_fetched_into_the_torch_hub_cache(tmp_path, monkeypatch) -> None:
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    source = perturbed_timm("deit_tiny_patch16_224", depth=1)
    release = tmp_path / "release" / "deit_tiny_patch16_224.bin"
    release.parent.mkdir()
    torch.save(source.state_dict(), release)
    cfg = model_node("deit_t", kwargs=TINY, checkpoint_url=release.as_uri())  # file:///.../deit_tiny_patch16_224.bin
    x = torch.randn(2, 3, 224, 224)

    model = build_model(cfg)
    cached = hub / "checkpoints" / "deit_tiny_patch16_224.bin"
    assert cached.is_file() and cached.read_bytes() == release.read_bytes()
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    assert weights_source(cfg)["file"] == str(cached)

    release.unlink()  # the cached copy is used from now on, no download
    with torch.no_grad():
        torch.testing.assert_close(build_model(cfg)(x), source(x), rtol=0, atol=0)

    with pytest.raises(UserError, match=r"could not get pretrained weights.*model\.checkpoint=.*checkpoint_url=null"):
        build_model(model_node("deit_t", kwargs=TINY, checkpoint_url=(tmp_path / "gone" / "x.bin").as_uri()))


def test_checkpoint_url_offline_is_one_fast_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(zoo, "_reachable", lambda host, port, timeout=3.0: False)
    for var in zoo._PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        build_model(model_node("deit_t", kwargs=TINY))
    assert time.monotonic() - start < 10
    msg = str(info.value)
    assert "\n" not in msg and "could not get pretrained weights" in msg and "github.com" in msg
    assert "model.checkpoint=/path/to/deit_tiny_patch16_224.bin" in msg and "deit_tiny_patch16_224.fb_in1k" in msg


# --------------------------------------------------------------------------- transforms


def _data(overrides: list[str], seed: int = 0, tiny: str = "+model.kwargs.depth=1"):
    cfg = compose_cfg(["model.pretrained=false", tiny, *overrides])
    resolve_dataset(cfg)
    return cfg, build_data(cfg.dataset, build_model(cfg.model), seed)


def _erq_transform(crop_pct: float, mean, std) -> T.Compose:
    """ERQ / RepQ-ViT utils/build_dataset.py build_transform, written out independently."""
    return T.Compose([T.Resize(int(np.floor(224 / crop_pct)), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(224), T.ToTensor(), T.Normalize(mean, std)])


@pytest.fixture(scope="module")
def image() -> Image.Image:
    path = sorted((IMAGENET_SAMPLE_ROOT / "val").glob("n*/*.JPEG"))[0]
    with Image.open(path) as im:
        return im.convert("RGB")


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.mark.parametrize("method", ["erq", "repq"])
def test_erq_deit_transform_is_resize_256_center_crop_224(method: str, image) -> None:
    cfg, data = _data([f"method={method}", "model=deit_s"])
    assert cfg.dataset.crop_pct == 0.875
    resize, crop = data._eval_transform.transforms[:2]
    assert isinstance(resize, T.Resize) and resize.size == 256
    assert resize.interpolation == T.InterpolationMode.BICUBIC
    assert isinstance(crop, T.CenterCrop) and tuple(crop.size) == (224, 224)
    torch.testing.assert_close(data._eval_transform(image), _erq_transform(0.875, *IMAGENET)(image), rtol=0, atol=0)
    tf = data.info["transform"]
    assert tf["crop_pct"] == 0.875 and tf["interpolation"] == "bicubic" and tf["eval"].startswith(
        "Resize(size=256, interpolation=bicubic") and "CenterCrop(size=(224, 224))" in tf["eval"]
    assert data.info["preset"] == f"method {method}: crop_pct=0.875 (series deit), calib_draw=torch_loader"
    assert tf["crop_pct_from"] == "method preset (data.crop_pct)"


@pytest.mark.parametrize("model,mean_std", [("vit_s", ((0.5,) * 3, (0.5,) * 3)), ("swin_t", IMAGENET)])
def test_erq_vit_and_swin_crop_0_9(model: str, mean_std, image) -> None:
    tiny = "+model.kwargs.depths=[1,1,1,1]" if model.startswith("swin") else "+model.kwargs.depth=1"
    cfg, data = _data(["method=erq", f"model={model}"], tiny=tiny)
    assert cfg.dataset.crop_pct == 0.9 and data._eval_transform.transforms[0].size == 248
    torch.testing.assert_close(data._eval_transform(image), _erq_transform(0.9, *mean_std)(image), rtol=0, atol=0)


def test_aphq_transform_is_timms_and_dataset_crop_pct_overrides_erq(image) -> None:
    cfg, aphq = _data(["method=aphq", "model=deit_s"])
    assert cfg.dataset.crop_pct is None and aphq.info["transform"]["crop_pct_from"] == "timm data config"
    model = build_model(cfg.model)
    timm_tf = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    assert aphq._eval_transform.transforms[0].size == 248  # timm 1.0: crop 0.9 for DeiT
    torch.testing.assert_close(aphq._eval_transform(image), timm_tf(image), rtol=0, atol=0)

    cfg, over = _data(["method=erq", "model=deit_s", "dataset.crop_pct=0.9"])
    assert over._eval_transform.transforms[0].size == 248 and over.info["transform"]["crop_pct"] == 0.9
    assert "crop_pct" not in over.info["preset"] and over.info["transform"]["crop_pct_from"] == "dataset.crop_pct"
    cfg, back = _data(["method=erq", "model=deit_s", "dataset.crop_pct=timm"])
    torch.testing.assert_close(back._eval_transform(image), timm_tf(image), rtol=0, atol=0)


def test_presets_leave_the_demo_alone() -> None:
    for method in ("aphq", "erq", "repq"):
        cfg = compose_cfg([f"method={method}"])
        resolve_dataset(cfg)
        assert cfg.dataset.name == "digits" and cfg.dataset.get("preset") is None
        assert cfg.dataset.calib_draw is None and cfg.dataset.calib_seed is None


@pytest.mark.parametrize("method,draw,seed", [("aphq", "numpy_perm", 3407), ("qdrop", "numpy_perm", 3407),
                                              ("brecq", "numpy_perm", 3407), ("erq", "torch_loader", None),
                                              ("repq", "torch_loader", None), ("ptq", "numpy_perm", None)])
def test_faithful_defaults_compose(method: str, draw: str, seed) -> None:
    cfg = compose_cfg([f"method={method}", "model=deit_s", "dataset=imagenet", "dataset.root=/data"])
    resolve_dataset(cfg)
    assert (cfg.dataset.calib_draw, cfg.dataset.calib_seed) == (draw, seed)
    assert cfg.dataset.crop_pct == (0.875 if method in ("erq", "repq") else None)
    if method in ("aphq", "qdrop", "brecq"):
        assert (cfg.method.mlp_recon.n_images, cfg.method.calib.n_images, cfg.method.recon.n_images) == (1024, 128, 1024)
    if method == "erq":
        assert cfg.method.n_calib == 32 and cfg.method.act_init.images == 32 and cfg.seed == 0


# --------------------------------------------------------------------------- calibration draws


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An ImageNet-layout root (train/: 3 classes x 23 files, val/: 1 file); names only, never decoded."""
    root = tmp_path_factory.mktemp("imagenet")
    for split, n in (("train", 23), ("val", 1)):
        for c in ("n01440764", "n01443537", "n01484850"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                (root / split / c / f"{c}_{i:04d}.JPEG").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def deit() -> torch.nn.Module:
    return build_model(model_node("deit_t", pretrained=False, kwargs=TINY))


def _folder_ids(root: Path) -> list[str]:
    ds = torchvision.datasets.ImageFolder(str(root / "train"), loader=lambda p: p)
    return [Path(p).relative_to(root).as_posix() for p, _ in ds.samples]


@pytest.mark.parametrize("seed", [0, 5])
def test_torch_loader_draw_is_erqs_first_shuffled_batch(folder, deit, seed: int) -> None:
    ds = torchvision.datasets.ImageFolder(str(folder / "train"), loader=lambda p: p)
    torch.manual_seed(seed)  # ERQ's seed(args.seed), then build_dataset and `for data, target in train_loader: break`
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, drop_last=True, num_workers=0)
    paths, targets = next(iter(loader))
    expected = [Path(p).relative_to(folder).as_posix() for p in paths]

    cfg = compose_cfg(["method=erq", "model=deit_t", "dataset=imagenet", f"dataset.root={folder}", f"seed={seed}"])
    resolve_dataset(cfg)
    data = build_data(cfg.dataset, deit, seed)
    assert data.calibration_ids(32) == expected
    assert data._calib_labels[:32].tolist() == _std_labels(targets, ds)
    assert data.info["calib_draw"] == "torch_loader" and data.info["calib_seed"] == seed
    assert torch.initial_seed() == seed  # replayed on a private generator: the global RNG is untouched


def _std_labels(targets: torch.Tensor, ds) -> list[int]:
    """ImageFolder's 0..2 class indices as the standard ImageNet-1k indices of their wnids."""
    from common.data import imagenet_wnids

    return [imagenet_wnids().index(ds.classes[int(t)]) for t in targets]


def test_aphq_draw_is_np_seed_3407_permutation(folder, deit) -> None:
    np.random.seed(3407)  # APHQ utils/datasets.py calib_loader(num, seed=args.seed=3407)
    inds = np.random.permutation(len(_folder_ids(folder)))[:40]
    expected = [_folder_ids(folder)[i] for i in inds]
    for run_seed in (0, 1):  # the preset's calib_seed, not the run seed
        cfg = compose_cfg(["method=aphq", "model=deit_t", "dataset=imagenet", f"dataset.root={folder}",
                           f"seed={run_seed}"])
        resolve_dataset(cfg)
        data = build_data(cfg.dataset, deit, run_seed)
        assert data.calibration_ids(40) == expected and data.calibration_ids(16) == expected[:16]
    cfg = compose_cfg(["method=aphq", "model=deit_t", "dataset=imagenet", f"dataset.root={folder}",
                       "dataset.calib_seed=7"])
    resolve_dataset(cfg)
    other = build_data(cfg.dataset, deit, 0)
    assert other.calibration_ids(40) == [_folder_ids(folder)[i] for i in np.random.RandomState(7).permutation(69)[:40]]


def test_calibration_order_checks() -> None:
    assert sorted(calibration_order(50, "torch_loader", 0).tolist()) == list(range(50))
    with pytest.raises(UserError, match=r"dataset\.calib_draw must be one of numpy_perm, torch_loader"):
        calibration_order(5, "random", 0)


# --------------------------------------------------------------------------- image counts in results.json


APHQ_TINY = ["method.mlp_recon.n_images=8", "method.mlp_recon.iters=2", "method.mlp_recon.evaluate=false",
             "method.calib.n_images=4", "method.calib.evaluate=false", "method.recon.n_images=12", "method.recon.iters=2"]


@pytest.mark.parametrize("method,overrides,images", [
    ("aphq", APHQ_TINY, {"mr": 8, "calibration": 4, "reconstruction": 12}),
    ("aphq", [*APHQ_TINY, "method.mlp_recon.enabled=false"], {"calibration": 4, "reconstruction": 12}),
    ("erq", ["method.n_calib=16"], {"calibration": 16, "act_init": 16}),
    ("repq", ["method.n_calib=8"], {"calibration": 8, "act_init": 8}),
    ("fp", [], {}),
])
def test_results_name_each_stages_image_count(method: str, overrides: list[str], images: dict, tmp_path) -> None:
    from omegaconf import open_dict

    cfg = compose_cfg(["model=demo", f"method={method}", "bits=w4a4", "num_threads=1", "dataset.n_eval=20", *overrides])
    with open_dict(cfg):
        cfg.run_dir, cfg.stages.shared_dir = str(tmp_path / "run"), str(tmp_path / "cache")
    res = run(cfg)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["images"] == res["images"] == {**images, "eval": 20}
    assert on_disk["n_calib"] == images.get("calibration", 0) and on_disk["n_eval"] == 20
    drawn = max(images.values(), default=0)
    assert "n_calib" not in on_disk["data"] and len(on_disk["data"]["calib_ids"]) == drawn  # the longest prefix drawn
    assert on_disk["weights"]["source"] == "checkpoint"
