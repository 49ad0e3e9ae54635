"""A killed local run resumes when re-run into the same output dir: finished stages are loaded from
`<run_dir>/stages/`, not recomputed (counted in `stages/events.jsonl`), and the run finishes.
(The SLURM preemption -> requeue -> resume path is tested in tests/test_slurm.py.)"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from conftest import read_jsonl

REPO = Path(__file__).resolve().parents[1]


def _records(path: Path) -> list[dict]:
    return read_jsonl(path, missing_ok=True)


def test_killed_run_resumes_in_same_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "run.py", "model=demo", "method=ptq", "bits=w4a4", f"hydra.run.dir={run_dir}",
           "stages.shared_dir=null", "num_threads=1", "device=cpu"]
    # first attempt: sleeps after computing fp_eval (test-only knob) and is SIGKILLed there, like a crash
    first = subprocess.Popen(cmd + ["+debug.sleep_after_stage.fp_eval=300"], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not _records(run_dir / "stages" / "events.jsonl"):
            assert first.poll() is None and time.time() < deadline, "first attempt never finished fp_eval"
            time.sleep(0.3)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert not (run_dir / "results.json").exists()

    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    events = Counter((e["stage"], e["event"]) for e in _records(run_dir / "stages" / "events.jsonl"))
    assert events == {("fp_eval", "computed"): 1, ("fp_eval", "loaded"): 1, ("ptq_calibrate", "computed"): 1}
    starts = [r["attempt"] for r in _records(run_dir / "metrics.jsonl") if r.get("event") == "start"]
    assert starts == [0, 1]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "ptq" and 0 <= results["quant_top1"] <= 100
