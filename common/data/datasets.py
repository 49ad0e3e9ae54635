"""Calibration and evaluation data for post-training quantization.

Three datasets, one interface (:class:`PTQData`):

* ``imagenet``: ``<root>/train`` and ``<root>/val`` ImageFolders. Calibration images come from
  ``train/`` (as in APHQ and ERQ), evaluation is all of ``val/``.
* ``imagenet_sample``: ``<root>/val/<wnid>/*.JPEG``, by default the 1000 real images (one per
  class) bundled in ``common/data/assets/imagenet_sample``. A fixed split (seed 0, independent of the
  run seed) puts ``calib_pool`` files aside for calibration; the disjoint rest is evaluated.
* ``digits``: the demo dataset of :mod:`common.data.digits` (tensors already normalised; no transform,
  and augmentation is the identity because 8x8 digits have no crop/flip/colour augmentation
  that preserves the label in a meaningful way).

Calibration sets are the first ``n`` images of ONE order of the calibration source, so a
128-image set is the prefix of the 1024-image set (APHQ relies on this). The order is the
dataset's ``calib_draw`` seeded by ``calib_seed`` (default: the run seed), :func:`calibration_order`:

* ``numpy_perm`` (default): ``numpy.random.RandomState(seed).permutation(len(train))``, which is
  what APHQ's ``np.random.seed(3407); np.random.permutation(...)`` gives for the same file order;
* ``torch_loader``: the order in which ``DataLoader(ImageFolder(train), shuffle=True)`` yields
  samples right after ``torch.manual_seed(seed)`` (ERQ / RepQ-ViT take its first batch).

The methods' presets (``method.data`` in conf/method/, applied by ``common.run.config``) choose the
draw, its seed and the evaluation crop of each reference; ``docs/reproducing.md`` lists them.
Augmented draws use timm's training transform with Python's ``random`` and torch's CPU generator
seeded per (seed, draw, image), so each draw is reproducible and independent of ``n``; the
global RNG states are restored afterwards. (APHQ's own crops are unseeded, aphq spec §8.)

Labels: folder names that are ImageNet WordNet ids get their standard ImageNet-1k index (the
sorted order of all 1000 wnids), so a folder holding only a few classes still matches the
model's 1000 outputs; other folder names are numbered in sorted order.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from common.errors import UserError

__all__ = ["PTQData", "build_data", "IMAGENET_SAMPLE_ROOT", "imagenet_wnids", "DATASETS", "CALIB_DRAWS",
           "calibration_order"]

#: Default root of ``imagenet_sample``: 1000 real ImageNet val images, one per class, shipped here.
IMAGENET_SAMPLE_ROOT: Path = Path(__file__).resolve().parent / "assets" / "imagenet_sample"
#: Dataset names accepted by :func:`build_data`.
DATASETS: tuple[str, ...] = ("imagenet", "imagenet_sample", "digits")
#: Seed of the fixed calibration/evaluation split of ``imagenet_sample`` (never the run seed).
SAMPLE_SPLIT_SEED: int = 0
#: Calibration orders :func:`calibration_order` knows (``dataset.calib_draw``).
CALIB_DRAWS: tuple[str, ...] = ("numpy_perm", "torch_loader")
_IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------- image folders


@functools.lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in sorted order (= class index), read from the bundled sample."""
    val = IMAGENET_SAMPLE_ROOT / "val"
    return tuple(sorted(d.name for d in val.iterdir() if d.is_dir())) if val.is_dir() else ()


def _class_index(classes: Sequence[str]) -> tuple[dict[str, int], str]:
    """Folder name -> label, and which rule was used (``imagenet_wnid`` or ``sorted_folders``)."""
    wnids = imagenet_wnids()
    if len(wnids) == 1000 and set(classes) <= set(wnids):
        index = {w: i for i, w in enumerate(wnids)}
        return {c: index[c] for c in classes}, "imagenet_wnid"
    return {c: i for i, c in enumerate(sorted(classes))}, "sorted_folders"


@dataclass(frozen=True)
class _Folder:
    """A scanned ImageFolder: files in sorted (class, file) order with their labels."""

    root: Path
    files: tuple[Path, ...]
    labels: tuple[int, ...]
    label_map: str

    def ids(self, idx: Sequence[int]) -> list[str]:
        """Paths relative to the folder root, for the results record."""
        return [self.files[i].relative_to(self.root).as_posix() for i in idx]


def _scan_folder(folder: Path, what: str) -> _Folder:
    """List ``folder/<class>/<image>`` like torchvision's ImageFolder (sorted classes, sorted files)."""
    if not folder.is_dir():
        raise UserError(
            f"{what} folder {str(folder)!r} does not exist: set `dataset.root=` to a folder that holds it"
        )
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    mapping, rule = _class_index(classes)
    files: list[Path] = []
    labels: list[int] = []
    for c in classes:
        names = sorted(e.name for e in os.scandir(folder / c) if e.is_file() and e.name.lower().endswith(_IMG_EXTENSIONS))
        files += [folder / c / n for n in names]
        labels += [mapping[c]] * len(names)
    if not files:
        raise UserError(
            f"{what} folder {str(folder)!r} has no images in class sub-folders (expected <class>/<image>.JPEG, "
            "the ImageFolder layout): reorganise it or fix `dataset.root=`"
        )
    return _Folder(folder, tuple(files), tuple(labels), rule)


def _decode(path: Path) -> Any:
    """Decode one image file to an RGB PIL image (what torchvision's ImageFolder does)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


class _FileDataset(Dataset):
    """(transformed image, label) for a list of files; used by the evaluation loader."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], transform: Callable[[Any], torch.Tensor]):
        self.files, self.labels, self.transform = list(files), list(labels), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(_decode(self.files[i])), self.labels[i]


# --------------------------------------------------------------------------- calibration order


def calibration_order(n: int, draw: str, seed: int) -> np.ndarray:
    """The order (a permutation of ``range(n)``) in which calibration images are taken.

    ``numpy_perm``: ``np.random.RandomState(seed).permutation(n)`` (= ``np.random.seed(seed);
    np.random.permutation(n)``, APHQ's ``calib_loader``).

    ``torch_loader``: the sample order of ``DataLoader(dataset, shuffle=True)`` (any batch size,
    ``drop_last``, worker count) iterated right after ``torch.manual_seed(seed)``, as ERQ and
    RepQ-ViT draw their calibration batch. In torch 2.x the loader's iterator first draws its
    ``_base_seed`` (one int64 ``random_()`` from the default generator), then the ``RandomSampler``
    without a generator seeds a fresh ``torch.Generator`` with the next int64 ``random_()`` and
    yields ``torch.randperm(n, generator=that)``. Both draws are replayed on a private generator
    seeded with ``seed`` (the global RNG is not touched). Checked against a real DataLoader in
    tests/test_reproducing.py; other torch versions may order differently.
    """
    if draw not in CALIB_DRAWS:
        raise UserError(f"dataset.calib_draw must be one of {', '.join(CALIB_DRAWS)}, got {draw!r}: "
                        "fix `dataset.calib_draw=`")
    if draw == "numpy_perm":
        return np.random.RandomState(seed).permutation(n)
    outer = torch.Generator().manual_seed(int(seed))
    torch.empty((), dtype=torch.int64).random_(generator=outer)  # _BaseDataLoaderIter._base_seed
    sampler_seed = int(torch.empty((), dtype=torch.int64).random_(generator=outer).item())
    return torch.randperm(n, generator=torch.Generator().manual_seed(sampler_seed)).numpy()


# --------------------------------------------------------------------------- seeded augmentation


def _draw_seed(seed: int, draw: int, position: int) -> int:
    """A 32-bit seed for one augmented image, from (run seed, draw, position in the calibration order)."""
    return int(np.random.SeedSequence([seed, draw, position]).generate_state(1)[0])


@contextmanager
def _seeded_rng(seed: int) -> Iterator[None]:
    """Seed Python's ``random`` and torch's CPU generator (what timm's train transform uses); restore after."""
    py_state = random.getstate()
    torch_state = torch.random.get_rng_state()
    random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        torch.random.set_rng_state(torch_state)


# --------------------------------------------------------------------------- PTQData


@dataclass
class PTQData:
    """Calibration draws and the evaluation loader of one dataset, for one run seed.

    Attributes:
        name: dataset name (``imagenet`` | ``imagenet_sample`` | ``digits``).
        seed: run seed; fixes the calibration order and the augmentations.
        n_calib: the configured calibration size (default of :meth:`calibration`).
        eval_batch_size, num_workers: evaluation loader settings.
        info: JSON-serialisable description for the results record.
    """

    name: str
    seed: int
    n_calib: int
    eval_batch_size: int
    num_workers: int
    info: dict[str, Any]
    # calibration source, already in the seeded order
    _calib_files: list[Path] | None = field(default=None, repr=False)
    _calib_labels: torch.Tensor | None = field(default=None, repr=False)
    _calib_tensors: torch.Tensor | None = field(default=None, repr=False)  # digits only
    _calib_ids: list[Any] = field(default_factory=list, repr=False)
    _eval_dataset: Dataset | None = field(default=None, repr=False)
    _eval_transform: Callable[[Any], torch.Tensor] | None = field(default=None, repr=False)
    _train_transform: Callable[[Any], torch.Tensor] | None = field(default=None, repr=False)
    _decoded: dict[int, Any] = field(default_factory=dict, repr=False)
    _plain: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def n_calib_available(self) -> int:
        """How many calibration images the source holds."""
        return len(self._calib_ids)

    def calibration_ids(self, n: int | None = None) -> list[Any]:
        """Ids (relative file paths, or digits indices) of the first ``n`` calibration images."""
        return list(self._calib_ids[: self._check_n(n)])

    def calibration(self, n: int | None = None, augment: bool = False, draw: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` images of the seeded calibration order, stacked, with their labels.

        Args:
            n: how many (default: the configured ``n_calib``). ``calibration(128)`` is the
                prefix of ``calibration(1024)``.
            augment: apply timm's training transform (random resized crop, flip, colour
                jitter) instead of the evaluation transform; identity for ``digits``.
            draw: which augmentation draw; equal draws give equal tensors, different draws
                differ. Ignored when ``augment`` is False.

        Returns:
            images float32 (n, C, H, W) and labels int64 (n,). Decoded images and
            un-augmented tensors are cached in this object; augmented ones are recomputed.
        """
        n = self._check_n(n)
        if isinstance(draw, bool) or not isinstance(draw, (int, np.integer)) or draw < 0:
            raise UserError(f"augmentation draw must be an integer >= 0, got {draw!r}")
        if self._calib_tensors is not None:  # digits: tensors, no transform
            assert self._calib_labels is not None
            return self._calib_tensors[:n].clone(), self._calib_labels[:n].clone()
        assert self._calib_files is not None and self._calib_labels is not None
        from tqdm import tqdm

        work = n if augment else sum(i not in self._plain for i in range(n))
        kind = f"augmented (draw {draw})" if augment else "plain"
        out = []
        for i in tqdm(range(n), desc=f"{self.name} calibration, {kind}", leave=False, disable=work < 64):
            if augment:
                assert self._train_transform is not None
                with _seeded_rng(_draw_seed(self.seed, draw, i)):
                    out.append(self._train_transform(self._image(i)))
            else:
                if i not in self._plain:
                    assert self._eval_transform is not None
                    self._plain[i] = self._eval_transform(self._image(i))
                out.append(self._plain[i])
        return torch.stack(out).float(), self._calib_labels[:n].clone()

    def eval_loader(self) -> DataLoader:
        """Deterministic loader over the evaluation part (no shuffle, fixed order)."""
        assert self._eval_dataset is not None
        return DataLoader(
            self._eval_dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=False,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def clear_cache(self) -> None:
        """Drop decoded images and cached tensors (they can take GBs for 1024 ImageNet images)."""
        self._decoded.clear()
        self._plain.clear()

    # ---------------------------------------------------------------- helpers

    def _check_n(self, n: int | None) -> int:
        n = self.n_calib if n is None else n
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise UserError(f"calibration size must be a positive integer, got {n!r}: fix `dataset.n_calib=`")
        if n > self.n_calib_available:
            raise UserError(
                f"{n} calibration images requested but dataset {self.name!r} has {self.n_calib_available}: "
                f"lower `dataset.n_calib=` (or the method's calibration size) or use a larger dataset"
            )
        return int(n)

    def _image(self, i: int) -> Any:
        """The ``i``-th calibration image, decoded once and kept in memory."""
        if i not in self._decoded:
            assert self._calib_files is not None
            self._decoded[i] = _decode(self._calib_files[i])
        return self._decoded[i]


# --------------------------------------------------------------------------- build_data


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"dataset.{key} must be a positive integer, got {value!r}: fix `dataset.{key}=`")
    return int(value)


def _transforms(model: nn.Module, crop_pct: float | str | None) -> tuple[Callable, Callable, dict[str, Any]]:
    """timm's eval and train transforms from the model's data config (``crop_pct`` optionally overridden;
    None or ``"timm"`` keeps timm's)."""
    import timm.data

    dc = dict(timm.data.resolve_model_data_config(model))
    if crop_pct is not None and crop_pct != "timm":
        if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < float(crop_pct) <= 1:
            raise UserError(f"dataset.crop_pct must be in (0, 1] or `timm`, got {crop_pct!r}: fix `dataset.crop_pct=`")
        dc["crop_pct"] = float(crop_pct)
    if tuple(dc["input_size"])[0] != 3:
        raise UserError(
            f"the model takes {tuple(dc['input_size'])} inputs, not RGB images: "
            "use `dataset=digits` with `model=demo`, or an ImageNet model with ImageNet data"
        )
    eval_tf = timm.data.create_transform(**dc, is_training=False)
    train_tf = timm.data.create_transform(**dc, is_training=True)
    return eval_tf, train_tf, {k: (list(v) if isinstance(v, tuple) else v) for k, v in dc.items()}


def _describe(transform: Any) -> str:
    """One line naming each step of a torchvision Compose, e.g. ``Resize(size=256, ...) -> CenterCrop(...)``."""
    steps = getattr(transform, "transforms", [transform])
    return " -> ".join(" ".join(repr(s).split()) for s in steps)


def _crop_origin(cfg: Mapping[str, Any]) -> str:
    """Where the evaluation crop came from: timm's data config, the method's preset, or `dataset.crop_pct`."""
    if cfg.get("crop_pct") in (None, "timm"):
        return "timm data config"
    return "method preset (data.crop_pct)" if "crop_pct=" in str(cfg.get("preset") or "") else "dataset.crop_pct"


def _calib_settings(cfg: Mapping[str, Any], seed: int) -> tuple[str, int]:
    """``dataset.calib_draw`` (default numpy_perm) and ``dataset.calib_seed`` (default the run seed), checked."""
    draw = _get(cfg, "calib_draw", "numpy_perm")
    if draw not in CALIB_DRAWS:
        raise UserError(f"dataset.calib_draw must be one of {', '.join(CALIB_DRAWS)}, got {draw!r}: "
                        "fix `dataset.calib_draw=`")
    calib_seed = _get(cfg, "calib_seed", seed)
    if isinstance(calib_seed, bool) or not isinstance(calib_seed, (int, np.integer)) or not 0 <= calib_seed < 2**32:
        raise UserError(f"dataset.calib_seed must be an integer in [0, 2**32) or null, got {calib_seed!r}: "
                        "fix `dataset.calib_seed=`")
    return str(draw), int(calib_seed)


EVAL_SUBSETS = ("spread", "first")


def eval_subset_indices(available: int, n: int, mode: str = "spread") -> list[int]:
    """Which of `available` evaluation images (in sorted order) an `n_eval=n` run evaluates.

    "spread" (default): n indices evenly spaced over the whole sorted list, ⌊i·available/n⌋, so a
    class-folder val set contributes every class in proportion (ImageNet val sorted by wnid: the first
    n images would be the first n/50 classes only). Seed-independent, so subsets are comparable across
    runs. "first": the first n (the behaviour before session 2).
    """
    if mode not in EVAL_SUBSETS:
        raise UserError(f"dataset.eval_subset must be one of {', '.join(EVAL_SUBSETS)}, got {mode!r}: "
                        "fix `dataset.eval_subset=`")
    if mode == "first":
        return list(range(n))
    return [i * available // n for i in range(n)]


def build_data(dataset_cfg: Mapping[str, Any], model: nn.Module, seed: int) -> PTQData:
    """Build the calibration source and evaluation set described by a ``dataset`` config node.

    Args:
        dataset_cfg: ``name`` (``imagenet`` | ``imagenet_sample`` | ``digits``), ``root``,
            ``n_calib``, ``n_eval`` (None = all), ``eval_subset`` (which n_eval images:
            "spread" evenly over the sorted set, or "first"), ``eval_batch_size``, ``num_workers``;
            ``calib_pool`` (imagenet_sample, default 256); optional ``crop_pct`` overriding
            timm's (e.g. 0.875 for DeiT as RepQ-ViT/ERQ evaluate; None or ``timm`` = timm's value);
            ``calib_draw`` (``numpy_perm`` default | ``torch_loader``, :func:`calibration_order`) and
            ``calib_seed`` (None = ``seed``); ``preset`` (what the method preset filled, recorded).
        model: the FP model; its timm data config gives the transforms.
        seed: run seed (augmentations; the calibration order unless ``calib_seed`` is set).

    Raises:
        UserError: unknown name, missing folders, sizes larger than what exists.
    """
    name = dataset_cfg.get("name")
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: pick one of {', '.join(DATASETS)} (e.g. `dataset=imagenet_sample`)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise UserError(f"seed must be an integer in [0, 2**32), got {seed!r}: fix `seed=`")
    seed = int(seed)
    n_calib = _positive_int(_get(dataset_cfg, "n_calib", 32), "n_calib")
    n_eval_cfg = dataset_cfg.get("n_eval")
    n_eval = None if n_eval_cfg is None else _positive_int(n_eval_cfg, "n_eval")
    eval_batch_size = _positive_int(_get(dataset_cfg, "eval_batch_size", 100), "eval_batch_size")
    num_workers = int(_get(dataset_cfg, "num_workers", 0))
    if num_workers < 0:
        raise UserError(f"dataset.num_workers must be >= 0, got {num_workers}: fix `dataset.num_workers=`")

    common = dict(name=name, seed=seed, n_calib=n_calib, eval_batch_size=eval_batch_size, num_workers=num_workers)
    draw, calib_seed = _calib_settings(dataset_cfg, seed)
    if name == "digits":
        data = _build_digits(model, seed, common, draw, calib_seed)
    else:
        data = _build_folders(name, dataset_cfg, model, seed, common, draw, calib_seed)

    n_eval_available = len(data._eval_dataset)  # type: ignore[arg-type]
    if n_eval is not None:
        if n_eval > n_eval_available:
            raise UserError(
                f"dataset.n_eval={n_eval} but dataset {name!r} has {n_eval_available} evaluation images: "
                "lower `dataset.n_eval=` or set it to null for all"
            )
        subset = eval_subset_indices(n_eval_available, n_eval, str(_get(dataset_cfg, "eval_subset", "spread")))
        data._eval_dataset = torch.utils.data.Subset(data._eval_dataset, subset)  # type: ignore[arg-type]
    data._check_n(n_calib)  # n_calib larger than the source -> UserError now, not mid-run
    data.info.update(
        n_calib_available=data.n_calib_available,
        calib_ids=data.calibration_ids(n_calib),  # the pipeline replaces these by the prefix the method drew
        n_eval=len(data._eval_dataset),  # type: ignore[arg-type]
        n_eval_available=n_eval_available,
        seed=seed,
        calib_draw=draw,
        calib_seed=calib_seed,
        preset=dataset_cfg.get("preset"),
    )
    return data


def _build_digits(model: nn.Module, seed: int, common: dict[str, Any], draw: str, calib_seed: int) -> PTQData:
    """Digits: calibration from ``calib_pool``, evaluation on ``test`` (fixed split, no transform)."""
    import timm.data

    from common.data.digits import digits_split, digits_split_indices

    input_size = tuple(timm.data.resolve_model_data_config(model)["input_size"])
    split = digits_split(seed)
    images, labels = split["calib_pool"]
    if input_size != tuple(images.shape[1:]):
        raise UserError(
            f"dataset=digits gives {tuple(images.shape[1:])} images but the model takes {input_size}: use `model=demo`"
        )
    order = torch.from_numpy(calibration_order(len(labels), draw, calib_seed))
    pool_ids = digits_split_indices()["calib_pool"]
    test_x, test_y = split["test"]
    return PTQData(
        **common,
        info={
            "dataset": "digits",
            "root": None,
            "calib_source": f"digits calib_pool (197 images), in {draw} order (seed {calib_seed})",
            "eval_split": "digits test split (400 images, fixed order of common.data.digits)",
            "augmentation": "identity (digits are already tensors)",
            "transform": "none (images are normalised tensors)",
        },
        _calib_tensors=images[order].contiguous(),
        _calib_labels=labels[order].contiguous(),
        _calib_ids=[int(i) for i in pool_ids[order.numpy()]],
        _eval_dataset=TensorDataset(test_x, test_y),
    )


def _build_folders(name: str, cfg: Mapping[str, Any], model: nn.Module, seed: int, common: dict[str, Any],
                   draw: str, calib_seed: int) -> PTQData:
    """``imagenet`` (train/ + val/) or ``imagenet_sample`` (val/ split into calibration pool and rest)."""
    root_cfg = cfg.get("root")
    if root_cfg in (None, ""):
        if name == "imagenet":
            raise UserError("dataset.root is not set: set `dataset.root=/path/to/imagenet` (holding train/ and val/)")
        root_cfg = IMAGENET_SAMPLE_ROOT
    root = Path(str(root_cfg)).expanduser()
    if not root.is_dir():
        need = "train/ and val/" if name == "imagenet" else "val/<wnid>/*.JPEG"
        raise UserError(f"dataset root {str(root)!r} does not exist: set `dataset.root=` to a folder holding {need}")
    eval_tf, train_tf, dc = _transforms(model, cfg.get("crop_pct"))

    if name == "imagenet":
        for sub in ("train", "val"):
            if not (root / sub).is_dir():
                raise UserError(
                    f"{str(root / sub)!r} does not exist: `dataset.root=` must hold train/ and val/ ImageFolders"
                )
        train = _scan_folder(root / "train", "ImageNet train")
        val = _scan_folder(root / "val", "ImageNet val")
        order = calibration_order(len(train.files), draw, calib_seed)
        calib_files = [train.files[i] for i in order]
        calib_labels = [train.labels[i] for i in order]
        calib_ids = [f"train/{p}" for p in train.ids(order)]
        eval_files, eval_labels = list(val.files), list(val.labels)
        label_map = val.label_map
        calib_source = f"train/ ({len(train.files)} images, ImageFolder order), in {draw} order (seed {calib_seed})"
        eval_split = f"val/ ({len(val.files)} images, sorted order)"
    else:
        if not (root / "val").is_dir():
            raise UserError(f"{str(root / 'val')!r} does not exist: `dataset.root=` must hold val/<wnid>/*.JPEG")
        sample = _scan_folder(root / "val", "ImageNet sample")
        pool = _positive_int(_get(cfg, "calib_pool", 256), "calib_pool")
        if pool >= len(sample.files):
            raise UserError(
                f"dataset.calib_pool={pool} leaves no evaluation images out of {len(sample.files)}: "
                "lower `dataset.calib_pool=`"
            )
        split = np.random.RandomState(SAMPLE_SPLIT_SEED).permutation(len(sample.files))
        pool_idx, rest_idx = split[:pool], np.sort(split[pool:])
        order = pool_idx[calibration_order(pool, draw, calib_seed)]
        calib_files = [sample.files[i] for i in order]
        calib_labels = [sample.labels[i] for i in order]
        calib_ids = [f"val/{p}" for p in sample.ids(order)]
        eval_files = [sample.files[i] for i in rest_idx]
        eval_labels = [sample.labels[i] for i in rest_idx]
        label_map = sample.label_map
        calib_source = (
            f"val/: the {pool} files first in RandomState({SAMPLE_SPLIT_SEED}).permutation (fixed pool), "
            f"in {draw} order (seed {calib_seed})"
        )
        eval_split = f"val/ minus the calibration pool ({len(eval_files)} images, sorted order)"

    return PTQData(
        **common,
        info={
            "dataset": name,
            "root": str(root),
            "calib_source": calib_source,
            "eval_split": eval_split,
            "label_map": label_map,
            "data_config": dc,
            "transform": {
                "eval": _describe(eval_tf),  # also the un-augmented calibration images
                "crop_pct": dc["crop_pct"],
                "interpolation": dc["interpolation"],
                "crop_pct_from": _crop_origin(cfg),
            },
            "augmentation": "timm create_transform(is_training=True), seeded per (seed, draw, image)",
        },
        _calib_files=calib_files,
        _calib_labels=torch.tensor(calib_labels, dtype=torch.int64),
        _calib_ids=calib_ids,
        _eval_dataset=_FileDataset(eval_files, eval_labels, eval_tf),
        _eval_transform=eval_tf,
        _train_transform=train_tf,
    )
