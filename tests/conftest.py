"""Shared fixtures: composing the real Hydra config, pointing runs at tmp dirs, running `run.py`.

* `compose_cfg(overrides)` composes `conf/config.yaml` exactly as `run.py` would (same config dir,
  same version_base), without the `hydra` node, and returns a mutable-in-struct DictConfig.
* `run_cfg` (fixture) composes a config whose run dir and shared stage cache live under `tmp_path`,
  so tests never write into `outputs/` and never pick up another run's stage results.
* `run_py(args, ...)` runs `python run.py ...` in the repository with a timeout and returns the
  CompletedProcess (stdout/stderr as text).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # plain `pytest` (not `python -m pytest`) without `pip install -e .`
    sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from common.run.config import CONF_DIR, register_resolvers  # noqa: E402

DEMO_WEIGHTS = REPO / "common" / "models" / "assets" / "vit_digits.safetensors"


def compose_cfg(overrides: Iterable[str] = ()) -> DictConfig:
    """The composed primary config for `overrides` (as on the command line), Hydra node dropped."""
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)
    finally:
        GlobalHydra.instance().clear()


def point_at(cfg: DictConfig, run_dir: Path, shared_dir: Path) -> DictConfig:
    """Set `run_dir` (used by the pipeline when not under Hydra) and the shared stage cache."""
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
        cfg.stages.shared_dir = str(shared_dir)
    return cfg


@pytest.fixture
def run_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """`run_cfg(overrides, run_dir=None)`: composed config writing under tmp_path only.

    Default run dir: `tmp_path/run`; the shared stage cache is always `tmp_path/stage_cache`
    (per test, so nothing leaks between tests or from the user's `outputs/stage_cache`)."""

    def make(overrides: Iterable[str] = (), run_dir: str | Path | None = None) -> DictConfig:
        cfg = compose_cfg(overrides)
        return point_at(cfg, Path(run_dir) if run_dir else tmp_path / "run", tmp_path / "stage_cache")

    return make


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for `run.py` subprocesses: offline, no W&B, unbuffered, repo importable, and one torch
    thread (several processes share few cores in the tests; oversubscribed threads slow torch ~10x)."""
    env = dict(os.environ)
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    env.update(extra)
    return env


def run_py(args: Iterable[str], timeout: float = 300, env: dict[str, str] | None = None,
           cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python run.py ARGS` in the repository (or `cwd`), captured as text."""
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env or subprocess_env())


def run_py_many(jobs: Iterable[Iterable[str]], workers: int = 2, timeout: float = 900,
                env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """`python run.py ARGS` for every job, at most `workers` at a time (one torch thread each: the suite
    itself runs on one core, so heavy independent runs use the other one); results in job order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda args: run_py(args, timeout=timeout, env=env), [list(j) for j in jobs]))


def perturbed_timm(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A random-weight timm model (eval mode) whose every parameter gets N(0, 0.02²) noise: timm initialises
    biases and norms to constants, which would hide loading or layout mistakes."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    """A 2-block, 16-dim timm ViT on 16x16 images with 5 classes and a large-variance head (so logits and
    losses are far from zero): the reconstruction engines' test model."""
    import timm

    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                          num_classes=5).eval()
    with torch.no_grad():
        m.head.weight.normal_(0, 1.0)
    return m


def read_jsonl(path: Path, missing_ok: bool = False) -> list[dict]:
    """The records of a JSON-lines file (metrics.jsonl, events.jsonl), blank lines skipped; a missing file
    raises unless `missing_ok` (then no records)."""
    if missing_ok and not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def last_line(text: str) -> str:
    """The last non-empty line of a stream ('' when there is none)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""



@pytest.fixture
def one_thread():
    """Tiny tensors: OpenMP fork/join dominates (badly on a shared 2-core machine), one thread is faster.
    Restores the previous thread count afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def top1_tolerance(acc_a: float, acc_b: float, n: int, k: float = 2.0) -> float:
    """k standard errors (in points) of the difference of two top-1 accuracies measured on n eval images, at
    their mean accuracy p: 100·k·sqrt(2p(1 − p)/n) (the binomial SE sqrt(p(1 − p)/n) of each, combined).
    Top-1 orderings between methods on the small demo test split are only asserted up to this (n = 400 at
    p ≈ 0.96: 2.7 points, 11 images): a few images flip between machines (different CPU kernels, same code)
    and between calibration seeds."""
    p = (acc_a + acc_b) / 200.0
    return 100.0 * k * (2.0 * p * (1.0 - p) / n) ** 0.5
