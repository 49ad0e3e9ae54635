"""Tests of `common.data`: fixed splits, prefix-stable seeded calibration, reproducible augmentation, errors."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image

from common.data import IMAGENET_SAMPLE_ROOT, build_data, imagenet_wnids
from common.run.config import model_node
from common.errors import UserError
from common.models.zoo import build_model

POOL = 64  # a small calibration pool keeps the 224px transforms fast


@pytest.fixture(scope="module")
def deit() -> torch.nn.Module:
    return build_model(model_node("deit_t", checkpoint=None, pretrained=False, kwargs={"depth": 1}))


@pytest.fixture(scope="module")
def demo() -> torch.nn.Module:
    return build_model(model_node("demo", checkpoint=None, pretrained=False))


def _sample_cfg(**over) -> dict:
    cfg = {"name": "imagenet_sample", "root": None, "n_calib": 16, "n_eval": 10, "eval_batch_size": 4,
           "num_workers": 0, "calib_pool": POOL}
    cfg.update(over)
    return cfg


def _wnid_label(rel: str) -> int:
    """Standard ImageNet index of the class folder in a relative id such as 'val/n01440764/x.JPEG'."""
    return imagenet_wnids().index(rel.split("/")[-2])


# --------------------------------------------------------------------------- imagenet_sample


def test_bundled_sample_is_complete() -> None:
    files = sorted((IMAGENET_SAMPLE_ROOT / "val").glob("n*/*.JPEG"))
    assert len(files) == 1000 and len(imagenet_wnids()) == 1000
    assert imagenet_wnids()[0] == "n01440764" and imagenet_wnids()[-1] == "n15075141"


def test_sample_split_disjoint_and_fixed(deit) -> None:
    a = build_data(_sample_cfg(n_eval=None), deit, seed=0)
    b = build_data(_sample_cfg(n_eval=None), deit, seed=7)
    pool_a, pool_b = set(a.calibration_ids(POOL)), set(b.calibration_ids(POOL))
    assert pool_a == pool_b and len(pool_a) == POOL  # the pool does not depend on the run seed...
    assert a.calibration_ids(POOL) != b.calibration_ids(POOL)  # ...its order does
    eval_ids = {"val/" + p.relative_to(IMAGENET_SAMPLE_ROOT / "val").as_posix() for p in a._eval_dataset.files}
    assert len(eval_ids) == 1000 - POOL and not (eval_ids & pool_a)
    assert a._eval_dataset.files == sorted(a._eval_dataset.files)  # evaluation in sorted order
    again = build_data(_sample_cfg(n_eval=None), deit, seed=0)
    assert again.calibration_ids(POOL) == a.calibration_ids(POOL)
    assert a.info["n_eval"] == 1000 - POOL and a.info["n_calib_available"] == POOL
    assert a.info["calib_ids"] == a.calibration_ids(16) and a.info["label_map"] == "imagenet_wnid"
    json.dumps(a.info)  # goes into the results record as is
    # the default pool of 256 splits 256 / 744
    default = build_data({k: v for k, v in _sample_cfg(n_eval=None).items() if k != "calib_pool"}, deit, seed=0)
    assert default.n_calib_available == 256 and default.info["n_eval"] == 744


def test_calibration_prefix_labels_and_transform(deit) -> None:
    data = build_data(_sample_cfg(), deit, seed=3)
    x32, y32 = data.calibration(32)
    x16, y16 = data.calibration(16)
    assert x32.shape == (32, 3, 224, 224) and x32.dtype == torch.float32 and y32.dtype == torch.int64
    assert torch.equal(x32[:16], x16) and torch.equal(y32[:16], y16)
    assert [int(v) for v in y32] == [_wnid_label(i) for i in data.calibration_ids(32)]
    # the plain calibration transform is timm's eval transform of the model
    tf = timm.data.create_transform(**timm.data.resolve_model_data_config(deit), is_training=False)
    first = Image.open(IMAGENET_SAMPLE_ROOT / data.calibration_ids(1)[0]).convert("RGB")
    assert torch.equal(x16[0], tf(first))
    # another build with the same seed gives the same tensors
    assert torch.equal(build_data(_sample_cfg(), deit, seed=3).calibration(8)[0], x32[:8])


def test_augmented_draws_reproducible_and_distinct(deit) -> None:
    data = build_data(_sample_cfg(), deit, seed=3)
    random.seed(123)
    torch.manual_seed(123)
    d0, y0 = data.calibration(8, augment=True, draw=0)
    after = (random.random(), torch.rand(1))
    random.seed(123)
    torch.manual_seed(123)
    expected = (random.random(), torch.rand(1))
    assert after[0] == expected[0] and torch.equal(after[1], expected[1])  # global RNGs untouched

    other = build_data(_sample_cfg(), deit, seed=3)
    assert torch.equal(other.calibration(8, augment=True, draw=0)[0], d0)  # reproducible
    assert torch.equal(data.calibration(4, augment=True, draw=0)[0], d0[:4])  # prefix-stable
    d1, y1 = data.calibration(8, augment=True, draw=1)
    assert torch.equal(y0, y1) and not torch.equal(d0, d1)  # same images, other augmentation
    assert not torch.equal(d0, data.calibration(8)[0])  # differs from the plain transform
    assert not torch.equal(build_data(_sample_cfg(), deit, seed=4).calibration(8, augment=True, draw=0)[0], d0)
    with pytest.raises(UserError):
        data.calibration(4, augment=True, draw=-1)


def test_eval_loader_deterministic(deit) -> None:
    data = build_data(_sample_cfg(n_eval=6), deit, seed=0)
    batches = list(data.eval_loader())
    assert [len(y) for _, y in batches] == [4, 2]
    again = list(data.eval_loader())
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    labels = torch.cat([y for _, y in batches]).tolist()
    files = data._eval_dataset.dataset.files
    expected = [imagenet_wnids().index(files[i * len(files) // 6].parent.name) for i in range(6)]  # spread
    assert labels == expected


def test_crop_pct_override(deit) -> None:
    data = build_data(_sample_cfg(crop_pct=0.875), deit, seed=0)
    assert data.info["data_config"]["crop_pct"] == 0.875
    assert data._eval_transform.transforms[0].size == 256  # floor(224 / 0.875)
    assert build_data(_sample_cfg(), deit, seed=0)._eval_transform.transforms[0].size == 248  # timm: 0.9


# --------------------------------------------------------------------------- imagenet layout


def _tiny_imagenet(root: Path, classes: list[str], per_class: int) -> None:
    """train/ and val/ ImageFolders of real JPEGs copied from the bundled sample."""
    for split, count in (("train", per_class), ("val", 2)):
        for c in classes:
            src = next((IMAGENET_SAMPLE_ROOT / "val" / c).glob("*.JPEG"))
            (root / split / c).mkdir(parents=True)
            for k in range(count):
                shutil.copy(src, root / split / c / f"{c}_{k}.JPEG")


def test_imagenet_folders(deit, tmp_path) -> None:
    classes = ["n01440764", "n02102040", "n03000684"]
    _tiny_imagenet(tmp_path, classes, per_class=4)
    cfg = {"name": "imagenet", "root": str(tmp_path), "n_calib": 6, "n_eval": None, "eval_batch_size": 5, "num_workers": 0}
    data = build_data(cfg, deit, seed=3407)
    train_files = sorted(f"train/{c}/{c}_{k}.JPEG" for c in classes for k in range(4))
    order = np.random.RandomState(3407).permutation(len(train_files))  # APHQ's calibration indices
    assert data.calibration_ids(12) == [train_files[i] for i in order]
    x, y = data.calibration(6)
    assert x.shape == (6, 3, 224, 224)
    assert y.tolist() == [_wnid_label(i) for i in data.calibration_ids(6)]
    assert set(y.tolist()) <= {0, 217, 491}  # standard ImageNet indices, not 0..2
    ys = torch.cat([b for _, b in data.eval_loader()]).tolist()
    assert ys == [0, 0, 217, 217, 491, 491]
    assert data.info["n_eval"] == 6 and data.info["n_calib_available"] == 12
    with pytest.raises(UserError, match=r"13 calibration images requested.*has 12"):
        build_data({**cfg, "n_calib": 13}, deit, seed=0)

    # n_eval: spread over the sorted val set (every class), or the first n (class-biased) on request
    spread = build_data({**cfg, "n_eval": 3}, deit, seed=3407)
    assert torch.cat([b for _, b in spread.eval_loader()]).tolist() == [0, 217, 491]
    first = build_data({**cfg, "n_eval": 3, "eval_subset": "first"}, deit, seed=3407)
    assert torch.cat([b for _, b in first.eval_loader()]).tolist() == [0, 0, 217]
    with pytest.raises(UserError, match=r"dataset.eval_subset must be one of spread, first.*dataset.eval_subset="):
        build_data({**cfg, "n_eval": 3, "eval_subset": "random"}, deit, seed=0)


@pytest.mark.parametrize("available,n", [(1000, 1000), (744, 100), (50000, 1000), (400, 7), (5, 1)])
def test_eval_subset_spread_is_even(available, n) -> None:
    from common.data import eval_subset_indices

    idx = eval_subset_indices(available, n)
    assert len(idx) == n == len(set(idx)) and idx == sorted(idx) and 0 == idx[0] and idx[-1] < available
    gaps = {b - a for a, b in zip(idx, idx[1:])}  # evenly spaced: every gap is ⌊available/n⌋ or ⌈available/n⌉
    assert gaps <= {available // n, -(-available // n)}
    if (available, n) == (50000, 1000):  # ImageNet val, 50 per class: one image of every class
        assert sorted({i // 50 for i in idx}) == list(range(1000))


def test_non_imagenet_folder_names_are_numbered_in_sorted_order(deit, tmp_path) -> None:
    src = next((IMAGENET_SAMPLE_ROOT / "val" / "n01440764").glob("*.JPEG"))
    for c in ("cat", "dog"):
        (tmp_path / "val" / c).mkdir(parents=True)
        shutil.copy(src, tmp_path / "val" / c / "a.JPEG")
        shutil.copy(src, tmp_path / "val" / c / "b.JPEG")
    data = build_data(_sample_cfg(root=str(tmp_path), calib_pool=1, n_calib=1, n_eval=None), deit, seed=0)
    assert data.info["label_map"] == "sorted_folders"
    assert sorted(torch.cat([y for _, y in data.eval_loader()]).tolist()) == [0, 0, 1]


# --------------------------------------------------------------------------- digits


def test_digits(demo) -> None:
    from common.data.digits import digits_split_indices

    cfg = {"name": "digits", "root": None, "n_calib": 32, "n_eval": None, "eval_batch_size": 100, "num_workers": 0}
    data = build_data(cfg, demo, seed=1)
    x, y = data.calibration(32)
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(data.calibration(16)[0], x[:16])
    assert torch.equal(data.calibration(32, augment=True, draw=2)[0], x)  # augmentation = identity
    assert set(data.calibration_ids(197)) == set(int(i) for i in digits_split_indices()["calib_pool"])
    json.dumps(data.info)
    assert data.info["n_eval"] == 400 and sum(len(b) for _, b in data.eval_loader()) == 400
    assert build_data(cfg, demo, seed=2).calibration_ids(32) != data.calibration_ids(32)
    with pytest.raises(UserError, match=r"198 calibration images requested"):
        build_data({**cfg, "n_calib": 198}, demo, seed=0)


def test_model_dataset_mismatch(deit, demo) -> None:
    cfg = {"name": "digits", "n_calib": 8, "eval_batch_size": 8}
    with pytest.raises(UserError, match=r"model=demo"):
        build_data(cfg, deit, seed=0)
    with pytest.raises(UserError, match=r"dataset=digits"):
        build_data(_sample_cfg(), demo, seed=0)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "cfg,pattern",
    [
        ({"name": "imagenet", "root": "/no/such/imagenet"}, r"'/no/such/imagenet' does not exist.*dataset\.root="),
        ({"name": "imagenet", "root": None}, r"dataset\.root is not set"),
        ({"name": "imagenet_sample", "root": "/no/such/sample"}, r"does not exist.*dataset\.root="),
        ({"name": "cifar"}, r"unknown dataset 'cifar'"),
        ({"name": "imagenet_sample", "n_calib": 300}, r"300 calibration images requested.*has 256"),
        ({"name": "imagenet_sample", "n_eval": 745}, r"n_eval=745.*744"),
        ({"name": "imagenet_sample", "calib_pool": 1000}, r"calib_pool=1000"),
        ({"name": "imagenet_sample", "n_calib": 0}, r"dataset\.n_calib"),
    ],
)
def test_bad_configs(cfg, pattern, deit) -> None:
    base = {"n_calib": 8, "n_eval": None, "eval_batch_size": 8, "num_workers": 0}
    with pytest.raises(UserError, match=pattern) as info:
        build_data({**base, **cfg}, deit, seed=0)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("missing", ["train", "val"])
def test_imagenet_root_without_split(missing, deit, tmp_path) -> None:
    _tiny_imagenet(tmp_path, ["n01440764"], per_class=2)
    shutil.rmtree(tmp_path / missing)
    with pytest.raises(UserError, match=rf"{missing}' does not exist.*dataset\.root="):
        build_data({"name": "imagenet", "root": str(tmp_path), "n_calib": 1, "eval_batch_size": 2}, deit, seed=0)


def test_flat_val_folder_is_refused(deit, tmp_path) -> None:
    (tmp_path / "val").mkdir()
    shutil.copy(next((IMAGENET_SAMPLE_ROOT / "val" / "n01440764").glob("*.JPEG")), tmp_path / "val" / "x.JPEG")
    with pytest.raises(UserError, match=r"ImageFolder layout"):
        build_data(_sample_cfg(root=str(tmp_path)), deit, seed=0)
