"""Every ready-made sweep in sweeps/ expands as `python run.py -m -cd sweeps -cn NAME` would (Hydra's own
override parser and BasicSweeper), its jobs compose (every swept value, and every job with its own tuned
config, is composed with the real config tree and checked applied), it has the documented size, writes under
outputs/sweeps/<name>/ and is documented in docs/cluster.md. A sweep over a method whose config has not landed
yet is skipped with the missing config named. Also: the three launcher configs compose, with `cluster.*`
reaching hydra-submitit-launcher's parameters."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from common.run.config import CONF_DIR, register_resolvers

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "sweeps"
EXPECTED_JOBS = {"ci_demo": 4, "aphq_table": 14, "erq_table": 14, "baselines": 63, "erq_coe": 24, "aphq_pct": 12,
                 "fimaq_table": 21, "adalog_table": 28, "erq_sr_table": 16, "detection_table": 16}


def _jobs(params: dict) -> list[list[str]]:
    """The override lists of every job, as Hydra's basic sweeper expands `hydra.sweeper.params`."""
    parser = OverridesParser.create()
    parsed = parser.parse_overrides([f"{k}={v}" for k, v in params.items()])
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _compose(name: str, overrides: list[str]):
    """Compose sweeps/<name>.yaml (which extends conf/config.yaml) with `overrides`; needs an initialized Hydra."""
    return compose(config_name=name, overrides=[f"hydra.searchpath=[file://{CONF_DIR}]", *overrides],
                   return_hydra_config=True)


def test_every_sweep_is_listed() -> None:
    assert sorted(p.stem for p in SWEEPS.glob("*.yaml")) == sorted(EXPECTED_JOBS)


@pytest.mark.parametrize("name", sorted(EXPECTED_JOBS))
def test_sweep_composes(name: str) -> None:
    register_resolvers()
    with initialize_config_dir(config_dir=str(SWEEPS), version_base="1.3"):
        _check_sweep(name)


def _check_sweep(name: str) -> None:
    base = _compose(name, [])
    params = OmegaConf.to_container(base.hydra.sweeper.params)
    jobs = _jobs(params)
    assert len(jobs) == EXPECTED_JOBS[name]
    assert str(base.hydra.sweep.dir).startswith(f"outputs/sweeps/{name}/")
    missing = sorted({f"conf/{ov.split('=')[0]}/{ov.split('=')[1]}.yaml" for job in jobs for ov in job
                      if "." not in ov.split("=")[0]
                      and not (CONF_DIR / ov.split("=")[0] / f"{ov.split('=')[1]}.yaml").is_file()})
    if missing:
        pytest.skip(f"{name}: {', '.join(missing)} not in the project yet")
    seen = set()
    for job in _covering(jobs):
        try:
            cfg = _compose(name, job)
        except HydraException as exc:  # e.g. a hyper-parameter key the method config does not have
            pytest.fail(f"sweeps/{name}.yaml job {job} does not compose: {exc}")
        for ov in job:
            key, value = ov.split("=", 1)
            node = OmegaConf.select(cfg, key if "." in key else f"{key}.name")
            assert str(node) == value, f"{ov} not applied"
        subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"]
        assert subdir.startswith("${hydra.job.num}_")  # unique per job
    assert len({tuple(sorted(job)) for job in jobs}) == len(jobs)


def _covering(jobs: list[list[str]]) -> list[list[str]]:
    """Jobs to compose: every value of every swept key at least once, and every job that picks up its own
    `conf/tuned/<method>_<model>_<bits>.yaml` (the only way two jobs compose differently beyond their keys)."""
    picked, seen = [], set()
    for job in jobs:
        d = dict(ov.split("=", 1) for ov in job)
        tuned = CONF_DIR / "tuned" / f"{d.get('method', '')}_{d.get('model', '')}_{d.get('bits', '')}.yaml"
        if not set(job) <= seen or tuned.is_file():
            picked.append(job)
            seen |= set(job)
    return picked


def test_sweeps_documented() -> None:
    doc = (REPO / "docs" / "cluster.md").read_text()
    for name in EXPECTED_JOBS:
        assert f"-cn {name}" in doc, f"docs/cluster.md does not show how to run sweeps/{name}.yaml"


@pytest.mark.parametrize("launcher,target", [
    ("local", "hydra._internal.core_plugins.basic_launcher.BasicLauncher"),
    ("submitit_local", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"),
    ("slurm", "hydra_plugins.vitq_launcher.slurm.SlurmLauncher"),
])
def test_launcher_configs(launcher: str, target: str) -> None:
    """Each launcher composes; `cluster.*` reaches the submitit parameters; the per-cluster example applies."""
    register_resolvers()
    extra = ["cluster.partition=gpu", "cluster.time_min=30", "+cluster.sbatch_args.nice=10"] * (launcher == "slurm")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"launcher={launcher}", *extra], return_hydra_config=True)
    hl = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert hl["_target_"] == target
    if launcher == "slurm":
        cfg.hydra.sweep.dir = "/tmp/x"  # ${now:} needs a running Hydra app
        hl = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
        assert (hl["partition"], hl["timeout_min"], hl["additional_parameters"]) == ("gpu", 30, {"nice": 10})
        assert hl["max_num_timeout"] == 3 and hl["gpus_per_node"] == 0 and hl["setup"] == []  # demo: a CPU job
        example = OmegaConf.load(REPO / "conf" / "local.example" / "default.yaml")
        merged = OmegaConf.merge(cfg, example)
        assert OmegaConf.to_container(merged.hydra.launcher, resolve=True)["partition"] == "gpu"
