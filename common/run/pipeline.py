"""The experiment: build model and data, evaluate FP, quantize with the chosen method, evaluate, report.

`run(cfg)` is the testable work function behind `run.py` (a thin `@hydra.main`); it writes
`results.json` and `metrics.jsonl` to the run dir and returns the results dict.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from common.run.config import register_resolvers, resolve_dataset, seed_everything, select_device, set_precision, validate
from common.run.evaluate import compare_to_fp, predict
from common.run.registry import RunContext, get_method
from common.run.stages import StageCache
from common.run.tracking import build_tracker

__all__ = ["run", "run_dir_of", "format_table"]
log = logging.getLogger(__name__)


def run_dir_of(cfg: DictConfig) -> Path:
    """The job's output dir: Hydra's runtime dir when under Hydra, else `cfg.run_dir`."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return Path(cfg.get("run_dir") or "outputs/run")


def _checkpoint_id(path: str | None) -> Any:
    """Identity of the weights file for stage signatures: path, size and a content hash (a checkpoint
    replaced in place, e.g. a retrained demo, has the same path and size but must not reuse old stages)."""
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


def format_table(r: dict[str, Any]) -> str:
    """Short FP-vs-quantized table for the console."""
    lines = [
        f"{r['model']} | {r['method']} | {r['bits']} | {r['dataset']} (calib {r['n_calib']}, eval {r['n_eval']})",
        f"{'':10s} {'top-1':>7s} {'top-5':>7s}",
        f"{'FP':10s} {r['fp_top1']:7.2f} {r['fp_top5']:7.2f}",
        f"{'quantized':10s} {r['quant_top1']:7.2f} {r['quant_top5']:7.2f}",
        f"top-1 agreement {r['top1_agreement']:.2f}%  KL(fp||q) {r['kl_to_fp']:.4f}  "
        f"drop {r['fp_top1'] - r['quant_top1']:+.2f} pts",
    ]
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one PTQ experiment described by the composed config."""
    register_resolvers()
    resolve_dataset(cfg)
    validate(cfg)
    from common.data import build_data
    from common.models.zoo import build_model

    method_cls = get_method(cfg.method.name, cfg.method.get("module"))
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(int(cfg.seed))
    set_precision(bool(cfg.precision.tf32))
    torch.set_num_threads(int(cfg.num_threads)) if cfg.get("num_threads") else None
    device = select_device(str(cfg.device))
    tracker = build_tracker(cfg, run_dir)
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        model = build_model(cfg.model)
        data = build_data(cfg.dataset, model, int(cfg.seed))
        timings["load"] = round(time.perf_counter() - t0, 3)
        base_key = {"model": OmegaConf.to_container(cfg.model, resolve=True),
                    "checkpoint": _checkpoint_id(cfg.model.get("checkpoint")),
                    "dataset": OmegaConf.to_container(cfg.dataset, resolve=True), "seed": int(cfg.seed)}
        stages = StageCache(run_dir, cfg.stages.get("shared_dir"), bool(cfg.stages.reuse),
                            OmegaConf.to_container(cfg.stages.load, resolve=True) if cfg.stages.get("load") else {})
        _debug_sleep_after_stage(stages, (cfg.get("debug") or {}).get("sleep_after_stage"))
        ctx = RunContext(cfg, run_dir, device, stages, tracker, base_key, timings)

        loader = data.eval_loader()
        fp_eval, _ = ctx.stage("fp_eval", {}, lambda: dict(zip(("logits", "labels"),
                                                                  predict(model.to(device), loader, device, "FP eval"))))
        method = method_cls(cfg.method, ctx)
        seed_everything(int(cfg.seed))
        with ctx.timed("quantize"):
            qmodel = method.quantize(copy.deepcopy(model).to(device), data)
        for m in qmodel.modules():
            if hasattr(m, "freeze_weight"):
                m.freeze_weight()
        with ctx.timed("quant_eval"):
            q_logits, labels = predict(qmodel, loader, device, "quantized eval")
        metrics = compare_to_fp(fp_eval["logits"], q_logits, labels)
        results: dict[str, Any] = {
            "model": cfg.model.name, "method": cfg.method.name, "bits": cfg.bits.name,
            "w_bit": int(cfg.bits.w_bit), "a_bit": int(cfg.bits.a_bit), "dataset": cfg.dataset.name,
            "n_calib": method.n_calib(), "n_eval": int(labels.numel()), **metrics,
            "seed": int(cfg.seed), "device": str(device), "timings": dict(timings),
            "data": data.info, "run_dir": str(run_dir),
            "overrides": _overrides(),
        }
        tracker.log({"event": "final", **{k: v for k, v in results.items() if isinstance(v, (int, float))}})
        tracker.summary(results)
        (run_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
        print(format_table(results))
        return results
    finally:
        tracker.finish()


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


def _overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:
        return []
