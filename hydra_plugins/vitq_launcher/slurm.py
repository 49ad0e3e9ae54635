"""Hydra's submitit SLURM launcher with a requeue that survives its own kill (`conf/launcher/slurm.yaml`).

Lives in the `hydra_plugins` namespace because Hydra instantiates launchers only from there.

On USR2 (preemption, or `signal_delay_s` before the time limit) submitit calls the launcher's `checkpoint()`,
which re-pickles the same Hydra job (same overrides, same job number, hence the same output dir), and then
runs `scontrol requeue <job>`. SLURM carries the requeue out by killing the job's processes, `scontrol`
included, and when that SIGTERM reaches `scontrol` before it exits, submitit takes the requeue for a failure
and writes an error result, so the sweep fails although the job was requeued (seen on a single-host
cluster, where the kill is fast). Here a `scontrol` killed by SIGTERM/SIGKILL counts as requeued: the job
then exits, and the requeued job resumes from the stage results saved in its run dir.

GPUs per job: `cluster.gpus_per_node: auto` resolves per job (`common.run.config.slurm_gpus`: 0 for CPU jobs,
1 otherwise), so the jobs of one sweep are submitted as one array per distinct GPU count; a job asking for 0
GPUs sends no GPU option at all (a cluster without GPU gres rejects even `--gpus-per-node=0`).

An sbatch rejection is raised as one line naming the `cluster.*` key to change (`rejection_message`).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from omegaconf import OmegaConf

from common.errors import UserError
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurmLauncher

__all__ = ["SlurmLauncher", "SlurmLaunchError", "SbatchRejected", "rejection_message"]

log = logging.getLogger(__name__)

# (pattern in sbatch's error text, what to change), first match wins: more specific causes first
_REJECTIONS: tuple[tuple[str, str], ...] = (
    (r"gres|generic resource",
     "set cluster.gpus_per_node=0 for CPU jobs (or cluster.partition=<a GPU partition>)"),
    (r"qos", "set cluster.qos=<an allowed QOS> (or cluster.qos=null), or lower cluster.time_min"),
    (r"account", "set cluster.account=<an account you may use> (sacctmgr show assoc user=$USER)"),
    (r"partition", "set cluster.partition=<a partition from sinfo> (or cluster.partition=null for the default)"),
    (r"time limit|time", "lower cluster.time_min to the partition's limit (sinfo -o '%P %l')"),
    (r"memory|mem", "lower cluster.mem_gb (or cluster.mem_gb=null for the partition's default)"),
    (r"feature|constraint", "fix cluster.constraint (or cluster.constraint=null)"),
    (r"node name|exclude", "fix cluster.exclude (or cluster.exclude=null)"),
    (r"node configuration|cpu", "lower cluster.cpus_per_task / cluster.mem_gb / cluster.gpus_per_node to what a node has"),
)


class SlurmLaunchError(UserError):
    """The sweep could not be submitted. `launch` prints it as one line (`error: ...`) and exits 1, like
    `run.py` does for a UserError (Hydra would add a traceback or a HYDRA_FULL_ERROR hint)."""


class SbatchRejected(SlurmLaunchError):
    """sbatch refused the job array."""


# overrides that can change a job's GPU count (everything else is shared with the sweep's other jobs)
_GPU_KEYS = re.compile(r"(device|model|experiment|tuned|local|launcher|cluster\.|model\.|hydra\.launcher\.)")

_NO_SLURM = ("{} not found: launcher=slurm submits with SLURM's sbatch/srun; run it on a login node "
             "(or use launcher=submitit_local)")


def rejection_message(stderr: str) -> str:
    """One line for sbatch's error text: the reason SLURM gave and the `cluster.*` key to change."""
    lines = [ln.strip() for ln in str(stderr).strip().splitlines() if ln.strip()]
    reason = lines[-1] if lines else "no message"
    reason = re.sub(r"^(sbatch: error: |Batch job submission failed: )+", "", reason)
    low = " ".join(lines).lower()
    hint = next((h for pat, h in _REJECTIONS if re.search(pat, low)),
                "check the cluster.* settings (conf/launcher/slurm.yaml, conf/local/default.yaml)")
    return f"sbatch rejected the job ({reason}): {hint}"


def _requeue(self: Any, countdown: int) -> None:
    """`SlurmJobEnvironment._requeue` that accepts `scontrol requeue` being killed by the requeue itself."""
    from submitit.core import logger

    try:
        subprocess.check_call(["scontrol", "requeue", self.job_id], timeout=60)
    except subprocess.CalledProcessError as exc:
        if exc.returncode not in (-signal.SIGTERM, -signal.SIGKILL):
            raise
    logger.get_logger().info(f"Requeued job {self.job_id} ({countdown} remaining timeouts)")


class SlurmLauncher(_SubmititSlurmLauncher):
    """`submitit_slurm` launcher (hydra-submitit-launcher 1.2.0) with the robust requeue installed in the job,
    per-job GPU counts and one-line sbatch rejections."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.slurm.slurm import SlurmJobEnvironment

        SlurmJobEnvironment._requeue = _requeue  # type: ignore[method-assign]
        return super().__call__(*args, **kwargs)

    def _job_gpus(self, overrides: Sequence[str], cache: dict) -> Any:
        """`hydra.launcher.gpus_per_node` resolved in this job's own config (device / model may be swept);
        None for no GPU request. Jobs that differ only in other keys (bits, method, ...) share one lookup."""
        from common.run.config import register_resolvers

        key = tuple(o for o in overrides if _GPU_KEYS.match(o.lstrip("+~")))
        if key not in cache:
            register_resolvers()
            assert self.hydra_context is not None and self.config is not None
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            cache[key] = OmegaConf.select(cfg, "hydra.launcher.gpus_per_node",
                                          default=self.params.get("gpus_per_node")) or None
        return cache[key]

    def _executor(self, gpus: Any) -> Any:
        """A submitit executor with this launcher's parameters (as the parent builds it) and `gpus` GPUs."""
        import submitit

        if shutil.which("srun") is None:  # submitit's own check, as one line
            raise SlurmLaunchError(_NO_SLURM.format("srun"))
        params = dict(self.params, gpus_per_node=gpus or None)  # 0 GPUs: no GPU option in the sbatch script
        specific_init_keys = {"max_num_timeout"}
        init_params = {"folder": params["submitit_folder"]}
        init_params.update({f"{self._EXECUTOR}_{k}": v for k, v in params.items() if k in specific_init_keys})
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
        init_keys = specific_init_keys | {"submitit_folder"}
        executor.update_parameters(**{k if k in baseparams else f"{self._EXECUTOR}_{k}": v
                                      for k, v in params.items() if k not in init_keys})
        return executor

    def _submit(self, gpus: Any, job_params: list[tuple]) -> list[Any]:
        """One job array of `job_params` with `gpus` GPUs per job; sbatch errors become a SlurmLaunchError."""
        from submitit.core.utils import FailedJobError

        executor = self._executor(gpus)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):  # submitit echoes sbatch's stderr: it goes into our one line
                return executor.map_array(self, *zip(*job_params))
        except FailedJobError as exc:
            raise SbatchRejected(rejection_message(str(exc) or err.getvalue())) from None
        except FileNotFoundError:
            raise SlurmLaunchError(_NO_SLURM.format("sbatch")) from None
        except subprocess.CalledProcessError as exc:
            text = exc.stderr or exc.output or str(exc)
            raise SbatchRejected(rejection_message(text if isinstance(text, str) else text.decode())) from None

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """The parent's launch, with one job array per distinct GPU count (all submitted before waiting on any)."""
        assert self.config is not None
        assert len(job_overrides) > 0
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.config.hydra.sweep.dir}")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))

        groups: dict[Any, list[int]] = {}
        job_params: list[tuple] = []
        cache: dict = {}
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
            groups.setdefault(self._job_gpus(overrides, cache), []).append(i)
        jobs: list[Any] = [None] * len(job_params)
        try:
            for gpus, members in groups.items():
                if len(groups) > 1:
                    log.info(f"\tjobs {[initial_job_idx + i for i in members]}: {gpus or 0} GPU(s) per job")
                for i, job in zip(members, self._submit(gpus, [job_params[i] for i in members])):
                    jobs[i] = job
        except SlurmLaunchError as exc:
            for job in filter(None, jobs):  # an earlier array of this sweep went out: take it back
                with contextlib.suppress(Exception):
                    job.cancel(check=False)
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        return [j.results()[0] for j in jobs]
