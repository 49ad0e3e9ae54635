"""Hydra's submitit SLURM launcher with a requeue that survives its own kill (`conf/launcher/slurm.yaml`).

Lives in the `hydra_plugins` namespace because Hydra instantiates launchers only from there.

On USR2 (preemption, or `signal_delay_s` before the time limit) submitit calls the launcher's `checkpoint()`,
which re-pickles the same Hydra job (same overrides, same job number, hence the same output dir), and then
runs `scontrol requeue <job>`. SLURM carries the requeue out by killing the job's processes, `scontrol`
included, and when that SIGTERM reaches `scontrol` before it exits, submitit takes the requeue for a failure
and writes an error result, so the sweep fails although the job was requeued (seen on a single-host
cluster, where the kill is fast). Here a `scontrol` killed by SIGTERM/SIGKILL counts as requeued: the job
then exits, and the requeued job resumes from the stage results saved in its run dir.
"""
from __future__ import annotations

import signal
import subprocess
from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurmLauncher

__all__ = ["SlurmLauncher"]


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
    """`submitit_slurm` launcher (hydra-submitit-launcher 1.2.0) with the robust requeue installed in the job."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.slurm.slurm import SlurmJobEnvironment

        SlurmJobEnvironment._requeue = _requeue  # type: ignore[method-assign]
        return super().__call__(*args, **kwargs)
