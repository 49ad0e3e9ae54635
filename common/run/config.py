"""Config helpers: resolvers, early validation with one-line errors, and the `auto` dataset choice."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from common.errors import UserError

__all__ = ["CONF_DIR", "PROJECT_ROOT", "register_resolvers", "validate", "resolve_dataset",
           "seed_everything", "select_device", "set_precision", "check_group_choice",
           "group_options", "model_node", "asset_path", "slurm_gpus", "apply_data_preset"]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_ROOT / "conf"
COMMON = PROJECT_ROOT / "common"
GROUPS = ("task", "model", "bits", "method", "dataset", "logger", "launcher", "experiment")

def register_resolvers() -> None:
    """`${vitq.asset:NAME}` -> path of a packaged asset (`common/<part>/assets/NAME`); `${vitq.root:}` -> the root;
    `${vitq.slurm_gpus:VALUE,DEVICE,MODEL}` -> the GPUs a SLURM job asks for (`slurm_gpus`)."""
    if not OmegaConf.has_resolver("vitq.asset"):
        OmegaConf.register_new_resolver("vitq.asset", asset_path)
    if not OmegaConf.has_resolver("vitq.root"):
        OmegaConf.register_new_resolver("vitq.root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("vitq.slurm_gpus"):
        OmegaConf.register_new_resolver("vitq.slurm_gpus", slurm_gpus)


#: Models that run on CPU by default (device=auto): their SLURM jobs ask for no GPU.
CPU_MODELS = ("demo", "swinir_demo")


def slurm_gpus(value: Any, device: Any, model: Any) -> int | None:
    """`cluster.gpus_per_node` as sbatch gets it. A number (or null: no request) wins; `auto` is 0 for a CPU
    job (device=cpu, or a CPU model such as the demo with device=auto) and 1 otherwise (device=cuda[:N],
    or an ImageNet model with device=auto)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    if value != "auto":
        raise UserError(f"cluster.gpus_per_node={value!r} is invalid: use auto, null or a number of GPUs >= 0")
    dev = str(device)
    if dev == "cpu":
        return 0
    if dev.startswith("cuda"):
        return 1
    return 0 if str(model) in CPU_MODELS or str(model).endswith("_demo") else 1  # every bundled *_demo runs on CPU


def asset_path(name: str) -> str:
    """The one packaged asset called `name` under `common/*/assets/` or `common/tasks/*/assets/` (each part ships its own)."""
    hits = sorted(COMMON.glob(f"*/assets/{name}")) + sorted(COMMON.glob(f"tasks/*/assets/{name}"))
    if len(hits) != 1:
        raise UserError(f"asset {name!r}: expected one common/<part>/assets/{name}, found {len(hits)}")
    return str(hits[0])


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def model_node(name: str, **overrides: Any) -> dict[str, Any]:
    """`conf/model/NAME.yaml` as a plain dict (the one source of a model's timm name and family), resolved."""
    check_group_choice("model", name)
    register_resolvers()
    node = OmegaConf.merge(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"), overrides)
    return OmegaConf.to_container(node, resolve=True)


def check_group_choice(group: str, choice: str) -> None:
    """One-line error for an unknown config-group option (before Hydra's multi-line one)."""
    if group in GROUPS and choice not in ("null", "") and not (CONF_DIR / group / f"{choice}.yaml").is_file():
        raise UserError(f"unknown {group} {choice!r}; available: {', '.join(group_options(group))} "
                        f"(use {group}=NAME, or add conf/{group}/{choice}.yaml)")


def _check_bits(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not (2 <= value <= 8 or value == 32):
        raise UserError(f"bits.{name}={value!r} is out of range: use an integer in 2..8, or 32 to keep FP")


def validate(cfg: DictConfig) -> None:
    """Cheap checks that run before any model or data is loaded."""
    bits = cfg.bits
    for key in ("w_bit", "a_bit", "patch_embed_a_bit", "head_a_bit", "head_w_bit"):
        _check_bits(key, bits.get(key))
    task, model_task = (cfg.get("task") or {}).get("name", "classification"), cfg.model.get("task", "classification")
    if task != model_task:
        raise UserError(f"model {cfg.model.name!r} is a {model_task} model but task={task}: "
                        f"use task={model_task}, or a {task} model")
    if task == "classification" and not cfg.model.get("timm_name"):
        raise UserError(f"model {cfg.model.name!r} has no timm_name; available: {', '.join(group_options('model'))}")
    if cfg.device not in ("auto", "cpu") and not str(cfg.device).startswith("cuda"):
        raise UserError(f"device={cfg.device!r} is not supported: use auto, cpu or cuda[:N]")
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={cfg.device} requested but CUDA is not available; use device=auto or device=cpu")
    # dataset folders: checked here so a typo fails before the model (maybe a large checkpoint) is loaded
    dataset, root = cfg.dataset.get("name"), cfg.dataset.get("root")
    if dataset == "imagenet" and root in (None, ""):
        raise UserError("dataset.root is not set: set `dataset.root=/path/to/imagenet` (holding train/ and val/)")
    if dataset in ("imagenet", "imagenet_sample") and root not in (None, "") and not Path(str(root)).expanduser().is_dir():
        raise UserError(f"dataset root {str(root)!r} does not exist: set `dataset.root=` to a folder holding "
                        + ("train/ and val/" if dataset == "imagenet" else "val/<wnid>/*.JPEG"))


def resolve_dataset(cfg: DictConfig) -> None:
    """Replace `dataset: auto` by the model's `default_dataset` config, keeping user overrides; then fill
    the dataset's null data keys from the method's reference preset (`apply_data_preset`)."""
    if cfg.dataset.get("name") == "auto":
        default = cfg.model.get("default_dataset", "imagenet_sample")
        check_group_choice("dataset", default)
        base = OmegaConf.load(CONF_DIR / "dataset" / f"{default}.yaml")
        user = {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=False).items()
                if k != "name" and v is not None}
        with open_dict(cfg):
            cfg.dataset = OmegaConf.merge(base, user)
    apply_data_preset(cfg)


#: Datasets the methods' `data:` presets apply to (the references' ImageNet handling; the demo keeps its own).
PRESET_DATASETS = ("imagenet", "imagenet_sample")
#: Keys of a method's `data:` preset, each filling the dataset key of the same name when that is null.
PRESET_KEYS = ("crop_pct", "calib_draw", "calib_seed")


def apply_data_preset(cfg: DictConfig) -> None:
    """Fill `dataset.crop_pct / calib_draw / calib_seed` (where null) from `method.data` (docs/reproducing.md).

    `method.data.crop_pct` is `timm` (leave timm's data config), a number, or a mapping from `model.series`
    (deit / vit / swin) to a crop, as ERQ / RepQ-ViT pick it by model name. Only for ImageNet folders; what was
    filled is recorded in `dataset.preset` (results.json `data.preset`). A set dataset key always wins.
    Idempotent (a second call changes nothing).
    """
    preset = cfg.method.get("data") if "method" in cfg else None
    if not preset or cfg.dataset.get("name") not in PRESET_DATASETS or cfg.dataset.get("preset") is not None:
        return
    filled = []
    with open_dict(cfg):
        for key in PRESET_KEYS:
            value = preset.get(key)
            if value is None or cfg.dataset.get(key) is not None:
                continue
            how = ""
            if key == "crop_pct" and OmegaConf.is_dict(value):
                series = cfg.model.get("series")
                if series not in value:
                    continue  # a series the method does not name: timm's data config
                value, how = value[series], f" (series {series})"
            if key == "crop_pct" and value == "timm":
                filled.append("crop_pct=timm")
                continue
            cfg.dataset[key] = value
            filled.append(f"{key}={value}{how}")
        cfg.dataset.preset = f"method {cfg.method.name}: " + ", ".join(filled) if filled else "none"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_precision(tf32: bool) -> None:
    """Strict fp32 by default (the methods' numerics depend on it); TF32 only when asked for."""
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
