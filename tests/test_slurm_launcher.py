"""The SLURM launcher without a cluster: GPUs per job (`cluster.gpus_per_node: auto`), one array per GPU
count, and sbatch rejections reported as one line naming the `cluster.*` key to change.

A fake `sbatch` on PATH stands in for SLURM: it keeps the submitted script and fails like a CPU-only cluster
does when a job asks for GPUs, so the exact sbatch options and the error line are checked end to end.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from common.errors import UserError
from common.run.config import CONF_DIR, register_resolvers, slurm_gpus
from conftest import run_py, subprocess_env
from hydra_plugins.vitq_launcher.slurm import rejection_message

CASES = [  # overrides -> GPUs per job
    (["model=demo"], 0),                                  # the default: the demo runs on CPU
    (["model=demo", "device=cpu"], 0),
    (["model=deit_s", "device=cpu"], 0),
    (["model=deit_s"], 1),                                # device=auto on an ImageNet model: a GPU job
    (["model=deit_s", "device=cuda"], 1),
    (["model=demo", "device=cuda:0"], 1),                 # asked for CUDA explicitly
    (["model=demo", "cluster.gpus_per_node=2"], 2),       # an explicit number wins
    (["model=deit_s", "cluster.gpus_per_node=0"], 0),
    (["model=deit_s", "cluster.gpus_per_node=null"], None),  # null: no GPU request
]


def test_resolved_gpus_per_node() -> None:
    """The composed config (launcher=slurm) gives sbatch the GPU count of the job's device and model."""
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            for overrides, gpus in CASES:
                cfg = compose(config_name="config", overrides=["launcher=slurm", *overrides],
                              return_hydra_config=True)
                if not any(o.startswith("cluster.") for o in overrides):
                    assert cfg.cluster.gpus_per_node == "auto"  # the default, resolved per job
                assert OmegaConf.select(cfg, "hydra.launcher.gpus_per_node") == gpus, overrides
    finally:
        GlobalHydra.instance().clear()


def test_slurm_gpus_rules() -> None:
    assert slurm_gpus("auto", "auto", "demo") == 0 and slurm_gpus("auto", "auto", "vit_b") == 1
    assert slurm_gpus("auto", "auto", "swinir_demo") == slurm_gpus("auto", "auto", "mask_rcnn_swin_demo") == 0
    assert slurm_gpus("auto", "cpu", "swin_t") == 0 and slurm_gpus("auto", "cuda:1", "demo") == 1
    assert slurm_gpus(4, "cpu", "demo") == 4 and slurm_gpus(None, "auto", "deit_s") is None
    for bad in ("two", -1, True):
        with pytest.raises(UserError, match="cluster.gpus_per_node"):
            slurm_gpus(bad, "auto", "demo")


@pytest.mark.parametrize("stderr,key", [
    ("sbatch: error: Invalid generic resource (gres) specification", "cluster.gpus_per_node=0"),
    ("sbatch: error: Batch job submission failed: Invalid partition name specified", "cluster.partition"),
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
     "cluster.account"),
    ("sbatch: error: Batch job submission failed: Invalid qos specification", "cluster.qos"),
    ("sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job submit limit, user's "
     "size and/or time limits)", "cluster.qos"),
    ("sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)",
     "cluster.time_min"),
    ("sbatch: error: Memory specification can not be satisfied", "cluster.mem_gb"),
    ("sbatch: error: Batch job submission failed: Invalid feature specification", "cluster.constraint"),
    ("sbatch: error: Batch job submission failed: Requested node configuration is not available",
     "cluster.cpus_per_task"),
])
def test_rejection_message_names_the_key(stderr: str, key: str) -> None:
    msg = rejection_message(stderr)
    assert "\n" not in msg and msg.startswith("sbatch rejected the job (") and key in msg, msg
    assert "sbatch: error:" not in msg and "Batch job submission failed" not in msg  # the reason, once


FAKE_SBATCH = """#!/bin/sh
# test stand-in: keep the script; reject any GPU request like a cluster without GPU gres; accept CPU jobs
# when FAKE_SBATCH_ACCEPT_CPU=1 (nothing runs them), else reject them too
n=$(ls "$FAKE_SBATCH_DIR" | wc -l)
cp "$1" "$FAKE_SBATCH_DIR/job$n.sh"
if grep -q -- '--gpus-per-node' "$1"; then
  echo "sbatch: error: Invalid generic resource (gres) specification" >&2
  exit 1
fi
if [ "$FAKE_SBATCH_ACCEPT_CPU" = 1 ]; then
  echo "Submitted batch job 4242"
  exit 0
fi
echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2
exit 1
"""


def _sbatch_options(script: Path) -> list[str]:
    """The script's `#SBATCH` options, without the log paths (the test's tmp dir name may say "gpu")."""
    opts = [ln.split(None, 1)[1] for ln in script.read_text().splitlines() if ln.startswith("#SBATCH ")]
    return [o for o in opts if not o.startswith(("--error=", "--output="))]


def _fake_sbatch(tmp_path: Path) -> dict[str, str]:
    bin_dir, scripts = tmp_path / "bin", tmp_path / "scripts"
    bin_dir.mkdir()
    scripts.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", "#!/bin/sh\nexit 1\n")):  # srun: submitit looks for it
        exe = bin_dir / name
        exe.write_text(text)
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return subprocess_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SBATCH_DIR=str(scripts))


def test_cpu_sweep_asks_no_gpu_and_rejection_is_one_line(tmp_path: Path) -> None:
    """`run.py -m launcher=slurm method=ptq bits=w4a4,w8a8` (the demo): one array whose script has no GPU
    option; the (fake) rejection comes back as one line; with cluster.gpus_per_node=1 the gres error does."""
    env = _fake_sbatch(tmp_path)
    base = ["-m", "launcher=slurm", "method=ptq", "bits=w4a4,w8a8", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    p = run_py(base, env=env, timeout=120)
    assert p.returncode == 1
    err = p.stderr.strip().splitlines()
    assert err == ["error: sbatch rejected the job (Invalid partition name specified): set cluster.partition=<a "
                   "partition from sinfo> (or cluster.partition=null for the default)"], p.stderr[-2000:]
    scripts = sorted((tmp_path / "scripts").iterdir())
    assert len(scripts) == 1  # both jobs in one array
    options = _sbatch_options(scripts[0])
    assert "--array=0-1%2" in options and not [o for o in options if "gpu" in o or "gres" in o], options

    p = run_py(base + ["cluster.gpus_per_node=1"], env=env, timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        "error: sbatch rejected the job (Invalid generic resource (gres) specification): set cluster.gpus_per_node=0 "
        "for CPU jobs (or cluster.partition=<a GPU partition>)"], p.stderr[-2000:]
    assert "#SBATCH --gpus-per-node=1" in sorted((tmp_path / "scripts").iterdir())[-1].read_text()


def test_mixed_sweep_gets_one_array_per_gpu_count(tmp_path: Path) -> None:
    """model=demo device=cpu,cuda: each job's own config decides (the sweep-level config, demo on device=auto,
    would say 0 for both), so the CPU job goes out in an array without a GPU option and the CUDA job in a second
    array with one GPU (rejected by the fake, as by a CPU-only cluster)."""
    env = _fake_sbatch(tmp_path)
    env["FAKE_SBATCH_ACCEPT_CPU"] = "1"
    p = run_py(["-m", "launcher=slurm", "method=fp", "model=demo", "device=cpu,cuda",
                f"hydra.sweep.dir={tmp_path / 'sweep'}"], env=env, timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith(
        "error: sbatch rejected the job (Invalid generic resource (gres) specification): set cluster.gpus_per_node=0")
    cpu, gpu = (_sbatch_options(s) for s in sorted((tmp_path / "scripts").iterdir()))
    assert not [o for o in cpu if "gpu" in o or "gres" in o], cpu
    assert "--gpus-per-node=1" in gpu
