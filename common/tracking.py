"""Run tracking: `metrics.jsonl` in the run dir (always), plus Weights & Biases when configured.

`Tracker.log(metrics, step=None)` writes one JSON line (with a wall-clock time) and forwards to W&B;
curves (e.g. per-unit reconstruction loss) are logged with a `curve` key and their own step so they
can be plotted per unit. `finish()` must be called inside each job so multirun jobs never merge.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["Tracker", "build_tracker"]


class Tracker:
    """Fan-out logger: jsonl file + optional wandb run."""

    def __init__(self, run_dir: str | Path, wandb_run: Any = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.wandb = wandb_run

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        rec = {"time": round(time.time(), 3), **({"step": step} if step is not None else {}), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, default=float) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    def log_curve(self, curve: str, step: int, **values: float) -> None:
        """One point of a named curve, e.g. log_curve('recon/blocks.3', 100, loss=0.12)."""
        rec = {"time": round(time.time(), 3), "curve": curve, "step": step, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, default=float) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"{curve}/{k}": v for k, v in values.items()} | {f"{curve}/step": step})

    def summary(self, results: dict[str, Any]) -> None:
        if self.wandb is not None:
            for k, v in results.items():
                if isinstance(v, (int, float, str)):
                    self.wandb.summary[k] = v

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def build_tracker(cfg: DictConfig, run_dir: str | Path) -> Tracker:
    """Tracker from `cfg.logger` (name: jsonl | wandb | none); jsonl is always written."""
    logger = cfg.get("logger") or {}
    if logger.get("name") != "wandb":
        return Tracker(run_dir)
    import wandb

    mode = os.environ.get("WANDB_MODE", logger.get("mode", "offline"))
    run = wandb.init(
        project=logger.get("project", "vitq"), entity=logger.get("entity"), group=logger.get("group"),
        job_type=logger.get("job_type"), tags=list(logger.get("tags") or []), name=logger.get("run_name"),
        dir=str(run_dir), mode=mode, reinit="finish_previous",
        config=OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False),
    )
    return Tracker(run_dir, run)
