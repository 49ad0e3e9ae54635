"""Super-resolution data: test sets (HR + LR pairs) and calibration patches.

Test sets (`dataset=sr_folder`, `dataset.name=set5|set14|b100|urban100|<folder>`): the layout of the
SwinIR / KAIR `testsets/` folders, `<root>/<Set>/HR/*.png` with optional `<root>/<Set>/LR_bicubic/X<s>/
<stem>x<s>.png`. `dataset.root=null` uses the bundled Set5 (`assets/set5`). HR images are mod-cropped to a
multiple of the scale; the LR input is the given LR file (`lr_source=auto` when the folder has it, or
`folder`) or the MATLAB-compatible bicubic downsampling of the HR (`lr_source=bicubic`, and `auto` without
an LR folder). `hr_dir=` / `lr_dir=` name the folders directly.

Calibration (`calib_root=`): like the reference's first training batch of KAIR's `DatasetSR` (DIV2K,
H_size 96 at ×2): per patch, a training image (a seeded permutation of the files, cycled), a uniformly
random LR crop of `patch_size` pixels (HR crop = `patch_size·scale`), from the LR made by MATLAB bicubic
of the whole mod-cropped HR image, and one of the 8 flip/rotation modes. `calib_root=null` draws from the
real photos bundled with scikit-image (the demo model's training images), `calib_root=/data/DIV2K_train_HR`
reproduces the reference's source. Draws are seeded by the run seed (numpy RandomState), so the first n
patches of a larger calibration set are the same n patches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from common.errors import UserError

from .imresize import bicubic_down
from .metrics import modcrop

__all__ = ["SRData", "SRImage", "build_sr_data", "SET5_ROOT", "TEST_SETS", "skimage_photos", "augment",
           "to_tensor", "load_rgb"]

ASSETS = Path(__file__).resolve().parent / "assets"
SET5_ROOT = ASSETS / "set5"
#: dataset.name -> folder names searched under dataset.root (case-insensitive), SwinIR/KAIR spelling first.
TEST_SETS: dict[str, tuple[str, ...]] = {
    "set5": ("Set5",), "set14": ("Set14",), "b100": ("B100", "BSD100", "BSDS100"), "urban100": ("Urban100",),
}
#: Colour photos bundled with scikit-image (no download): the demo's training and calibration images.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")
_EXT = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")


def load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def skimage_photos(names: tuple[str, ...] = SKIMAGE_PHOTOS) -> list[tuple[str, np.ndarray]]:
    """(name, uint8 RGB) of scikit-image's bundled photos."""
    try:
        import skimage.data
    except ImportError as exc:  # pragma: no cover - a dependency
        raise UserError("scikit-image is needed for the bundled SR calibration photos: pip install scikit-image, "
                        "or set dataset.calib_root= to a folder of HR training images") from exc
    return [(n, np.ascontiguousarray(getattr(skimage.data, n)()[..., :3])) for n in names]


def augment(img: np.ndarray, mode: int) -> np.ndarray:
    """One of the 8 dihedral transforms (KAIR's `augment_img` modes 0..7: flips and 90° rotations)."""
    if mode & 4:
        img = np.rot90(img, 1)
    if mode & 2:
        img = np.rot90(img, 2)
    if mode & 1:
        img = img[::-1]
    return np.ascontiguousarray(img)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img).transpose(2, 0, 1).astype(np.float32) / 255.0)


@dataclass
class SRImage:
    name: str
    hr: np.ndarray   # uint8 (H, W, 3), mod-cropped
    lr: np.ndarray   # uint8 (H/s, W/s, 3)


@dataclass
class SRData:
    """Calibration patches and a test set of one SR dataset, for one run seed (the `PTQData` of task=sr)."""

    name: str
    scale: int
    seed: int
    n_calib: int
    patch_size: int
    info: dict[str, Any]
    images: list[SRImage]
    _calib_sources: list[tuple[str, np.ndarray]] = field(default_factory=list, repr=False)
    _lr_cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def _draws(self, n: int) -> list[tuple[int, int, int, int]]:
        """(source index, top, left, mode) of the first n patches (independent of n: one seeded stream)."""
        rng = np.random.RandomState(self.seed)
        order: list[int] = []
        out = []
        for _ in range(n):
            if not order:
                order = list(rng.permutation(len(self._calib_sources)))
            src = int(order.pop(0))
            h, w = self._calib_sources[src][1].shape[:2]
            lh, lw = h // self.scale, w // self.scale
            if lh < self.patch_size or lw < self.patch_size:
                raise UserError(f"calibration image {self._calib_sources[src][0]!r} is smaller than "
                                f"{self.patch_size * self.scale}px: lower dataset.patch_size=")
            top = int(rng.randint(0, lh - self.patch_size + 1))
            left = int(rng.randint(0, lw - self.patch_size + 1))
            out.append((src, top, left, int(rng.randint(0, 8))))
        return out

    def _lr_of(self, src: int) -> np.ndarray:
        if src not in self._lr_cache:
            self._lr_cache[src] = bicubic_down(modcrop(self._calib_sources[src][1], self.scale), self.scale)
        return self._lr_cache[src]

    def calibration_ids(self, n: int | None = None) -> list[str]:
        n = self._check_n(n)
        return [f"{self._calib_sources[s][0]}@{t},{l},m{m}" for s, t, l, m in self._draws(n)]

    def calibration(self, n: int | None = None, augment_: bool = False, draw: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n calibration patches: LR (n, 3, p, p) and HR (n, 3, p·s, p·s), float32 in [0, 1]."""
        n = self._check_n(n)
        p, s = self.patch_size, self.scale
        lrs, hrs = [], []
        for src, top, left, mode in self._draws(n):
            lr = self._lr_of(src)[top:top + p, left:left + p]
            hr = modcrop(self._calib_sources[src][1], s)[top * s:(top + p) * s, left * s:(left + p) * s]
            lrs.append(to_tensor(augment(lr, mode)))
            hrs.append(to_tensor(augment(hr, mode)))
        return torch.stack(lrs), torch.stack(hrs)

    def _check_n(self, n: int | None) -> int:
        n = self.n_calib if n is None else n
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise UserError(f"calibration size must be a positive integer, got {n!r}")
        return int(n)


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    v = cfg.get(key, default) if hasattr(cfg, "get") else default
    return default if v is None else v


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _EXT)


def _find_set(root: Path, name: str) -> Path:
    wanted = {c.lower() for c in TEST_SETS.get(name.lower(), (name,))} | {name.lower()}
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.is_dir() and d.name.lower() in wanted:
                return d
    raise UserError(f"test set {name!r} not found under dataset.root={str(root)!r} (expected a folder named "
                    f"{' or '.join(TEST_SETS.get(name.lower(), (name,)))} holding HR/): fix dataset.root= or dataset.hr_dir=")


def _lr_file(lr_dir: Path, stem: str, scale: int) -> Path | None:
    for cand in (f"{stem}x{scale}", stem, f"{stem}_x{scale}", f"{stem}_LRBI_x{scale}"):
        for ext in _EXT:
            p = lr_dir / f"{cand}{ext}"
            if p.is_file():
                return p
    return None


def _crop_center(img: np.ndarray, size: int, scale: int) -> np.ndarray:
    h, w = img.shape[:2]
    ch, cw = min(h, size) // scale * scale, min(w, size) // scale * scale
    t, l = (h - ch) // 2 // scale * scale, (w - cw) // 2 // scale * scale
    return img[t:t + ch, l:l + cw]


def build_sr_data(cfg: Mapping[str, Any], scale: int, seed: int) -> SRData:
    """SRData from a `dataset=sr_folder` config node for a model of upscaling factor `scale`."""
    name = str(_get(cfg, "name", "set5"))
    lr_source = str(_get(cfg, "lr_source", "auto"))
    if lr_source not in ("auto", "folder", "bicubic"):
        raise UserError(f"dataset.lr_source={lr_source!r}: use auto, folder or bicubic")
    hr_dir = _get(cfg, "hr_dir")
    lr_dir = _get(cfg, "lr_dir")
    root = _get(cfg, "root")
    if hr_dir:
        hr_dir = Path(str(hr_dir)).expanduser()
    else:
        if root:
            set_dir = _find_set(Path(str(root)).expanduser(), name)
        elif name.lower() == "set5":
            set_dir = SET5_ROOT
        else:
            raise UserError(f"dataset.name={name}: only Set5 ships with the project; set dataset.root= to a folder "
                            "holding Set5/ Set14/ B100/ Urban100/ (SwinIR's testsets/ layout)")
        hr_dir = set_dir / "HR"
        if not lr_dir and (set_dir / "LR_bicubic" / f"X{scale}").is_dir():
            lr_dir = set_dir / "LR_bicubic" / f"X{scale}"
    if not hr_dir.is_dir():
        raise UserError(f"HR folder {str(hr_dir)!r} does not exist: fix dataset.root= or dataset.hr_dir=")
    lr_dir = Path(str(lr_dir)).expanduser() if lr_dir else None
    if lr_source == "folder" and lr_dir is None:
        raise UserError(f"dataset.lr_source=folder but no LR_bicubic/X{scale} folder: set dataset.lr_dir=")
    if lr_source == "bicubic":
        lr_dir = None
    files = _images_in(hr_dir)
    n_eval = cfg.get("n_eval") if hasattr(cfg, "get") else None
    if n_eval is not None:
        files = files[: int(n_eval)]
    if not files:
        raise UserError(f"no images in {str(hr_dir)!r}")
    crop = cfg.get("eval_crop") if hasattr(cfg, "get") else None
    images, lr_made = [], 0
    for f in files:
        hr = modcrop(load_rgb(f), scale)
        lr_path = _lr_file(lr_dir, f.stem, scale) if lr_dir is not None else None
        if lr_path is None and lr_source == "folder":
            raise UserError(f"no LR file for {f.name} in {str(lr_dir)!r} (expected {f.stem}x{scale}.png)")
        if lr_path is not None and crop is None:
            lr = load_rgb(lr_path)
            if lr.shape[0] * scale != hr.shape[0] or lr.shape[1] * scale != hr.shape[1]:
                raise UserError(f"LR {lr_path.name} {lr.shape[:2]} x{scale} does not match HR {f.name} {hr.shape[:2]}")
        else:  # small crops for quick runs are downsampled from the cropped HR
            if crop is not None:
                hr = _crop_center(hr, int(crop), scale)
            lr, lr_made = bicubic_down(hr, scale), lr_made + 1
        images.append(SRImage(f.stem, hr, lr))

    calib_root = _get(cfg, "calib_root")
    if calib_root:
        cdir = Path(str(calib_root)).expanduser()
        if not cdir.is_dir():
            raise UserError(f"dataset.calib_root={str(cdir)!r} does not exist (a folder of HR training images, "
                            "e.g. DIV2K_train_HR)")
        paths = _images_in(cdir)
        if not paths:
            raise UserError(f"no images in dataset.calib_root={str(cdir)!r}")
        sources = [(p.name, load_rgb(p)) for p in paths]
    else:
        sources = skimage_photos()
    n_calib = int(_get(cfg, "n_calib", 8))
    patch = int(_get(cfg, "patch_size", 48))
    info = {"test_set": name, "hr_dir": str(hr_dir), "lr_dir": None if lr_dir is None else str(lr_dir),
            "lr_made_by_bicubic": lr_made, "eval_ids": [im.name for im in images], "eval_crop": crop,
            "calib_source": str(calib_root) if calib_root else "scikit-image photos: " + ",".join(SKIMAGE_PHOTOS),
            "patch_size": patch, "scale": scale}
    data = SRData(name, scale, seed, n_calib, patch, info, images, sources)
    info["calib_ids"] = data.calibration_ids(n_calib)
    return data
