"""Launcher for every experiment: a thin `@hydra.main` over `common.run.pipeline.run`.

    python run.py                                   # embedded demo (digits ViT), default method
    python run.py task=sr                           # super-resolution demo (small SwinIR x2 on Set5)
    python run.py method=aphq model=deit_s bits=w4a4 model.checkpoint=/path/deit_small.pth
    python run.py -m method=aphq,erq model=deit_t,deit_s bits=w4a4,w3a3
    python run.py -m launcher=slurm ...
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from common.run.config import GROUPS, check_group_choice, register_resolvers
from common.errors import UserError


def precheck(argv: list[str]) -> None:
    """Reject unknown config-group options with a one-line error before Hydra starts."""
    for arg in argv:
        if arg.startswith(("-", "+", "~", "hydra")) or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if key in GROUPS and not any(t in value for t in ("(", "*", "$")):
            for choice in value.split(","):
                check_group_choice(key, choice.strip())


register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from common.run.pipeline import run

    try:
        results = run(cfg)
        key = {"sr": "quant_psnr", "detection": "quant_box_ap"}.get(results.get("task"), "quant_top1")
        return float(results[key])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    try:
        precheck(sys.argv[1:])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    main()
