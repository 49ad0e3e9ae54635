"""Run tracking: `metrics.jsonl` in the run dir (always), plus Weights & Biases when `logger=wandb`.

Record protocol (what methods call, what `python -m common.report` and the tests read back):

* `tracker.log({"stage": "aphq_calibrate", "calib_top1": 71.2, ...})`: one JSON line with a wall-clock
  `time`; numbers go to W&B as `<stage>/<key>` (or `<event>/<key>` for records with an `event` but no
  `stage`; the pipeline's `event: final` record is logged unprefixed: `quant_top1`, `fp_top1`, ...). With
  `step=` the record also carries `step` and W&B plots those keys against `<stage>/step`.
* `tracker.log_curve("block_recon/blocks.3", step, loss=0.12)`: one point of a per-unit curve, e.g. a
  reconstruction loss against the iteration. Name curves `<stage>/<unit>`; W&B gets `<curve>/<value>`
  plotted against `<curve>/step` ('.' becomes '_' in W&B names: `blocks_3`); the report draws a line per unit.
* `tracker.summary(results)`: final values (nested dicts flattened, e.g. `timings/quantize`).
* `finish()`: must run inside each job so multirun jobs never merge into one W&B run.

Every tracker start appends a `{"event": "start", "attempt": n, ...}` record, so a run dir that was resumed
(re-run locally, or requeued by SLURM after preemption) shows one start per attempt. W&B: group = the sweep
id, job_type = method, tags = [method, model, bits], name = the job's overrides, config = the resolved
config. `WANDB_MODE` (online | offline | disabled) overrides `logger.mode`. An online run resumes the same
W&B run after a requeue (the id is derived from the run dir); offline runs cannot be resumed (wandb #2423),
so each attempt gets its own id (`<id>-a<n>`) in the same group.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["Tracker", "build_tracker", "wandb_identity", "job_name", "flatten", "hydra_info", "INFRA_OVERRIDE"]

_MAX_NAME = 128  # W&B limit for names and groups


def _number(v: Any) -> bool:
    """Plain numbers W&B can chart (bools count as 0/1)."""
    return isinstance(v, (int, float))


def _wb(name: str) -> str:
    """W&B-safe key part: '.' (module paths like `blocks.3`) becomes '_', as W&B nests on dots."""
    return name.replace(".", "_")


# Overrides that never change a result: infrastructure, paths, logging. Left out of W&B run names and of the
# report's row labels (common.report), whatever `hydra.job.config.override_dirname.exclude_keys` says.
INFRA_OVERRIDE = re.compile(
    r"^(launcher|logger|device|num_threads|local)$"
    r"|^(hydra|logger|cluster|stages|debug)\."
    r"|^model\.(checkpoint|pretrained)$|^dataset\.(root|num_workers|eval_batch_size)$"
    r"|\.log_every$")


def job_name(overrides: list[str]) -> str:
    """`bits=w4a4,method=erq,method.coe=1000,model=deit_s` from the job's overrides, infrastructure left out."""
    keep = []
    for ov in overrides:
        key = str(ov).lstrip("+~").split("=", 1)[0]
        if not INFRA_OVERRIDE.search(key):
            keep.append(str(ov).lstrip("+~"))
    return ",".join(sorted(keep))


def flatten(d: dict[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """{'timings': {'load': 1.0}} -> {'timings/load': 1.0}; lists and other objects are dropped."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key, sep))
        elif isinstance(v, (int, float, str)) or v is None:
            out[key] = v
    return out


class Tracker:
    """Fan-out logger: `metrics.jsonl` in the run dir + an optional W&B run."""

    def __init__(self, run_dir: str | Path, wandb_run: Any = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.wandb = wandb_run
        self._step_metrics: set[str] = set()

    def _write(self, rec: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, default=float) + "\n")

    def _define_step(self, prefix: str) -> None:
        """Plot `<prefix>/*` against `<prefix>/step` in W&B (curves have their own x axis).

        `prefix` must already be W&B-safe (`_wb`): W&B reads '.' in a step metric as nesting."""
        if self.wandb is not None and prefix not in self._step_metrics:
            self.wandb.define_metric(f"{prefix}/step")
            self.wandb.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
            self._step_metrics.add(prefix)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """One record of stage metrics (see the module docstring for the `stage` key)."""
        rec = {"time": round(time.time(), 3), **({"step": step} if step is not None else {}), **metrics}
        self._write(rec)
        if self.wandb is None:
            return
        group = metrics.get("stage") or (metrics.get("event") if metrics.get("event") != "final" else None)
        stage = _wb(group) if isinstance(group, str) else None
        nums = {(f"{stage}/{k}" if stage else k): v for k, v in metrics.items()
                if _number(v) and k != "step"}
        if step is not None and stage:
            self._define_step(stage)
            nums[f"{stage}/step"] = step
        if nums:
            self.wandb.log(nums)

    def log_curve(self, curve: str, step: int, **values: float) -> None:
        """One point of a named curve, e.g. log_curve('block_recon/blocks.3', 100, loss=0.12)."""
        rec = {"time": round(time.time(), 3), "curve": curve, "step": step, **values}
        self._write(rec)
        if self.wandb is not None:
            name = _wb(curve)
            self._define_step(name)
            self.wandb.log({f"{name}/{k}": v for k, v in values.items()} | {f"{name}/step": step})

    def summary(self, results: dict[str, Any]) -> None:
        """Final values into the W&B run summary (nested dicts flattened: `timings/<stage>`)."""
        if self.wandb is not None:
            for k, v in flatten(results).items():
                if v is not None:
                    self.wandb.summary[k] = v

    def finish(self) -> None:
        """Close the W&B run (idempotent). Call inside each job."""
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


# --------------------------------------------------------------------------- identity and start-up


def hydra_info() -> dict[str, Any]:
    """What Hydra knows about this job (empty outside Hydra): mode, sweep dir, job num, overrides."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except Exception:
        return {}
    multirun = hc.mode == RunMode.MULTIRUN
    return {
        "multirun": multirun,
        "sweep_dir": str(hc.sweep.dir) if multirun else None,
        "job_num": int(hc.job.num) if multirun and hc.job.get("num") is not None else None,
        "overrides": list(hc.overrides.task),
        "output_dir": str(hc.runtime.output_dir),
    }


def wandb_identity(cfg: DictConfig, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """group / job_type / tags / name of the W&B run, from `cfg.logger` or derived from the job.

    group: the sweep id, i.e. the sweep dir's last two path parts (`multirun-20250101-120000`,
    `aphq_table-20250101-120000`), so every job of one sweep lands in one group; none for single runs.
    """
    logger = cfg.get("logger") or {}
    info = hydra_info() if info is None else info
    method, model, bits = (str(cfg.get(g, {}).get("name", "")) for g in ("method", "model", "bits"))
    group = logger.get("group")
    if not group and info.get("sweep_dir"):
        group = "-".join(Path(info["sweep_dir"]).parts[-2:])
    tags = list(dict.fromkeys([t for t in (method, model, bits) if t] + [str(t) for t in logger.get("tags") or []]))
    name = logger.get("run_name") or job_name(info.get("overrides") or []) or f"{model}-{method}-{bits}"
    return {"group": str(group)[-_MAX_NAME:] if group else None, "job_type": logger.get("job_type") or method,
            "tags": [t[:64] for t in tags], "name": str(name)[:_MAX_NAME]}


def _attempt(path: Path) -> int:
    """How many times a tracker already started in this run dir (0 on the first attempt)."""
    if not path.is_file():
        return 0
    with open(path) as f:
        return sum(1 for line in f if '"event": "start"' in line)


def build_tracker(cfg: DictConfig, run_dir: str | Path) -> Tracker:
    """Tracker from `cfg.logger` (name: jsonl | wandb | none); `metrics.jsonl` is always written."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    attempt = _attempt(run_dir / "metrics.jsonl")
    info = hydra_info()
    start = {"event": "start", "attempt": attempt, "host": socket.gethostname(), "pid": os.getpid(),
             "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
             "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)}
    logger = cfg.get("logger") or {}
    mode = os.environ.get("WANDB_MODE") or logger.get("mode") or "online"
    run = None
    if logger.get("name") == "wandb" and mode != "disabled":
        run = _init_wandb(cfg, run_dir, mode, attempt, info)
        start["wandb_id"] = run.id
    tracker = Tracker(run_dir, run)
    tracker._write({"time": round(time.time(), 3), **start})
    return tracker


def _init_wandb(cfg: DictConfig, run_dir: Path, mode: str, attempt: int, info: dict[str, Any]) -> Any:
    try:
        import wandb
    except ImportError as exc:  # pragma: no cover - wandb is a dependency
        from common.errors import UserError

        raise UserError("logger=wandb needs the `wandb` package (pip install wandb)") from exc
    logger = cfg.logger
    ident = wandb_identity(cfg, info)
    base_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
    online = mode == "online"
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    config["_job"] = {**info, "run_dir": str(run_dir), "attempt": attempt}
    wandb_dir = Path(logger.get("dir") or run_dir)
    wandb_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=logger.get("project") or "vitq", entity=logger.get("entity"), group=ident["group"],
        job_type=ident["job_type"], tags=ident["tags"], name=ident["name"], config=config,
        dir=str(wandb_dir), mode=mode, id=base_id if online or attempt == 0 else f"{base_id}-a{attempt}",
        resume="allow" if online else None, reinit="finish_previous",
    )
