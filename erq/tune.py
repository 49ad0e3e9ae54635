"""Held-out selection of per-(model, bits) hyper-parameters for `conf/tuned/` (never the test split).

For each calibration seed, the method calibrates on the first `n_calib` images of that seed's
calibration permutation (exactly what a run does) and is scored by KL(p_fp ‖ p_q) on the *rest* of
the calibration pool, which the method never saw. Scores are averaged over seeds, because on a small
model the spread between calibration draws is as large as the differences between settings.

    python -m erq.tune --model demo --bits w3a4 --grid method.coe=1000,3000,10000 --seeds 6
    python -m erq.tune --model demo --bits w4a4 --method repq

Prints one line per setting (mean and per-seed held-out KL) and the best setting.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from common.run.config import CONF_DIR, register_resolvers, resolve_dataset
from common.data import build_data
from common.run.registry import RunContext, get_method
from common.run.stages import StageCache
from common.run.tracking import Tracker
from common.models.zoo import build_model

__all__ = ["heldout_kl", "main"]


def _compose(overrides: list[str]):
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()
    resolve_dataset(cfg)
    return cfg


@torch.no_grad()
def heldout_kl(overrides: list[str], seeds: range, n_holdout: int | None = None) -> list[float]:
    """Held-out KL to the FP model for each seed (calibration-pool images after the first n_calib)."""
    cfg = _compose(overrides)
    model = build_model(cfg.model)
    n_calib = int(cfg.method.get("n_calib", 32))
    out = []
    for seed in seeds:
        data = build_data(cfg.dataset, model, seed)
        total = data.n_calib_available if n_holdout is None else min(data.n_calib_available, n_calib + n_holdout)
        pool, _ = data.calibration(total)
        held = pool[n_calib:]
        if len(held) == 0:
            raise SystemExit("no held-out images: the calibration pool is not larger than n_calib")
        with tempfile.TemporaryDirectory() as tmp:
            ctx = RunContext(cfg, Path(tmp), torch.device("cpu"), StageCache(tmp, None, False), Tracker(tmp), {})
            torch.manual_seed(seed)
            q = get_method(cfg.method.name, cfg.method.get("module"))(cfg.method, ctx).quantize(
                copy.deepcopy(model), data)
        p, r = model(held).double(), q(held).double()
        out.append(float(F.kl_div(F.log_softmax(r, 1), F.log_softmax(p, 1), log_target=True, reduction="batchmean")))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--method", default="erq")
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--n-holdout", type=int, default=None, help="held-out images per seed (default: rest of the pool)")
    ap.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,... (repeatable; the product is tried)")
    ap.add_argument("overrides", nargs="*", help="fixed config overrides")
    args = ap.parse_args(argv)
    base = [f"model={args.model}", f"bits={args.bits}", f"method={args.method}", "logger=none", *args.overrides]
    axes = [[f"{k}={v}" for v in vals.split(",")] for k, vals in (g.split("=", 1) for g in args.grid)]
    best = None
    for combo in itertools.product(*axes) if axes else [()]:
        scores = heldout_kl(base + list(combo), range(args.seeds), args.n_holdout)
        mean = statistics.mean(scores)
        print(f"{' '.join(combo) or '(defaults)':50s} held-out KL mean {mean:.4f}  per seed "
              + " ".join(f"{s:.4f}" for s in scores), flush=True)
        if best is None or mean < best[0]:
            best = (mean, combo)
    if axes:
        print(f"best: {' '.join(best[1])} (held-out KL {best[0]:.4f})")


if __name__ == "__main__":
    main()
