"""Rebuild a finished run's fake-quant model from its saved stages, without re-quantizing.

The run's method itself rebuilds the model (its own wrapping, structural changes and state loading),
driven by a stage cache that may only *load*: the first stage whose result is not on disk raises a
one-line UserError instead of being computed, and no calibration data is drawn (the method gets a
data stand-in whose images are empty; methods touch images only inside stage computations). Nothing
is written into the run dir (stage events are kept in memory).

Which file each stage loads: `stages.load.<stage>` from the run config, else the file the run itself
last computed or loaded for that stage (`stages/events.jsonl`), else the signature lookup of the stage
cache. Going by the run's own record keeps a finished run exportable after config files it resolved
at run time (e.g. `conf/dataset/*.yaml` behind `dataset=auto`) have changed.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from common.errors import UserError

__all__ = ["LoadedRun", "read_run_config", "load_run", "model_info"]


class _StageMissing(UserError):
    pass


def read_run_config(run_dir: str | Path) -> DictConfig:
    """The run's composed config (`.hydra/config.yaml`), with cheap checks: a run dir of a quantizing method
    with saved stages. Raises UserError otherwise."""
    from common.run.config import register_resolvers, resolve_dataset

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run dir {str(run_dir)!r} does not exist: pass a folder written by run.py "
                        "(outputs/runs/<model>-<method>-<bits>/<time>)")
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run dir: it has no .hydra/config.yaml (pass the folder run.py wrote)")
    register_resolvers()
    cfg = OmegaConf.load(path)
    for key in ("model", "bits", "method", "dataset"):
        if key not in cfg:
            raise UserError(f"{path} has no `{key}` section: not a vitq run config")
    task = (cfg.get("task") or {}).get("name", "classification")
    if task != "classification":
        raise UserError(f"run {run_dir} is a task={task} run; export handles classification runs (timm ViT/DeiT/Swin)")
    if cfg.method.name == "fp":
        raise UserError(f"run {run_dir} used method=fp: it has no quantization stage to export")
    resolve_dataset(cfg)
    stage_dirs = [run_dir / "stages"] + ([Path(str(cfg.stages.shared_dir))] if cfg.stages.get("shared_dir") else [])
    explicit = [v for v in (cfg.stages.get("load") or {}).values() if v]
    found = any(p.name.split("-")[0] != "fp_eval" for d in stage_dirs if d.is_dir() for p in d.glob("*.pt"))
    if not found and not explicit:
        raise UserError(f"run {run_dir} has no finished quantization stage (no stages/*.pt besides fp_eval): "
                        "let the run finish (re-run it into the same dir to resume) before exporting")
    return cfg


def _recorded_stages(run_dir: Path) -> dict[str, str]:
    """Stage name -> the file the run last computed or loaded for it (from stages/events.jsonl)."""
    path = run_dir / "stages" / "events.jsonl"
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(ev, dict) or ev.get("event") not in ("computed", "loaded") or ev.get("stage") == "fp_eval":
            continue
        file = Path(ev["path"]) if ev.get("path") else run_dir / "stages" / f"{ev['stage']}-{ev.get('sig')}.pt"
        if file.is_file():
            out[str(ev["stage"])] = str(file)
    return out


class _LoadOnlyStages:
    """A StageCache that loads saved results and refuses to compute; events are kept in memory."""

    def __init__(self, run_dir: Path, cfg: DictConfig):
        from common.run.stages import StageCache

        explicit = _recorded_stages(run_dir)
        if cfg.stages.get("load"):
            explicit.update({k: v for k, v in OmegaConf.to_container(cfg.stages.load, resolve=True).items() if v})
        self.run_dir = run_dir
        self.events: list[dict] = []
        cache = StageCache.__new__(StageCache)  # __init__ would create folders in the run dir
        cache.dir = run_dir / "stages"
        cache.shared = Path(str(cfg.stages.shared_dir)) if cfg.stages.get("shared_dir") else None
        cache.reuse = True
        cache.explicit = {k: v for k, v in (explicit or {}).items() if v}
        cache._log = lambda **event: self.events.append(event)  # type: ignore[method-assign]
        self.cache = cache
        self.dir, self.shared, self.reuse, self.explicit = cache.dir, cache.shared, cache.reuse, cache.explicit

    def path(self, name: str, sig: str) -> Path:
        return self.cache.path(name, sig)

    def run(self, name: str, key: Any, compute):
        def refuse() -> dict:
            raise _StageMissing(f"run {self.run_dir} has no finished `{name}` stage matching its config (stages/"
                                f"{name}-*.pt missing or from other settings): finish the run (re-run it into the "
                                "same dir) before exporting; export never re-quantizes")
        return self.cache.run(name, key, refuse)


class _NullTracker:
    def log(self, *args, **kwargs) -> None: ...
    def log_curve(self, *args, **kwargs) -> None: ...
    def summary(self, *args, **kwargs) -> None: ...
    def finish(self) -> None: ...


class _NoCalibrationData:
    """Stand-in for PTQData while replaying: empty calibration images (only stage computations use them)."""

    info: dict = {}
    n_calib_available = 0

    def calibration(self, n: int | None = None, augment: bool = False, draw: int = 0):
        return torch.empty(0), torch.empty(0, dtype=torch.long)

    def calibration_ids(self, n: int | None = None) -> list:
        return []


def model_info(cfg: DictConfig) -> dict[str, Any]:
    """What the packed checkpoint records about the architecture: zoo name, timm name and kwargs."""
    m = OmegaConf.to_container(cfg.model, resolve=True)
    timm_name = m.get("timm_name") or m["name"]
    return {"name": m["name"], "timm_name": timm_name, "kwargs": dict(m.get("kwargs") or {}),
            "family": m.get("family"),
            "register_module": "common.models.demo" if timm_name == "vit_digits" else None}


@dataclass
class LoadedRun:
    """A finished run: its config, FP model and the rebuilt fake-quant model (CPU, eval, weights not frozen)."""

    run_dir: Path
    cfg: DictConfig
    fp_model: nn.Module
    model: nn.Module
    results: dict[str, Any] = field(default_factory=dict)
    stage_events: list[dict] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str(self.cfg.method.name)

    def plain_config(self) -> dict[str, Any]:
        """The run config as plain data (sections that need Hydra's runtime node stay unresolved)."""
        out: dict[str, Any] = {}
        for k in self.cfg:
            node = self.cfg[k] if OmegaConf.is_config(self.cfg[k]) else None
            try:
                out[k] = OmegaConf.to_container(node, resolve=True) if node is not None else self.cfg[k]
            except Exception:
                out[k] = OmegaConf.to_container(node, resolve=False)
        return out

    def eval_data(self):
        """The run's data (eval set as in the run; building it may read the dataset)."""
        from common.data import build_data

        return build_data(self.cfg.dataset, self.fp_model, int(self.cfg.seed))


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild the final fake-quant model of a finished run (see module docstring). Raises UserError."""
    from common.models.zoo import build_model
    from common.run.config import seed_everything
    from common.run.experiment import checkpoint_id as _checkpoint_id  # the stage-signature identity of the weights
    from common.run.registry import RunContext, get_method

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    method_cls = get_method(cfg.method.name, cfg.method.get("module"))
    fp_model = build_model(cfg.model)
    base_key = {"model": OmegaConf.to_container(cfg.model, resolve=True),
                "checkpoint": _checkpoint_id(cfg.model.get("checkpoint")),
                "dataset": OmegaConf.to_container(cfg.dataset, resolve=True), "seed": int(cfg.seed)}
    stages = _LoadOnlyStages(run_dir, cfg)
    ctx = RunContext(cfg, run_dir, torch.device("cpu"), stages, _NullTracker(), base_key, {})  # type: ignore[arg-type]
    method = method_cls(cfg.method, ctx)
    seed_everything(int(cfg.seed))
    with torch.no_grad():
        model = method.quantize(copy.deepcopy(fp_model), _NoCalibrationData())
    model = model.cpu().eval()
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    return LoadedRun(run_dir, cfg, fp_model, model, results, stages.events)
