"""Real SLURM: a multirun sweep with `launcher=slurm` brings back every job's results (and turns into a
report), and a job signalled mid-run is requeued into the same dir and resumes without redoing stages.

Needs a SLURM controller (CI: `bash .ci/slurm.sh start`, a single-host cluster on 127.0.0.1). Found through
$SLURM_CONF or `$VITQ_SLURM_BASE/slurm.conf` (default /tmp/vitq-slurm). Without `sinfo` or a reachable
controller these tests skip with the reason, except under CI (env CI set), where they fail instead.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import read_jsonl

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[1]
# Resources that fit a 2-core CI box whatever conf/local/ says; time_min >= 15 so that submitit treats
# a USR2 as a preemption (it calls a signal a time-out after min(0.8 T, T - 10 min)).
CLUSTER = ["cluster.partition=null", "cluster.account=null", "cluster.qos=null", "cluster.constraint=null",
           "cluster.gpus_per_node=null", "cluster.cpus_per_task=1", "cluster.mem_gb=null", "cluster.time_min=20",
           "cluster.setup=[]", "cluster.sbatch_args={}", "stages.shared_dir=null"]


def slurm_env() -> dict[str, str]:
    """The environment with SLURM_CONF pointing at the CI cluster when it is not set already."""
    env = dict(os.environ)
    if not env.get("SLURM_CONF"):
        conf = Path(env.get("VITQ_SLURM_BASE", "/tmp/vitq-slurm")) / "slurm.conf"
        if conf.is_file():
            env["SLURM_CONF"] = str(conf)
    return env


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    """A reachable SLURM with an idle node, else skip (fail under CI)."""
    env = slurm_env()
    reason = None
    if shutil.which("sinfo") is None:
        reason = "sinfo not found: no SLURM on this machine (start one with `bash .ci/slurm.sh start`)"
    else:
        p = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30)
        if p.returncode != 0 or not {"idle", "mixed", "allocated"} & set(p.stdout.split()):
            reason = f"SLURM not usable (sinfo rc={p.returncode}: {(p.stdout + p.stderr).strip()[:200]})"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests: {reason}")
        pytest.skip(reason)
    return env


def _records(path: Path) -> list[dict]:
    return read_jsonl(path, missing_ok=True)


def test_sweep_and_report(slurm: dict[str, str], tmp_path: Path) -> None:
    """sweeps/ci_demo.yaml as a SLURM job array: every job's results.json comes back, then the report."""
    sweep = tmp_path / "ci_demo"
    cmd = [sys.executable, "run.py", "-m", "-cd", "sweeps", "-cn", "ci_demo", "launcher=slurm",
           f"hydra.sweep.dir={sweep}", *CLUSTER]
    p = subprocess.run(cmd, cwd=REPO, env=slurm, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    results = sorted(sweep.glob("*/results.json"))
    assert len(results) == 4, f"expected 4 jobs' results, got {results}; {p.stderr[-2000:]}"
    got = {(r["method"], r["bits"]) for r in map(lambda f: json.loads(f.read_text()), results)}
    assert got == {("fp", "w4a4"), ("fp", "w3a3"), ("ptq", "w4a4"), ("ptq", "w3a3")}
    job_ids = {_records(f.parent / "metrics.jsonl")[0]["slurm_job_id"] for f in results}
    assert None not in job_ids and len(job_ids) == 4  # each ran as its own SLURM job
    assert any((sweep / ".submitit").iterdir())

    from common.report import write_report

    rep = write_report([sweep])
    md = (sweep / "report" / "report.md").read_text()
    assert "## Full precision" in md and "## W4/A4 (w4a4)" in md and "## W3/A3 (w3a3)" in md
    assert "| ptq |" in md and "| fp |" in md
    png = sweep / "report" / "acc_vs_bits.png"
    assert png in rep["files"] and png.read_bytes()[:4] == b"\x89PNG"
    rows = (sweep / "report" / "table.csv").read_text().splitlines()
    assert rows[0].startswith("bits,method,demo") and len(rows) == 4  # header + fp + ptq x 2 bits


def test_cpu_sweep_without_gpu_settings(slurm: dict[str, str], tmp_path: Path) -> None:
    """`python run.py -m launcher=slurm method=ptq bits=w4a4,w8a8` as a user types it, on a cluster without GPU
    gres (the CI one): the demo's jobs ask for no GPU (cluster.gpus_per_node: auto), so sbatch accepts them and
    both finish. cluster.gpus_per_node is deliberately left at its default here."""
    sweep = tmp_path / "cpu_sweep"
    cluster = [c for c in CLUSTER if not c.startswith("cluster.gpus_per_node=")]
    cmd = [sys.executable, "run.py", "-m", "launcher=slurm", "method=ptq", "bits=w4a4,w8a8",
           f"hydra.sweep.dir={sweep}", "num_threads=1", *cluster]
    p = subprocess.run(cmd, cwd=REPO, env=slurm, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    results = sorted(sweep.glob("*/results.json"))
    assert len(results) == 2, f"expected 2 jobs' results, got {results}; {p.stderr[-2000:]}"
    got = {(r["method"], r["bits"]) for r in map(lambda f: json.loads(f.read_text()), results)}
    assert got == {("ptq", "w4a4"), ("ptq", "w8a8")}
    scripts = list((sweep / ".submitit").rglob("*_submission.sh"))
    assert scripts and not any("--gpus-per-node" in s.read_text() for s in scripts)


def test_preemption_requeue_resume(slurm: dict[str, str], tmp_path: Path) -> None:
    """USR2 mid-run (after fp_eval is saved): the job is requeued into the same dir, resumes from the saved
    stage (loaded, not recomputed), computes the rest once and finishes; the sweep returns normally."""
    sweep = tmp_path / "preempt"
    job_dir = sweep / "job"
    cmd = [sys.executable, "run.py", "-m", "launcher=slurm", "model=demo", "method=ptq", "bits=w4a4",
           f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=job", "num_threads=1", "device=cpu", *CLUSTER,
           "+debug.sleep_after_stage.fp_eval=300"]  # test-only: a window with one stage done, job still running
    proc = subprocess.Popen(cmd, cwd=REPO, env=slurm, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while not any(e["event"] == "computed" for e in _records(job_dir / "stages" / "events.jsonl")):
            assert proc.poll() is None and time.time() < deadline, "fp_eval never finished"
            time.sleep(0.5)
        job_id = _records(job_dir / "metrics.jsonl")[0]["slurm_job_id"]
        sig = subprocess.run(["scancel", "--signal=USR2", str(job_id)], env=slurm, capture_output=True, text=True)
        assert sig.returncode == 0, sig.stderr
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    assert (job_dir / "results.json").is_file()
    events = Counter((e["stage"], e["event"]) for e in _records(job_dir / "stages" / "events.jsonl"))
    assert events == {("fp_eval", "computed"): 1, ("fp_eval", "loaded"): 1, ("ptq_calibrate", "computed"): 1}
    starts = [r for r in _records(job_dir / "metrics.jsonl") if r.get("event") == "start"]
    assert [s["attempt"] for s in starts] == [0, 1]
    assert [s["slurm_restart_count"] for s in starts] == [0, 1]  # the same SLURM job, requeued once
    assert starts[0]["slurm_job_id"] == starts[1]["slurm_job_id"] == job_id
    logs = "".join(f.read_text() for f in (sweep / ".submitit").rglob("*_log.err"))
    assert "Caught signal SIGUSR2" in logs and "this job is preempted" in logs  # submitit's own account
