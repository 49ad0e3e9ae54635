"""PTQ method registry and the base class every method plugs into.

A method is a class registered under a short name (`@register_method("erq")`); `conf/method/<name>.yaml`
carries `name:` plus its hyper-parameters (and `module:` naming the package that registers it), and
the pipeline does one lookup. Methods get a `RunContext` with the stage cache, tracker, device and
timings, so each method file holds only its own maths.
"""
from __future__ import annotations

import contextlib
import fnmatch
import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from common.errors import UserError
from common.quant.scheme import QuantScheme
from common.run.stages import StageCache
from common.run.tracking import Tracker

__all__ = ["RunContext", "PTQMethod", "register_method", "get_method", "list_methods", "scheme_from_bits"]

_METHODS: dict[str, type["PTQMethod"]] = {}


@dataclass
class RunContext:
    """Everything a method needs from the run besides the model and data."""

    cfg: DictConfig
    run_dir: Path
    device: torch.device
    stages: StageCache
    tracker: Tracker
    base_key: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, stage: str):
        """Accumulate wall time of a stage into `timings[stage]` (seconds)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = round(self.timings.get(stage, 0.0) + time.perf_counter() - t0, 3)

    def stage(self, name: str, key: Any, compute: Callable[[], dict]) -> tuple[dict, str]:
        """Cached stage: `key` is combined with the run's base key (model, checkpoint, data, seed)."""
        with self.timed(name):
            return self.stages.run(name, {"base": self.base_key, "key": key}, compute)


class PTQMethod:
    """Base class. Subclasses implement `quantize(model, data) -> quantized model`."""

    name: ClassVar[str] = ""
    #: tasks the method has a path for (`task=sr` refuses a method without "sr", see common.run.sr)
    tasks: ClassVar[tuple[str, ...]] = ("classification",)

    def __init__(self, cfg: DictConfig, ctx: RunContext):
        self.cfg = cfg
        self.ctx = ctx

    @property
    def bits(self) -> DictConfig:
        return self.ctx.cfg.bits

    def n_calib(self) -> int:
        """Number of calibration images this method draws (results.json `n_calib` = `images.calibration`)."""
        return int(self.cfg.get("n_calib", 0) or 0)

    def images(self, data) -> dict[str, int]:
        """Images each stage of this method uses, by stage (results.json `images`, next to `eval`).

        Every count is a prefix of the one calibration order of `data` (`data.calibration_ids(n)`).
        Default: `{"calibration": n_calib}` (none for a method that draws nothing); methods with
        several stages name each (APHQ: `mr`, `calibration`, `reconstruction`)."""
        n = self.n_calib()
        return {"calibration": n} if n > 0 else {}

    def config_key(self) -> dict:
        """The method + bits config as a plain dict (for stage signatures)."""
        return {"method": OmegaConf.to_container(self.cfg, resolve=True),
                "bits": OmegaConf.to_container(self.bits, resolve=True)}

    def quantize(self, model: nn.Module, data) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError


def scheme_from_bits(bits: DictConfig, **overrides) -> QuantScheme:
    """QuantScheme with the bit-widths of a `bits` config and method-specific placement overrides."""
    return QuantScheme(w_bit=int(bits.w_bit), a_bit=int(bits.a_bit),
                       patch_embed_a_bit=int(bits.get("patch_embed_a_bit", 32)),
                       head_a_bit=bits.get("head_a_bit"), head_w_bit=bits.get("head_w_bit"), **overrides)


def register_method(name: str):
    """Class decorator registering a PTQ method under `name`."""
    def deco(cls: type[PTQMethod]) -> type[PTQMethod]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method name {name!r} registered twice ({_METHODS[name].__name__}, {cls.__name__})")
        cls.name = name
        _METHODS[name] = cls
        return cls
    return deco


def get_method(name: str, module: str | None = None) -> type[PTQMethod]:
    """Look a method up, importing `module` (the package that registers it) first."""
    for mod in filter(None, [module, "common.run.baselines"]):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            raise UserError(f"method {name!r} needs module {mod!r}, which cannot be imported ({exc}); "
                            "check `method.module` in conf/method/") from exc
    if name not in _METHODS:
        raise UserError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))} (pick with method=NAME)")
    return _METHODS[name]


def list_methods(pattern: str = "*") -> list[str]:
    return sorted(n for n in _METHODS if fnmatch.fnmatch(n, pattern))
