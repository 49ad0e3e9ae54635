"""Tests of `common.run.tracking` without W&B traffic: the metrics.jsonl protocol, attempt counting (resume
evidence), W&B naming from the Hydra job, the W&B calls a fake run receives, and WANDB_MODE=disabled."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from common.run import tracking
from common.run.tracking import Tracker, build_tracker, flatten, job_name, wandb_identity
from conftest import read_jsonl


def _cfg(logger: dict[str, Any] | None = None):
    return OmegaConf.create({"logger": logger or {"name": "jsonl"}, "method": {"name": "ptq"},
                             "model": {"name": "deit_s"}, "bits": {"name": "w4a4"}})


def _records(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


class FakeRun:
    """Records what the Tracker sends to a W&B run."""

    id = "fake"

    def __init__(self) -> None:
        self.logged: list[dict] = []
        self.defined: list[tuple[str, str | None]] = []
        self.summary: dict[str, Any] = {}
        self.finished = 0

    def log(self, d: dict) -> None:
        self.logged.append(d)

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.defined.append((name, step_metric))

    def finish(self) -> None:
        self.finished += 1


def test_jsonl_records_and_attempts(tmp_path: Path) -> None:
    for attempt in range(3):  # three starts in one run dir = a run resumed twice
        tr = build_tracker(_cfg(), tmp_path)
        tr.log({"stage": "calib", "calib_top1": 50.0}, step=attempt)
        tr.log_curve("block_recon/blocks.0", 10, loss=0.5)
        tr.finish()
    recs = _records(tmp_path)
    starts = [r for r in recs if r.get("event") == "start"]
    assert [r["attempt"] for r in starts] == [0, 1, 2]
    assert all("time" in r for r in recs)
    assert {"curve": "block_recon/blocks.0", "step": 10, "loss": 0.5}.items() <= recs[2].items()
    assert recs[1]["stage"] == "calib" and recs[1]["step"] == 0


def test_wandb_calls(tmp_path: Path) -> None:
    run = FakeRun()
    tr = Tracker(tmp_path, run)
    tr.log({"stage": "aphq.calib", "calib_top1": 70.0, "note": "text", "lst": [1]}, step=3)
    tr.log({"event": "final", "quant_top1": 71.0})
    tr.log({"event": "erq_layer", "err": 0.5})
    for step in (0, 10):
        tr.log_curve("block_recon/blocks.3", step, loss=1.0 / (step + 1))
    tr.summary({"quant_top1": 71.0, "timings": {"quantize": 2.5}, "overrides": ["a=b"], "model": "deit_s"})
    tr.finish()
    tr.finish()
    assert run.logged[0] == {"aphq_calib/calib_top1": 70.0, "aphq_calib/step": 3}
    assert run.logged[1] == {"quant_top1": 71.0}
    assert run.logged[2] == {"erq_layer/err": 0.5}
    assert run.logged[3] == {"block_recon/blocks_3/loss": 1.0, "block_recon/blocks_3/step": 0}
    # every curve / stage gets its own x axis; '.' is replaced since W&B nests on dots
    assert ("block_recon/blocks_3/*", "block_recon/blocks_3/step") in run.defined
    assert ("aphq_calib/*", "aphq_calib/step") in run.defined
    assert run.summary == {"quant_top1": 71.0, "timings/quantize": 2.5, "model": "deit_s"}
    assert run.finished == 1


def test_identity_from_sweep() -> None:
    info = {"sweep_dir": "/x/outputs/sweeps/aphq_table/20250101-120000",
            "overrides": ["model=deit_s", "method=ptq", "bits=w4a4", "launcher=slurm", "cluster.mem_gb=8",
                          "dataset.root=/data/imagenet", "+debug.sleep_after_stage.fp_eval=1", "logger=wandb"]}
    ident = wandb_identity(_cfg({"name": "wandb", "tags": ["paper"]}), info)
    assert ident == {"group": "aphq_table-20250101-120000", "job_type": "ptq",
                     "tags": ["ptq", "deit_s", "w4a4", "paper"], "name": "bits=w4a4,method=ptq,model=deit_s"}
    single = wandb_identity(_cfg({"name": "wandb"}), {"overrides": []})
    assert single["group"] is None and single["name"] == "deit_s-ptq-w4a4"
    explicit = wandb_identity(_cfg({"name": "wandb", "group": "g", "job_type": "j", "run_name": "n"}), info)
    assert (explicit["group"], explicit["job_type"], explicit["name"]) == ("g", "j", "n")


def test_wandb_disabled_by_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    called = []
    monkeypatch.setattr(tracking, "_init_wandb", lambda *a, **k: called.append(1))
    tr = build_tracker(_cfg({"name": "wandb", "mode": "online"}), tmp_path)
    tr.finish()
    assert tr.wandb is None and not called and not (tmp_path / "wandb").exists()
    assert _records(tmp_path)[0]["event"] == "start"


def test_job_name_keeps_what_changes_results() -> None:
    assert job_name(["method=erq", "method.coe=1000", "+seed=1", "device=cuda", "hydra.sweep.dir=/x",
                     "model.checkpoint=/w.pth", "num_threads=4"]) == "method.coe=1000,method=erq,seed=1"


def test_flatten() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": [1], "f": None}) == {"a/b": 1, "a/c/d": "x", "f": None}
