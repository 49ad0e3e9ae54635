"""W&B offline integration: run a real multirun with `logger=wandb` and WANDB_MODE=offline, then read the
binary `run-<id>.wandb` files back and check grouping, naming, config, summary, stage timings and curves.

W&B ships no reader for offline runs; `read_wandb` below decodes the transaction log with the protobuf
classes wandb itself ships. The format is internal to wandb, so this is pinned to the tested wandb version
(see pyproject) and kept to this one module; every other test runs with W&B disabled.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
_BLOCK, _HEADER = 32768, 7  # LevelDB-log framing: 32 KiB blocks, 7-byte chunk headers


def _records(path: Path) -> Iterator[Any]:
    """Protobuf `Record`s of a .wandb file: header b':W&B' + magic + version, then LevelDB-log chunks
    (crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) that reassemble into records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, buf = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"bad crc at byte {pos}"
        pos += _HEADER + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (2, 3):
            continue
        rec = pb.Record()
        rec.ParseFromString(buf)
        buf = b""
        yield rec


def read_wandb(path: Path, timeout: float = 60.0) -> dict[str, Any]:
    """{'run': {id, group, job_type, tags, name}, 'config': {...}, 'summary': {...}, 'history': [rows]}.

    wandb's service process finishes writing the file after `finish()` returns; wait for the run's `exit`
    record (a half-written last chunk fails its crc: read again)."""
    deadline = time.time() + timeout
    while True:
        try:
            records = list(_records(path))
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                break
        except AssertionError:
            pass
        assert time.time() < deadline, f"{path} has no exit record after {timeout} s"
        time.sleep(0.2)
    out: dict[str, Any] = {"history": [], "summary": {}, "config": {}, "run": {}}

    def key(item: Any) -> str:
        return item.key or "/".join(item.nested_key)

    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out["summary"].update({key(i): json.loads(i.value_json) for i in r.summary.update})
        elif kind in ("config", "run"):
            upd = r.config.update if kind == "config" else r.run.config.update
            out["config"].update({i.key: json.loads(i.value_json) for i in upd})
            if kind == "run":
                out["run"] = {"id": r.run.run_id, "group": r.run.run_group, "job_type": r.run.job_type,
                              "tags": list(r.run.tags), "name": r.run.display_name, "project": r.run.project}
    return out


def _wandb_files(root: Path) -> list[Path]:
    return sorted(root.rglob("offline-run-*/run-*.wandb"))


def test_offline_multirun_readback(tmp_path: Path) -> None:
    """Two jobs of one sweep -> two separate offline runs in one group, with config, summary and timings."""
    sweep = tmp_path / "sweeps" / "wb_sweep"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "run.py", "-m", "logger=wandb", "logger.project=vitq-test", "model=demo", "method=fp",
           "bits=w4a4,w3a3", f"hydra.sweep.dir={sweep}", "stages.shared_dir=null", "num_threads=1", "device=cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = _wandb_files(sweep)
    assert len(files) == 2, f"expected one W&B run per job, got {files}"
    runs = [read_wandb(f) for f in files]
    assert len({r["run"]["id"] for r in runs}) == 2  # jobs never merge
    for r, job_dir in zip(runs, sorted(p for p in sweep.iterdir() if p.name[0].isdigit())):
        meta = r["run"]
        assert meta["group"] == "sweeps-wb_sweep" and meta["project"] == "vitq-test"
        assert meta["job_type"] == "fp"
        bits = r["config"]["bits"]["name"]
        assert set(meta["tags"]) == {"fp", "demo", bits}
        assert meta["name"] == f"bits={bits},method=fp,model=demo"  # the overrides, infrastructure left out
        assert r["config"]["method"]["name"] == "fp" and r["config"]["logger"]["name"] == "wandb"
        results = json.loads((job_dir / "results.json").read_text())
        s = r["summary"]
        assert s["quant_top1"] == pytest.approx(results["quant_top1"]) and s["bits"] == bits
        assert {"timings/load", "timings/fp_eval", "timings/quant_eval"} <= set(s)
        assert any(row.get("quant_top1") == pytest.approx(results["quant_top1"]) for row in r["history"])
        start = json.loads((job_dir / "metrics.jsonl").read_text().splitlines()[0])
        assert start["event"] == "start" and start["wandb_id"] == meta["id"]


def test_offline_curves_readback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-unit curves and stage metrics logged through the Tracker come back with their own x axis."""
    from omegaconf import OmegaConf

    from common.run.tracking import build_tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = OmegaConf.create({"logger": {"name": "wandb", "project": "vitq-test"}, "method": {"name": "aphq"},
                            "model": {"name": "demo"}, "bits": {"name": "w3a3"}})
    tr = build_tracker(cfg, tmp_path)
    for unit in ("blocks.0", "blocks.1"):
        for step in range(0, 50, 10):
            tr.log_curve(f"recon/{unit}", step, loss=1.0 / (step + 1))
    tr.log({"stage": "aphq_calibrate", "calib_top1": 42.0})
    tr.summary({"quant_top1": 43.0, "timings": {"aphq_reconstruct": 1.5}})
    tr.finish()
    (f,) = _wandb_files(tmp_path)
    r = read_wandb(f)
    curve = [(row["recon/blocks_1/step"], row["recon/blocks_1/loss"]) for row in r["history"]
             if "recon/blocks_1/loss" in row]
    assert curve == [(s, pytest.approx(1.0 / (s + 1))) for s in range(0, 50, 10)]
    assert any(row.get("aphq_calibrate/calib_top1") == 42.0 for row in r["history"])
    assert r["summary"]["quant_top1"] == 43.0 and r["summary"]["timings/aphq_reconstruct"] == 1.5
    assert r["run"]["tags"] == ["aphq", "demo", "w3a3"] and r["run"]["job_type"] == "aphq"
