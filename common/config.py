"""Config helpers: resolvers, early validation with one-line errors, and the `auto` dataset choice."""
from __future__ import annotations

import random
import warnings
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from .errors import UserError

__all__ = ["CONF_DIR", "PROJECT_ROOT", "ASSETS", "register_resolvers", "validate", "resolve_dataset",
           "seed_everything", "select_device", "set_precision", "check_group_choice", "dataclass_from"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"
ASSETS = Path(__file__).resolve().parent / "assets"
GROUPS = ("model", "bits", "method", "dataset", "logger", "launcher", "experiment")

_D = TypeVar("_D")


def dataclass_from(cls: type[_D], cfg: Any = None, ignored: Iterable[str] = (), label: str = "",
                   **overrides: Any) -> _D:
    """A settings dataclass `cls` from an instance, dict, DictConfig or namespace (+ keyword overrides).

    Keys that are neither fields of `cls` nor in `ignored` (config keys read elsewhere) trigger one
    warning naming them, so a typo in a config node does not pass silently.
    """
    if is_dataclass(cfg) and isinstance(cfg, cls):
        values = asdict(cfg)
    elif cfg is None:
        values = {}
    else:
        values = dict(cfg.items()) if isinstance(cfg, Mapping) or hasattr(cfg, "items") else dict(vars(cfg))
    values.update(overrides)
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known - set(ignored)
    if unknown:
        warnings.warn(f"{label or cls.__name__}: ignoring unknown config keys {sorted(unknown)}", stacklevel=3)
    return cls(**{k: v for k, v in values.items() if k in known})


def register_resolvers() -> None:
    """`${vitq.asset:NAME}` -> path of a packaged asset; `${vitq.root:}` -> the project root."""
    if not OmegaConf.has_resolver("vitq.asset"):
        OmegaConf.register_new_resolver("vitq.asset", lambda name: str(ASSETS / name))
    if not OmegaConf.has_resolver("vitq.root"):
        OmegaConf.register_new_resolver("vitq.root", lambda: str(PROJECT_ROOT))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


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
    from .zoo import MODEL_ZOO

    if cfg.model.name not in MODEL_ZOO and not cfg.model.get("timm_name"):
        raise UserError(f"unknown model {cfg.model.name!r}; available: {', '.join(MODEL_ZOO)}")
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
    """Replace `dataset: auto` by the model's `default_dataset` config, keeping user overrides."""
    if cfg.dataset.get("name") != "auto":
        return
    default = cfg.model.get("default_dataset", "imagenet_sample")
    check_group_choice("dataset", default)
    base = OmegaConf.load(CONF_DIR / "dataset" / f"{default}.yaml")
    user = {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=False).items()
            if k != "name" and v is not None}
    with open_dict(cfg):
        cfg.dataset = OmegaConf.merge(base, user)


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
