"""What every task's runner shares: set-up, the stage context, the quantize step and the results write-out.

`common.run.pipeline.run` (classification), `common.run.sr.run_sr` and `common.run.detection.run_detection`
differ only in how they build the model and data and what they measure; the order of seeding, the stage
cache, the tracker's life cycle and `results.json` are the same and live here once.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from common.errors import UserError
from common.run.config import register_resolvers, resolve_dataset, seed_everything, select_device, set_precision, validate
from common.run.registry import PTQMethod, RunContext, get_method
from common.run.stages import StageCache
from common.run.tracking import Tracker, build_tracker

__all__ = ["Experiment", "start", "run_dir_of", "checkpoint_id", "TASK_NAMES"]
log = logging.getLogger(__name__)

#: task -> (what a refusal calls it, the docs page that lists the methods with that path)
TASK_NAMES = {"classification": ("classification", "README.md"), "sr": ("super-resolution", "docs/sr.md"),
              "detection": ("detection", "docs/detection.md")}


def run_dir_of(cfg: DictConfig) -> Path:
    """The job's output dir: Hydra's runtime dir when under Hydra, else `cfg.run_dir`."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return Path(cfg.get("run_dir") or "outputs/run")


def checkpoint_id(path: str | None) -> Any:
    """Identity of the weights file for stage signatures: path, size and a content hash (a checkpoint
    replaced in place, e.g. a retrained demo, has the same path and size but must not reuse old stages)."""
    import hashlib

    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        return {"path": str(p), "size": None}
    digest = hashlib.sha1()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return {"path": str(p), "size": p.stat().st_size, "sha1": digest.hexdigest()}


def overrides() -> list[str]:
    """The job's command-line overrides (empty outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:
        return []


def _debug_sleep_after_stage(stages: StageCache, delays: Any) -> None:
    """Test/debug only: `+debug.sleep_after_stage.<stage>=SECONDS` sleeps after COMPUTING that stage (not
    after loading it), so a preemption test can signal a job while a finished stage is already saved."""
    if not delays:
        return
    delays, run_stage = dict(delays), stages.run

    def run(name: str, key: Any, compute):
        computed = []
        out = run_stage(name, key, lambda: computed.append(1) or compute())
        if computed and name in delays:
            log.warning("debug.sleep_after_stage: sleeping %ss after stage %s", delays[name], name)
            time.sleep(float(delays[name]))
        return out

    stages.run = run  # type: ignore[method-assign]


@dataclass
class Experiment:
    """One run in progress: its config, method class, run dir, device, tracker and stage timings."""

    cfg: DictConfig
    method_cls: type[PTQMethod]
    run_dir: Path
    device: torch.device
    tracker: Tracker
    timings: dict[str, float] = field(default_factory=dict)

    def context(self, base_key: dict[str, Any]) -> RunContext:
        """The methods' view of the run: the stage cache keyed by `base_key` (model, weights, data, seed)."""
        cfg = self.cfg
        stages = StageCache(self.run_dir, cfg.stages.get("shared_dir"), bool(cfg.stages.reuse),
                            OmegaConf.to_container(cfg.stages.load, resolve=True) if cfg.stages.get("load") else {})
        _debug_sleep_after_stage(stages, (cfg.get("debug") or {}).get("sleep_after_stage"))
        return RunContext(cfg, self.run_dir, self.device, stages, self.tracker, base_key, self.timings)

    def quantize(self, ctx: RunContext, model: nn.Module, data: Any,
                 after: Callable[[PTQMethod, nn.Module], None] | None = None) -> tuple[PTQMethod, nn.Module]:
        """Quantize a copy of `model` with the run's method (re-seeded, timed as `quantize`), then freeze
        its weights; `after(method, qmodel)` runs inside the timed block (task-specific fill-ins)."""
        method = self.method_cls(self.cfg.method, ctx)
        seed_everything(int(self.cfg.seed))
        with ctx.timed("quantize"):
            qmodel = method.quantize(copy.deepcopy(model).to(self.device), data)
            if after is not None:
                after(method, qmodel)
        for m in qmodel.modules():
            if hasattr(m, "freeze_weight"):
                m.freeze_weight()
        return method, qmodel

    def finish(self, results: dict[str, Any], table: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
        """Add the run's provenance, log and save `results.json`, print `table(results)`; returns results."""
        results.update({"seed": int(self.cfg.seed), "device": str(self.device), "timings": dict(self.timings)})
        results.setdefault("run_dir", str(self.run_dir))
        results.setdefault("overrides", overrides())
        self.tracker.log({"event": "final", **{k: v for k, v in results.items() if isinstance(v, (int, float))}})
        self.tracker.summary(results)
        (self.run_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
        print(table(results))
        return results


@contextlib.contextmanager
def start(cfg: DictConfig, task: str = "classification", resolve: bool = True) -> Iterator[Experiment]:
    """Validate `cfg` (one-line errors before any loading), check the method has a `task` path, seed,
    and open the tracker; the tracker is finished however the run ends."""
    register_resolvers()
    if resolve:
        resolve_dataset(cfg)
    validate(cfg)
    method_cls = get_method(cfg.method.name, cfg.method.get("module"))
    if task not in getattr(method_cls, "tasks", ("classification",)):
        label, doc = TASK_NAMES.get(task, (task, "README.md"))
        raise UserError(f"method {cfg.method.name!r} has no {label} path (task={task}); pick a method listed in "
                        f"{doc}")
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(int(cfg.seed))
    set_precision(bool(cfg.precision.tf32))
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    device = select_device(str(cfg.device))
    tracker = build_tracker(cfg, run_dir)
    try:
        yield Experiment(cfg, method_cls, run_dir, device, tracker)
    finally:
        tracker.finish()
